"""Where a pull's blocks land: the caller's rows, and optionally this node's arena.

The data-plane client hands each arriving block (or piece of a large block, in order) to a
`PulledBlocks`. It checks every block against the checksum it travelled with, fused with the
copy into the caller's row, and copies it into a slot reserved in the local arena when the pull
caches. A large block is handled on a worker thread, so the stream keeps being read (and gRPC's
flow control does not stall) while it is checked and copied; a small one on the stream's thread,
where a thread hop would cost more than the copy. A block that fails its checksum is a miss; a
cached copy is only reported (for the commit that makes it visible) once its whole block passed,
and only if its slot was not fenced meanwhile.
"""
from __future__ import annotations

import logging
from concurrent.futures import Executor, Future

import numpy as np
import torch
import xxhash

from kvstore.integrity import copy_with_checksum

log = logging.getLogger(__name__)

INLINE_COPY_BELOW = 1024 * 1024  # blocks smaller than this are copied on the stream's thread


class PulledBlocks:
    """The sink of one pull: `self(key, bytes, checksum, offset)` per block or piece, then `wait()`."""

    def __init__(self, rows: dict[bytes, torch.Tensor], nbytes: int, copier: Executor,
                 arena: np.ndarray | None = None, generations: np.ndarray | None = None,
                 reserved: dict[bytes, tuple[int, int]] | None = None) -> None:
        self._rows = rows  # key -> the caller's uint8 row for it
        self._nbytes = nbytes
        self._copier = copier
        self._arena, self._generations = arena, generations
        self._reserved = reserved or {}  # key -> (slot, generation) of its local copy
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
        row = self._rows[key][offset:end]
        whole = offset == 0 and end == self._nbytes
        running = None if whole else self._hashing.setdefault(key, xxhash.xxh3_64())
        digest = copy_with_checksum(row, data, running)
        slot = self._slot(key)
        if slot is not None:
            np.copyto(self._arena[slot, offset:end], row.numpy())
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
