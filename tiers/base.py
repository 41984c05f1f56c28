"""What every storage medium provides to the tiered store: slots by size class, copies in and out.

A tier's capacity is carved into chunks, each handed to one size class (a slot size) on demand
(tiers/geometry.py); slot numbers are dense over the tier, every slot starts on a 4 KiB boundary
(direct I/O can use any slot as its buffer). The one-class tier of the `slot_bytes` setting is an
arena of `num_slots` slots of `slot_nbytes` each, `slot_stride` apart. The store owns all
bookkeeping (which key lives in which slot, states, pins, which class a block goes to); a tier
only allocates slots and moves bytes. Tiers never import Ray.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Iterable, Sequence

import numpy as np
import torch

from kvstore.errors import BlockStateError, ConfigError, CorruptBlockError
from kvstore.integrity import copy_with_checksum
from kvstore.tiers.geometry import PAGE, ChunkAllocator, Geometry, SizeClasses, mark_claimed, round_up

__all__ = ["PAGE", "round_up", "SlotMeta", "SlotAllocator", "Tier", "MemoryTier", "slots_for", "size_classes"]


def size_classes(classes: "SizeClasses | int") -> SizeClasses:
    """A tier's classes from its constructor argument: SizeClasses, or an int (one slot size)."""
    if isinstance(classes, SizeClasses):
        return classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ConfigError(f"slot_nbytes={classes!r} must be positive")
    return SizeClasses.one(classes)


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
        used = mark_claimed(self._used, slots)
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
    durable = True  # its bytes move with write_many / read_many only (view returns None)

    def __init__(self, classes: SizeClasses, geometry: Geometry) -> None:
        self.classes = classes
        self.geometry = geometry
        self.num_slots = geometry.num_slots  # slot numbers
        # One class: its slot size and stride; several: 0 (each chunk says its own).
        self.slot_nbytes = classes.slot_nbytes if geometry.single else 0
        self.slot_stride = geometry.chunk_bytes if geometry.single else 0
        self.allocator = ChunkAllocator(geometry, self._reassign)
        # Per slot, bumped when a writer of the slot is fenced (TieredStore.fence).
        self.generations = np.zeros(self.num_slots, dtype=np.uint64)
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def max_stride(self) -> int:
        """The largest slot this tier can hold (a chunk)."""
        return self.geometry.chunk_bytes

    def stride_of(self, slot: int) -> int:
        """The size class (slot stride) of a slot."""
        return self.geometry.stride_of(slot)

    def _reassign(self, chunk: int, stride: int) -> None:
        """A chunk that last held another class's slots (or none) is handed to class `stride`:
        the medium forgets the old slots' blocks (the allocator then records the new stride)."""

    def view(self, slot: int) -> torch.Tensor | None:
        """A uint8 tensor of the slot's stride aliasing the slot, or None for a durable tier."""
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
        g, alloc = self.geometry, self.allocator
        if g.single:
            capacity, used = self.num_slots * self.slot_nbytes, alloc.used_count * self.slot_nbytes
            slots = self.num_slots
        else:
            capacity = g.data_bytes
            used = sum(alloc.chunk_used(c) * alloc.chunk_class(c) for c in range(g.num_chunks))
            slots = sum(g.slots_per_chunk(alloc.chunk_class(c)) for c in range(g.num_chunks))
            slots += alloc.pool_count * g.ids_per_chunk  # the pool's chunks, counted as smallest slots
        return {
            "name": self.name,
            "medium": self.medium,
            "slot_bytes": self.slot_nbytes,
            "slots": slots,
            "used_slots": alloc.used_count,
            "capacity_bytes": capacity,
            "used_bytes": used,
            "bytes_written": self.bytes_written,
            "bytes_read": self.bytes_read,
            **({} if g.single else {"chunk_bytes": g.chunk_bytes, "chunks": g.num_chunks,
                                    "free_chunks": alloc.pool_count, "chunks_reassigned": alloc.reassigned}),
        }

    def class_stats(self) -> dict[int, dict]:
        """Per class (stride): chunks, slots and slots in use."""
        g, alloc = self.geometry, self.allocator
        out: dict[int, dict] = {}
        for c in range(g.num_chunks):
            stride = alloc.chunk_class(c)
            if stride:
                row = out.setdefault(stride, {"chunks": 0, "slots": 0, "used_slots": 0})
                row["chunks"] += 1
                row["slots"] += g.slots_per_chunk(stride)
                row["used_slots"] += alloc.chunk_used(c)
        return out


class MemoryTier(Tier):
    """A tier whose slots are rows of one uint8 tensor (host shared memory, or device memory)."""

    arena: torch.Tensor  # [num_slots, slot_stride] uint8 (one class), or SlotRows over a flat one
    durable = False

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


def memory_geometry(classes: SizeClasses, capacity_bytes: int, what: str) -> Geometry:
    """A memory tier's geometry: its capacity is all slots (metadata lives beside it)."""
    if classes.single:
        slots_for(capacity_bytes, classes.slot_nbytes, what)  # the error message of old
    return classes.geometry(capacity_bytes, what)
