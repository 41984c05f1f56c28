"""Where a pull's blocks land: the caller's rows, and optionally this node's arena.

The data-plane client hands each arriving block (or piece of a large block, in order) to a
`PulledBlocks`. It checks every block against the checksum it travelled with, fused with the
copy into the caller's row, and copies it into a slot reserved in the local arena when the pull
caches. A large block is handled on a worker thread, so the stream keeps being read (and gRPC's
flow control does not stall) while it is checked and copied; a small one on the stream's thread,
where a thread hop would cost more than the copy. A block that fails its checksum is a miss; a
cached copy is only reported (for the commit that makes it visible) once its whole block passed,
and only if its slot was not fenced meanwhile.

A `Landing` follows how far every block of one get has landed in the caller's rows, so a reader
can use layer i of every block while later layers are still on the way (a pull asked for
layer-major order). What has landed is not yet checked: a block is only right once the get
returns and names it found.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Executor, Future
from typing import Sequence

import numpy as np
import torch
import xxhash

from kvstore.integrity import copy_with_checksum

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ClusterGetResult:
    """What a cluster get (the Ray client's, or the remote client's) found, and where from."""

    sources: list[tuple[str, str] | None]  # per key: (node id it came from, "local" or "remote"), None: miss

    @property
    def found(self) -> list[bool]:
        return [s is not None for s in self.sources]

    @property
    def hits(self) -> int:
        return sum(s is not None for s in self.sources)


INLINE_COPY_BELOW = 1024 * 1024  # blocks smaller than this are copied on the stream's thread
SMALL_PIECE = 256 * 1024  # pieces up to this much are copied plainly, then hashed (see _copy)


class Landing:
    """How far each block of one get has landed: `landed(key, end)` as bytes arrive (in order
    per block), `end()` when the get is over; `wait_layer(i)` returns once layer i of every
    block has landed or the get is over (then the get's result says which blocks are right)."""

    def __init__(self, keys: Sequence[bytes], layer_nbytes: int, num_layers: int) -> None:
        self._layer_nbytes = layer_nbytes
        self._landed = dict.fromkeys(keys, 0)  # key -> bytes of it in the caller's row
        self._blocks_with_layer = [0] * num_layers  # per layer: blocks that have it whole
        self._ended = False
        self._changed = threading.Condition()

    def landed(self, key: bytes, end: int) -> None:
        """Block `key` has its first `end` bytes in the caller's row."""
        with self._changed:
            before, self._landed[key] = self._landed[key], end
            for layer in range(before // self._layer_nbytes, end // self._layer_nbytes):
                self._blocks_with_layer[layer] += 1
                if self._blocks_with_layer[layer] == len(self._landed):
                    self._changed.notify_all()

    def end(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_layer(self, layer: int, timeout_s: float | None = None) -> bool:
        """Waits until layer `layer` of every block has landed (True) or the get is over (False)."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended or self._blocks_with_layer[layer] == len(self._landed),
                                   timeout_s)
            return self._blocks_with_layer[layer] == len(self._landed)


class PulledBlocks:
    """The sink of one pull: `self(key, bytes, checksum, offset)` per block or piece, then `wait()`."""

    def __init__(self, rows: dict[bytes, torch.Tensor], nbytes: int, copier: Executor,
                 arena: np.ndarray | None = None, generations: np.ndarray | None = None,
                 reserved: dict[bytes, tuple[int, int]] | None = None, landing: Landing | None = None) -> None:
        self._rows = rows  # key -> the caller's uint8 row for it
        self._nbytes = nbytes
        self._copier = copier
        self._arena, self._generations = arena, generations
        self._reserved = reserved or {}  # key -> (slot, generation) of its local copy
        self._landing = landing
        self._hashing: dict[bytes, xxhash.xxh3_64] = {}  # running checksums of blocks arriving in pieces
        self._copies: list[Future] = []
        self.cached: dict[bytes, int] = {}  # key -> checksum, of the blocks copied into the local arena
        self.damaged: set[bytes] = set()

    def __call__(self, key: bytes, data: memoryview, block_sum: int, offset: int) -> None:
        if self._nbytes < INLINE_COPY_BELOW:
            self._copy(key, data, block_sum, offset)
        else:  # in order: one worker
            self._copies.append(self._copier.submit(self._copy, key, data, block_sum, offset))

    def wait(self) -> None:
        """Returns once every block handed over so far is copied (raises what a copy raised)."""
        copies, self._copies = self._copies, []
        for done in copies:
            done.result()

    def _copy(self, key: bytes, data: memoryview, block_sum: int, offset: int) -> None:
        end = offset + len(data)
        whole = offset == 0 and end == self._nbytes
        running = None if whole else self._hashing.setdefault(key, xxhash.xxh3_64())
        row = self._rows[key]
        if end - offset <= SMALL_PIECE and row.device.type == "cpu":
            # A small piece (a small block, or one layer of a block): a plain copy, then a hash of
            # what it wrote (still in cache), costs a fraction of copy_with_checksum's per-call
            # overhead, which dominates at this size.
            written = row.numpy()[offset:end]
            written[:] = np.frombuffer(data, dtype=np.uint8)
            if running is None:
                digest = xxhash.xxh3_64_intdigest(written)
            else:
                running.update(written)
                digest = running.intdigest()
        else:
            digest = copy_with_checksum(row[offset:end], data, running)
            written = row[offset:end].cpu().numpy()
        slot = self._slot(key)
        if slot is not None:
            np.copyto(self._arena[slot, offset:end], written)
        if self._landing is not None:
            self._landing.landed(key, end)
        if end < self._nbytes:
            return
        self._hashing.pop(key, None)
        if digest != block_sum:
            log.warning("block %s arrived damaged (checksum mismatch); it is a miss", key.hex())
            self.damaged.add(key)
        elif self._slot(key) is not None:
            self.cached[key] = block_sum

    def _slot(self, key: bytes) -> int | None:
        """The block's reserved local slot, unless none was reserved or it has been fenced."""
        slot, generation = self._reserved.get(key, (None, None))
        if slot is None or int(self._generations[slot]) != generation:
            return None
        return slot
