"""Size classes: how a tier's capacity is carved for blocks of several sizes.

A *class* is a slot size (its stride: a multiple of 4 KiB, so direct I/O can use any slot as its
buffer). A block goes to the smallest class that fits it; with `auto` classes, a block that no
class fits within `MAX_ROUNDING_LOSS` gets a class of its own size (rounded up to a page, and to
the smallest slot `unit`), so at most a quarter of a slot is ever lost to rounding for blocks of
at least three pages (and `unit`).

Capacity is shared between classes in *chunks*: a tier is `num_chunks` chunks of `chunk_bytes`;
a chunk is handed to one class when that class needs a slot and has none free, and holds
`min(ids_per_chunk, chunk_bytes // stride)` of its slots; a chunk whose last block left goes back
to the pool, for any class. (The store also moves a chunk from a class holding more than its
share of the tier to one holding less: see TieredStore.)

Slot numbers are dense: slot `chunk * ids_per_chunk + i` is the i-th slot of its chunk, at byte
`chunk * chunk_bytes + i * stride(chunk)`. Per-slot metadata (generations, the host directory,
the NVMe headers) is sized for `num_chunks * ids_per_chunk` numbers, `ids_per_chunk` being
`chunk_bytes // unit`. `strides[chunk]` is kept by the medium (in the host arena's shared memory,
in the NVMe file's chunk table), so a reader in another process or after a restart finds every
slot's bytes.

The one-class geometry of `slot_bytes` is the degenerate case: one slot per chunk, a chunk per
slot, every chunk of that stride from the start: byte for byte the arena before size classes.
"""
from __future__ import annotations

import dataclasses
from array import array
from typing import Callable, Iterable, Sequence

import numpy as np

from kvstore.errors import BlockStateError, ConfigError

PAGE = 4096
MAX_ROUNDING_LOSS = 0.25  # the most of a slot an `auto` class may leave unused (blocks of >= 3 pages)
MAX_CLASSES = 32
MIN_CHUNKS = 8  # a tier smaller than MIN_CHUNKS chunks of chunk_bytes is cut into MIN_CHUNKS smaller ones


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def rounding_loss(nbytes: int, stride: int) -> float:
    """The fraction of a slot of `stride` bytes that a block of `nbytes` leaves unused."""
    return (stride - nbytes) / stride


