"""What every storage medium provides to the tiered store: fixed-size slots and copies in and out.

A tier is an arena of `num_slots` slots of `slot_nbytes` each (every slot starts on a 4 KiB
boundary, `slot_stride` apart, so direct I/O can use any slot as its buffer). The store owns
all bookkeeping (which key lives in which slot, states, pins); a tier only allocates slots and
moves bytes. Tiers never import Ray.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Iterable, Sequence

import numpy as np
import torch

from kvstore.errors import BlockStateError, ConfigError, CorruptBlockError
from kvstore.integrity import copy_with_checksum

PAGE = 4096


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclasses.dataclass(frozen=True)
class SlotMeta:
    """What a tier is told about the block it stores: enough for a durable tier to describe it."""

    key: bytes
    layout_id: bytes
    nbytes: int
    parent: bytes | None = None
    checksum: int | None = None  # the payload's xxh3-64 (kvstore.integrity), once it has one


class SlotAllocator:
    """O(1) allocate and free over slot numbers, refusing double frees."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._used = bytearray(num_slots)

    def alloc(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = 1
        return slot

    def claim(self, slots: Iterable[int] | np.ndarray) -> None:
        """Marks specific slots used (recovery of a durable tier) in a few array operations over
        the whole tier: a tier of a million slots is claimed at open in milliseconds."""
        claimed = np.asarray(slots if isinstance(slots, np.ndarray) else list(slots), dtype=np.int64)
        used = np.frombuffer(self._used, dtype=np.uint8)
        taken = claimed[used[claimed] != 0]
        if taken.size:
            raise BlockStateError(f"slot {int(taken[0])} is already in use")
        before = int(np.count_nonzero(used))
        used[claimed] = 1
        if int(np.count_nonzero(used)) - before != claimed.size:  # a slot named twice
            used[claimed] = 0
            values, counts = np.unique(claimed, return_counts=True)
            raise BlockStateError(f"slot {int(values[counts > 1][0])} is already in use")
        self._free = np.flatnonzero(used == 0)[::-1].tolist()  # pop() hands out the lowest first

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise BlockStateError(f"slot {slot} is not allocated")
        self._used[slot] = 0
        self._free.append(slot)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_slots - len(self._free)


class Tier(abc.ABC):
    """One storage medium of one node.

    `medium` is the name vLLM's KV events use for where a block lives ("GPU", "CPU", "DISK").
    Memory tiers return a tensor from `view(slot)` that aliases the slot, so the store copies
    straight between a caller's buffer and the arena; a durable tier returns None and moves
    bytes with `write_many` / `read_many`.
    """

    name: str
    medium: str

    def __init__(self, slot_nbytes: int, num_slots: int) -> None:
        self.slot_nbytes = slot_nbytes
        self.slot_stride = round_up(slot_nbytes)
        self.num_slots = num_slots
        self.allocator = SlotAllocator(num_slots)
        # Per slot, bumped when a writer of the slot is fenced (TieredStore.fence).
        self.generations = np.zeros(num_slots, dtype=np.uint64)
        self.bytes_written = 0
        self.bytes_read = 0

    def view(self, slot: int) -> torch.Tensor | None:
        """A uint8 tensor of `slot_stride` bytes aliasing the slot, or None for a durable tier."""
        return None

    @abc.abstractmethod
    def write_many(self, items: Sequence[tuple[int, torch.Tensor, SlotMeta]],
                   checksums: list[int] | None = None) -> list[Exception | None]:
        """Copies each uint8 source tensor (`meta.nbytes` long) into its slot.

        Returns one entry per item: None, or the exception that item failed with (the store
        drops that block and goes on with the rest). With `checksums`, a new block is being
        committed: the tier appends each payload's checksum to it, taken while copying.
        """

    @abc.abstractmethod
    def read_many(self, items: Sequence[tuple[int, torch.Tensor, SlotMeta]],
                  verify: Sequence[bool] | None = None) -> list[Exception | None]:
        """Copies each slot's first `meta.nbytes` bytes into its uint8 destination tensor.

        An item whose bytes do not match `meta.checksum` fails with CorruptBlockError. A durable
        tier checks every item; a memory tier those whose `verify` flag is set.
        """

    # The directory other processes read without asking the store (the host tier's, see
    # tiers/directory.py); no-ops for a tier that has none.

    def begin_write(self, slot: int) -> None:
        """The store hands the slot out for writing."""

    def publish(self, slot: int, meta: SlotMeta) -> None:
        """A block is ready to read in the slot."""

    def withdraw(self, key: bytes) -> None:
        """The block is no longer to be read from this tier."""

    def take_touched(self) -> list[tuple[int, bytes]]:
        """(slot, key) of the blocks read through the directory since the last call."""
        return []

    def erase(self, slot: int) -> None:
        """Makes a freed slot's old content unrecoverable where the medium outlives the process."""

    def recovered(self) -> Iterable[tuple[int, SlotMeta]]:
        """Blocks found at open (a durable tier); their slots are already allocated."""
        return []

    def close(self) -> None:
        """Releases the medium. The tier is unusable afterwards."""

    def stats(self) -> dict:
        return {
            "name": self.name,
            "medium": self.medium,
            "slot_bytes": self.slot_nbytes,
            "slots": self.num_slots,
            "used_slots": self.allocator.used_count,
            "capacity_bytes": self.num_slots * self.slot_nbytes,
            "used_bytes": self.allocator.used_count * self.slot_nbytes,
            "bytes_written": self.bytes_written,
            "bytes_read": self.bytes_read,
        }


class MemoryTier(Tier):
    """A tier whose slots are rows of one uint8 tensor (host shared memory, or device memory)."""

    arena: torch.Tensor  # [num_slots, slot_stride], uint8

    def view(self, slot: int) -> torch.Tensor:
        return self.arena[slot]

    def write_many(self, items, checksums=None):
        for slot, src, meta in items:
            if checksums is None:
                self.arena[slot, :meta.nbytes].copy_(src[:meta.nbytes], non_blocking=True)
            else:
                checksums.append(copy_with_checksum(self.arena[slot, :meta.nbytes], src[:meta.nbytes]))
            self.bytes_written += meta.nbytes
        self._sync()
        return [None] * len(items)

    def read_many(self, items, verify=None):
        errors: list[Exception | None] = [None] * len(items)
        for i, (slot, dst, meta) in enumerate(items):
            if verify is not None and verify[i] and meta.checksum is not None:
                if copy_with_checksum(dst[:meta.nbytes], self.arena[slot, :meta.nbytes]) != meta.checksum:
                    errors[i] = CorruptBlockError(f"slot {slot} of the {self.name} tier: block {meta.key.hex()} "
                                                  "fails its checksum")
            else:
                dst[:meta.nbytes].copy_(self.arena[slot, :meta.nbytes], non_blocking=True)
            self.bytes_read += meta.nbytes
        self._sync()
        return errors

    def _sync(self) -> None:
        """Waits for copies queued by write_many/read_many (asynchronous only on CUDA)."""


def slots_for(capacity_bytes: int, slot_nbytes: int, what: str, overhead: int = 0) -> int:
    """How many slots of `slot_nbytes` (each stored in `round_up(slot_nbytes) + overhead` bytes)
    fit in `capacity_bytes`; a capacity that holds none is a configuration error."""
    if slot_nbytes < 1:
        raise ConfigError(f"{what}: slot_nbytes={slot_nbytes!r} must be positive")
    num_slots = capacity_bytes // (round_up(slot_nbytes) + overhead)
    if num_slots < 1:
        raise ConfigError(f"{what}: {capacity_bytes} bytes hold no slot of {slot_nbytes} bytes; give it more space")
    return num_slots