@dataclasses.dataclass(frozen=True)
class SizeClasses:
    """Which slot sizes a node's tiers have: one (`single`, the `slot_bytes` setting), a declared
    list, or classes derived from the blocks seen (`auto`), optionally on top of declared ones."""

    declared: tuple[int, ...] = ()  # strides
    auto: bool = True
    unit: int = 16 * 1024  # the smallest slot: per-slot metadata is sized for capacity / unit
    chunk_bytes: int = 64 * 1024**2
    single: bool = False
    slot_nbytes: int = 0  # single: the largest block (slot_bytes as given; its stride rounds it up)

    def __post_init__(self) -> None:
        if self.single and len(self.declared) != 1:
            raise ConfigError("a one-class geometry needs exactly one slot size")
        for stride in self.declared:
            if stride < 1 or stride % PAGE:
                raise ConfigError(f"block size class {stride} is not a positive multiple of {PAGE}")
        if not self.declared and not self.auto:
            raise ConfigError("block_sizes names no size and not auto: no block could be stored")
        if self.unit < PAGE or self.unit % PAGE:
            raise ConfigError(f"min_slot_bytes={self.unit!r} must be a positive multiple of {PAGE}")
        if self.chunk_bytes < self.unit:
            raise ConfigError(f"chunk_bytes={self.chunk_bytes!r} is smaller than min_slot_bytes={self.unit!r}")

    @classmethod
    def one(cls, slot_nbytes: int) -> "SizeClasses":
        """The one class of the legacy `slot_bytes` setting (blocks larger are refused)."""
        if not isinstance(slot_nbytes, int) or slot_nbytes < 1:
            raise ConfigError(f"slot_nbytes={slot_nbytes!r} must be positive")
        stride = round_up(slot_nbytes)
        return cls((stride,), auto=False, unit=stride, chunk_bytes=stride, single=True, slot_nbytes=slot_nbytes)

    @classmethod
    def of(cls, sizes: Iterable[int] = (), auto: bool = True, min_slot_bytes: int = 16 * 1024,
           chunk_bytes: int = 64 * 1024**2) -> "SizeClasses":
        """Classes for block sizes (bytes; each becomes a class of its size rounded up to a page)."""
        strides = tuple(sorted({round_up(int(s)) for s in sizes}))
        if len(strides) > MAX_CLASSES:
            raise ConfigError(f"block_sizes names {len(strides)} sizes; at most {MAX_CLASSES}")
        unit = round_up(min_slot_bytes) if auto else min(strides, default=round_up(min_slot_bytes))
        if auto and strides:
            unit = min(unit, strides[0])
        return cls(strides, auto=auto, unit=unit, chunk_bytes=round_up(chunk_bytes))

    def describe(self) -> str:
        if self.single:
            return f"one slot size of {self.declared[0]} bytes (slot_bytes)"
        sizes = ", ".join(str(s) for s in self.declared)
        if self.auto:
            return f"sizes derived from the blocks seen{f' besides {sizes}' if sizes else ''}"
        return f"block sizes {sizes} (block_sizes)"

    def class_for(self, nbytes: int, existing: Sequence[int], largest: int) -> int | None:
        """The stride a block of `nbytes` goes to: the smallest class that fits it (within the
        rounding bound, for `auto`), else a new one (`auto`); None if none may. `existing` are
        the classes in use, `largest` the largest slot every tier can hold (a chunk)."""
        if self.single:
            return self.declared[0] if nbytes <= self.slot_nbytes and self.declared[0] <= largest else None
        own = max(round_up(nbytes), self.unit)  # the class `auto` would make: nothing loses less
        candidates = sorted(set(self.declared).union(existing))
        for stride in candidates:
            if nbytes <= stride <= largest and (not self.auto or stride <= own
                                                or rounding_loss(nbytes, stride) <= MAX_ROUNDING_LOSS):
                return stride
        if not self.auto:
            return None
        stride = own
        if stride > largest:
            return None
        if len(candidates) >= MAX_CLASSES:  # no class of its own: the smallest that fits, whatever it loses
            return next((s for s in candidates if nbytes <= s <= largest), None)
        return stride

    def geometry(self, capacity_bytes: int, what: str,
                 size: Callable[[int, int, int], int] | None = None) -> "Geometry":
        """The geometry of a tier of at most `capacity_bytes`. `size(chunk_bytes, ids_per_chunk,
        num_chunks)` is what the medium needs for one (default: the chunks alone; a file adds its
        superblock, chunk table and headers)."""
        if self.single:
            chunk, ids = self.declared[0], 1
        else:
            chunk = self.chunk_bytes
            if capacity_bytes // chunk < MIN_CHUNKS:  # a small tier: smaller chunks
                chunk = max(self.unit, capacity_bytes // MIN_CHUNKS // PAGE * PAGE)
            ids = chunk // self.unit
        size = size or (lambda c, i, n: n * c)
        low, high = 0, capacity_bytes // chunk  # the most chunks whose size fits: a binary search
        while low < high:
            mid = (low + high + 1) // 2
            if size(chunk, ids, mid) <= capacity_bytes:
                low = mid
            else:
                high = mid - 1
        if low < 1:
            if self.single:
                raise ConfigError(f"{what}: {capacity_bytes} bytes hold no slot of {chunk} bytes; give it more space")
            raise ConfigError(f"{what}: {capacity_bytes} bytes hold no chunk of {chunk} bytes "
                              f"(min_slot_bytes={self.unit}); give it more space")
        if self.single:
            return Geometry.single(chunk, low)
        return Geometry(chunk, ids, low)


class Geometry:
    """Where each slot of a tier lies (see the module doc). `strides` may be a view of the
    medium's own table (shared memory); the tier changes it only through `ChunkAllocator`."""

    def __init__(self, chunk_bytes: int, ids_per_chunk: int, num_chunks: int,
                 strides: np.ndarray | None = None, single: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        self.ids_per_chunk = ids_per_chunk
        self.num_chunks = num_chunks
        self.num_slots = num_chunks * ids_per_chunk
        self.single = single
        self.strides = np.zeros(num_chunks, dtype=np.uint64) if strides is None else strides

    @classmethod
    def single(cls, stride: int, num_slots: int, strides: np.ndarray | None = None) -> "Geometry":
        g = cls(stride, 1, num_slots, strides, single=True)
        g.strides[:] = stride
        return g

    @property
    def data_bytes(self) -> int:
        return self.num_chunks * self.chunk_bytes

    def slots_per_chunk(self, stride: int) -> int:
        return min(self.ids_per_chunk, self.chunk_bytes // stride) if stride else 0

    def stride_of(self, slot: int) -> int:
        return int(self.strides[slot // self.ids_per_chunk])

    def offset(self, slot: int) -> int:
        chunk, i = divmod(slot, self.ids_per_chunk)
        return chunk * self.chunk_bytes + i * int(self.strides[chunk])

    def chunk_ids(self, chunk: int) -> range:
        """Every slot number of a chunk (slots of its class and unused numbers)."""
        return range(chunk * self.ids_per_chunk, (chunk + 1) * self.ids_per_chunk)

    def is_slot(self, slot: int) -> bool:
        chunk, i = divmod(slot, self.ids_per_chunk)
        return 0 <= chunk < self.num_chunks and i < self.slots_per_chunk(int(self.strides[chunk]))

    def describe(self) -> dict:
        return {"chunk_bytes": self.chunk_bytes, "chunks": self.num_chunks, "slot_numbers": self.num_slots}


class SlotRows:
    """Slot `s` as row `s` of a [num_slots, stride] array, for an arena whose slots differ in size:
    `rows[slot, a:b]` is bytes a..b of the slot (torch or NumPy, like `flat`). A one-class arena
    is a real 2-D array instead."""

    def __init__(self, flat, geometry: Geometry) -> None:
        self.flat = flat
        self.geometry = geometry

    def _row(self, slot: int):
        start = self.geometry.offset(int(slot))
        return self.flat[start:start + self.geometry.stride_of(int(slot))]

    def __getitem__(self, index):
        if isinstance(index, tuple):
            slot, columns = index
            return self._row(slot)[columns]
        return self._row(index)

    def __setitem__(self, index, value) -> None:
        if isinstance(index, tuple):
            slot, columns = index
            self._row(slot)[columns] = value
        else:
            self._row(index)[:] = value

    def numpy(self) -> "SlotRows":
        return SlotRows(self.flat.numpy(), self.geometry)

    def sum(self):
        return self.flat.sum()

    def zero_(self):
        self.flat.zero_()
        return self

    @property
    def device(self):
        return self.flat.device


def mark_claimed(used: bytearray, slots: Iterable[int] | np.ndarray) -> np.ndarray:
    """Sets `used[slot]` for every slot, in a few array operations; refuses (changing nothing) a
    slot in use already or named twice. Returns `used` as an array."""
    claimed = np.asarray(slots if isinstance(slots, np.ndarray) else list(slots), dtype=np.int64)
    flags = np.frombuffer(used, dtype=np.uint8)
    taken = claimed[flags[claimed] != 0]
    if taken.size:
        raise BlockStateError(f"slot {int(taken[0])} is already in use")
    before = int(np.count_nonzero(flags))
    flags[claimed] = 1
    if int(np.count_nonzero(flags)) - before != claimed.size:  # a slot named twice
        flags[claimed] = 0
        values, counts = np.unique(claimed, return_counts=True)
        raise BlockStateError(f"slot {int(values[counts > 1][0])} is already in use")
    return flags


def _int64s(values: np.ndarray) -> array:
    """A Python int64 array of `values`, made with one copy (a list of millions takes ~10x longer)."""
    return array("q", np.ascontiguousarray(values, dtype=np.int64).tobytes())


class ChunkAllocator:
    """O(1) allocate and free of slots by class, chunks handed to classes on demand.

    `alloc(stride)` takes a free slot of a chunk of that class, else a chunk from the pool (the
    tier's `reassign(chunk, stride)` is called first when the chunk last held another class, so
    the medium forgets its old slots); `free(slot)` gives it back, and a chunk left empty returns
    to the pool. Double frees are refused.
    """

    def __init__(self, geometry: Geometry, reassign: Callable[[int, int], None] | None = None) -> None:
        self.geometry = geometry
        self.num_slots = geometry.num_slots
        self._reassign = reassign
        # Per-chunk state in typed arrays, not lists: a tier of millions of chunks builds them
        # (and rebuilds them at recovery) with one copy each, and indexes them as fast.
        self._used = bytearray(self.num_slots)
        self._chunk_used = _int64s(np.zeros(geometry.num_chunks, dtype=np.int64))
        self._chunk_class = _int64s(np.zeros(geometry.num_chunks, dtype=np.int64))  # 0: in the pool
        self._chunk_free: dict[int, list[int]] = {}  # chunk -> its free slots, built when first needed
        self._open: dict[int, dict[int, None]] = {}  # class -> its chunks with free slots, oldest first
        self._chunks_of: dict[int, int] = {}  # class -> chunks it holds
        self._pool = _int64s(np.arange(geometry.num_chunks - 1, -1, -1))  # pop() hands out chunk 0 first
        self.used_count = 0
        self.reassigned = 0  # chunks that changed class

    # -- slots -----------------------------------------------------------------------------

    def _only(self, stride: int | None) -> int:
        if stride is None:
            if not self.geometry.single:
                raise BlockStateError("a tier with several size classes allocates by class")
            return self.geometry.chunk_bytes
        return stride

    def alloc(self, stride: int | None = None) -> int | None:
        stride = self._only(stride)
        g = self.geometry
        chunks = self._open.get(stride)
        if chunks:
            chunk = next(iter(chunks))
            free = self._free_list(chunk)
            slot = free.pop()
            if not free:
                del chunks[chunk]
        else:
            if not self._pool or stride > g.chunk_bytes:
                return None
            chunk = self._pool.pop()
            try:
                self._take(chunk, stride)
            except BaseException:  # the medium failed to forget the chunk's old slots: it stays pooled
                self._pool.append(chunk)
                raise
            first = chunk * g.ids_per_chunk
            rest = list(range(first + g.slots_per_chunk(stride) - 1, first, -1))
            if rest:
                self._chunk_free[chunk] = rest
                self._open.setdefault(stride, {})[chunk] = None
            slot = first
        self._used[slot] = 1
        self._chunk_used[chunk] += 1
        self.used_count += 1
        return slot

    def _take(self, chunk: int, stride: int) -> None:
        if int(self.geometry.strides[chunk]) != stride:
            if self._reassign is not None:
                self._reassign(chunk, stride)
            self.geometry.strides[chunk] = stride
            self.reassigned += 1
        self._chunk_class[chunk] = stride
        self._chunks_of[stride] = self._chunks_of.get(stride, 0) + 1

    def _free_list(self, chunk: int) -> list[int]:
        free = self._chunk_free.get(chunk)
        if free is None:
            first = chunk * self.geometry.ids_per_chunk
            last = first + self.geometry.slots_per_chunk(self._chunk_class[chunk])
            free = self._chunk_free[chunk] = [s for s in range(last - 1, first - 1, -1) if not self._used[s]]
        return free

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise BlockStateError(f"slot {slot} is not allocated")
        self._used[slot] = 0
        self.used_count -= 1
        chunk = slot // self.geometry.ids_per_chunk
        stride = self._chunk_class[chunk]
        self._chunk_used[chunk] -= 1
        if self._chunk_used[chunk] == 0:  # back to the pool, for any class
            self._open.get(stride, {}).pop(chunk, None)
            self._chunk_free.pop(chunk, None)
            self._chunk_class[chunk] = 0
            self._chunks_of[stride] -= 1
            self._pool.append(chunk)
            return
        free = self._chunk_free.get(chunk)
        if free is not None:
            free.append(slot)
        self._open.setdefault(stride, {})[chunk] = None

    def claim(self, slots: Iterable[int] | np.ndarray) -> None:
        """Marks specific slots used (recovery of a durable tier), in a few array operations over
        the whole tier. Their chunks go to the classes `geometry.strides` names. Only before any
        other allocation."""
        used = mark_claimed(self._used, slots)
        g = self.geometry
        counts = np.bincount(np.flatnonzero(used) // g.ids_per_chunk, minlength=g.num_chunks)
        self.used_count = int(counts.sum())
        self._chunk_used = _int64s(counts)
        strides = g.strides.astype(np.int64)
        held = counts > 0
        self._chunk_class = _int64s(np.where(held, strides, 0))
        self._chunk_free = {}
        self._pool = _int64s(np.flatnonzero(~held)[::-1])
        self._open, self._chunks_of = {}, {}
        for stride in [g.chunk_bytes] if g.single else np.unique(strides[held]).tolist():
            mine = held & (strides == stride)
            self._chunks_of[stride] = int(mine.sum())
            open_chunks = np.flatnonzero(mine & (counts < g.slots_per_chunk(stride)))
            if open_chunks.size:
                self._open[stride] = dict.fromkeys(open_chunks.tolist())

    # -- chunks ----------------------------------------------------------------------------

    def chunks_of(self, stride: int) -> int:
        return self._chunks_of.get(stride, 0)

    def classes(self) -> dict[int, int]:
        """class -> chunks it holds (classes holding none left out)."""
        return {s: n for s, n in self._chunks_of.items() if n}

    def chunk_class(self, chunk: int) -> int:
        return self._chunk_class[chunk]

    def chunk_used(self, chunk: int) -> int:
        return self._chunk_used[chunk]

    def chunks_held(self, stride: int) -> list[int]:
        """The chunks of a class, fewest blocks first (the cheapest to empty)."""
        mine = np.flatnonzero(np.frombuffer(self._chunk_class, dtype=np.int64) == stride)
        used = np.frombuffer(self._chunk_used, dtype=np.int64)[mine]
        return mine[np.argsort(used, kind="stable")].tolist()

    def used_in(self, chunk: int) -> list[int]:
        return [s for s in self.geometry.chunk_ids(chunk) if self._used[s]]

    @property
    def pool_count(self) -> int:
        return len(self._pool)

    def free_slots(self, stride: int | None = None) -> int:
        """Slots a class could still get without evicting: free ones in its chunks, plus the pool's."""
        stride = self._only(stride)
        g = self.geometry
        mine = sum(g.slots_per_chunk(stride) - self._chunk_used[c] for c in self._open.get(stride, ()))
        return mine + len(self._pool) * (g.slots_per_chunk(stride) if stride <= g.chunk_bytes else 0)

    @property
    def free_count(self) -> int:
        """Slot numbers not in use (in a one-class tier: free slots)."""
        return self.num_slots - self.used_count
