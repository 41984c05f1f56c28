"""The NVMe tier: one preallocated file per node, direct I/O, self-describing slots.

File layout, format version 3 (every part 4 KiB aligned):

    [superblock page][chunk table: a stride per chunk][header region: one 128-byte header per
    slot number][chunk 0][chunk 1]...

The payload is carved into chunks, each holding slots of one size class (tiers/geometry.py);
the chunk table says which (0: never used), so a restart finds every slot again. A chunk that
goes to another class has its headers erased first, then its table entry rewritten: a crash in
between leaves an empty chunk of its old class, never a header naming bytes at another place.

A slot header holds the block's key, layout id, parent key, length, a generation number, an
xxh3-64 checksum of the payload and a checksum of the header itself. The headers lie together so
that opening the tier reads only them, in large sequential chunks, checked a chunk at a time with
numpy (while the next chunk is read): open time is linear in slots and close to a raw read of the
header region, which is 1/16,000 of the file with 2 MiB blocks. A header that fails its checksum
is dropped at open and counted.

A write puts the payload first, then its header (direct I/O writes whole pages, so the header's
page is read, patched and written back under a lock for that page). A crash between the two
leaves the slot's old header over new bytes; a read checks every payload against the checksum the
block was committed with, so a torn or corrupted block is dropped and counted, never served. A
read takes the payload alone; the header is read only to tell why a block failed.

Version 1 files (a 4 KiB header page before each payload, which made opening a tier read a page
per slot) and version 2 files (one slot size for the whole file, no chunk table) are refused with
a message saying so; their blocks cannot be adopted. Opening reads the headers of the chunks in
use only, so open time follows the slots in use, not the slot numbers.

The file is preallocated at open (`posix_fallocate`), so a full disk shows up then, as a clear
error, never later in the middle of a write. I/O runs on a small thread pool (`pwritev` and
`preadv` release the GIL) with O_DIRECT, falling back to buffered I/O, with a warning, where the
filesystem refuses it (tmpfs, some overlay filesystems).
"""
from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from kvstore.errors import ConfigError, CorruptBlockError, TierIOError
from kvstore.integrity import checksum
from kvstore.tiers.base import PAGE, SlotMeta, Tier, round_up, size_classes
from kvstore.tiers.geometry import Geometry, SizeClasses

log = logging.getLogger(__name__)

FILE_NAME = "kvstore-blocks.dat"
_SUPER_MAGIC = b"KVSTNVME"
# magic, version, slot_nbytes (one class; 0 for several), chunk_bytes, slot numbers per chunk, chunks
_SUPER = struct.Struct("<8sIQQQQ")
_SUPER_HEAD = struct.Struct("<8sI")  # what every version starts with
_VERSION = 3
_VERSIONS = {1: "a header page before each payload", 2: "one slot size for the whole file, no chunk table"}

# A header is 16 little-endian uint64 words, so numpy reads thousands at once as a 2-D array.
HEADER_BYTES = 128
_WORDS = HEADER_BYTES // 8
_MAGIC, _KEY, _LAYOUT, _PARENT, _NBYTES, _GENERATION, _PAYLOAD_SUM, _HEADER_SUM = (
    0, slice(1, 3), slice(3, 5), slice(5, 7), 7, 8, 9, 15)  # words 10-14 are reserved (zero)
_SLOT_MAGIC = int.from_bytes(b"KVBLOCK2", "little")
_NO_PARENT = bytes(16)
# The header checksum's constants: part of the file format, never to change.
_SUM_WEIGHTS = np.array([
    0x6cc6be1805fdf179, 0x4ba71ab7ac0504a5, 0xdae85d0928398f9f, 0x0b8e90e9f6466d5f, 0x4e6980ee651011cb,
    0xc4e08e67b822b63b, 0x28b58ab4d47a9a79, 0xa02bff2f31bfa6af, 0x1414f6b506d002db, 0x25318bf27b885975,
    0x3d3db70b0d99ed21, 0x87a152f460ca36ff, 0x167dd69a83f614dd, 0xe7fb3f46c9374389, 0xfda536a3a434d6f9,
], dtype=np.uint64)
_SUM_MIX = np.uint64(0xf2a74de452e6b439)
_SCAN_CHUNK = 2 << 20  # bytes of headers read at a time at open
_SCAN_AHEAD = 2  # chunks being read while one is checked
_PAGE_LOCKS = 64


def header_sums(words: np.ndarray) -> np.ndarray:
    """Each header's checksum (rows of `_WORDS` uint64 words; the last holds the checksum).

    A weighted sum of the other words, then mixed: every weight is odd, so any change confined to
    one word always changes the sum. Not xxh3, which hashes one buffer per call: a million headers
    are checked here in a handful of array operations.
    """
    h = words[:, :_HEADER_SUM] @ _SUM_WEIGHTS  # wraps modulo 2^64
    h ^= h >> np.uint64(31)
    h *= _SUM_MIX
    h ^= h >> np.uint64(29)
    return h


def pack_headers(keys: Sequence[bytes], layout_ids: Sequence[bytes], parents: Sequence[bytes | None],
                 nbytes: Sequence[int], generations: Sequence[int], payload_sums: Sequence[int]) -> np.ndarray:
    """Headers for N blocks, as an N x `_WORDS` uint64 array (its bytes are what goes to disk)."""
    n = len(keys)
    words = np.zeros((n, _WORDS), dtype="<u8")
    words[:, _MAGIC] = _SLOT_MAGIC
    words[:, _KEY] = np.frombuffer(b"".join(keys), dtype="<u8").reshape(n, 2)
    words[:, _LAYOUT] = np.frombuffer(b"".join(layout_ids), dtype="<u8").reshape(n, 2)
    words[:, _PARENT] = np.frombuffer(b"".join(p or _NO_PARENT for p in parents), dtype="<u8").reshape(n, 2)
    words[:, _NBYTES] = nbytes
    words[:, _GENERATION] = generations
    words[:, _PAYLOAD_SUM] = payload_sums
    words[:, _HEADER_SUM] = header_sums(words)
    return words


def pack_superblock(slot_nbytes: int, num_slots: int, geometry: Geometry | None = None) -> bytes:
    """The file's first page: what it is, its format version and its geometry (one class of
    `slot_nbytes` and `num_slots` slots, or `geometry`)."""
    page = bytearray(PAGE)
    if geometry is None:
        geometry = Geometry.single(round_up(slot_nbytes), num_slots)
    _SUPER.pack_into(page, 0, _SUPER_MAGIC, _VERSION, slot_nbytes if geometry.single else 0,
                     geometry.chunk_bytes, geometry.ids_per_chunk, geometry.num_chunks)
    return bytes(page)


def table_bytes(num_chunks: int) -> int:
    return round_up(num_chunks * 8)


def header_region_bytes(num_slots: int) -> int:
    return round_up(num_slots * HEADER_BYTES)


def geometry_bytes(chunk_bytes: int, ids_per_chunk: int, num_chunks: int) -> int:
    """The size of a tier file: superblock, chunk table, header region, chunks."""
    return (PAGE + table_bytes(num_chunks) + header_region_bytes(num_chunks * ids_per_chunk)
            + num_chunks * chunk_bytes)


def file_bytes(num_slots: int, slot_nbytes: int) -> int:
    """The size of a one-class tier file of `num_slots` slots of `slot_nbytes`."""
    return geometry_bytes(round_up(slot_nbytes), 1, num_slots)


def nvme_geometry(classes: SizeClasses | int, capacity_bytes: int) -> Geometry:
    """The geometry of a tier file of at most `capacity_bytes`."""
    classes = size_classes(classes)
    try:
        return classes.geometry(capacity_bytes, "nvme_tier_bytes", geometry_bytes)
    except ConfigError:
        if classes.single:
            raise ConfigError(
                f"nvme_tier_bytes={capacity_bytes} holds no slot of {classes.slot_nbytes} bytes (the file needs "
                f"{file_bytes(1, classes.slot_nbytes)} bytes for one: superblock, chunk table, header and "
                "payload)") from None
        raise


def num_slots_for(capacity_bytes: int, slot_nbytes: int) -> int:
    """How many slots of `slot_nbytes` a one-class tier file of at most `capacity_bytes` holds."""
    if slot_nbytes < 1:
        raise ConfigError(f"nvme_tier_bytes: slot_nbytes={slot_nbytes!r} must be positive")
    return nvme_geometry(slot_nbytes, capacity_bytes).num_slots


def read_superblock(path: str) -> tuple | None:
    """(version, slot_nbytes, chunk_bytes, ids_per_chunk, num_chunks) of a kvstore NVMe file of
    this version, (version,) of another, None if path is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SUPER.size)
    except OSError:
        return None
    if len(head) < _SUPER_HEAD.size or head[:8] != _SUPER_MAGIC:
        return None
    version = _SUPER_HEAD.unpack_from(head)[1]
    if version != _VERSION or len(head) < _SUPER.size:
        return (version,)
    return _SUPER.unpack(head)[1:]


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A page-aligned, prefaulted buffer (anonymous mappings start on a page boundary)."""
    buf = mmap.mmap(-1, round_up(nbytes))
    buf.write(bytes(len(buf)))
    return buf


def _u8(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


class NVMeTier(Tier):
    name = "nvme"
    medium = "DISK"

    def __init__(self, directory: str, classes: SizeClasses | int, capacity_bytes: int,
                 io_threads: int = 4, direct_io: bool = True) -> None:
        classes = size_classes(classes)
        super().__init__(classes, nvme_geometry(classes, capacity_bytes))
        self.path = os.path.join(directory, FILE_NAME)
        g = self.geometry
        self.file_bytes = geometry_bytes(g.chunk_bytes, g.ids_per_chunk, g.num_chunks)
        self._headers_at = PAGE + table_bytes(g.num_chunks)
        self._payloads_at = self._headers_at + header_region_bytes(self.num_slots)
        self.corrupt_dropped = 0
        self._local = threading.local()
        self._generation = itertools.count(1)
        # Direct I/O writes a header's whole page: two slots sharing a page must not interleave.
        self._page_locks = [threading.Lock() for _ in range(_PAGE_LOCKS)]
        self._table_lock = threading.Lock()
        self._found: np.ndarray | None = None  # at open: the slots holding a block, sorted
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise TierIOError(f"nvme_path={directory!r} cannot be created: {e.strerror}") from e
        existed = os.path.exists(self.path)
        self._fd, self.direct_io = self._open(direct_io)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-nvme")
        try:
            if existed:
                self._check_superblock()
                if not self.geometry.single:  # one class: every chunk is its slot, whatever the table says
                    self._read_table()
                self._found = self._scan()
            else:
                self._format()
        except BaseException:
            self._pool.shutdown(wait=True)  # no read of the scan may outlive the descriptor
            os.close(self._fd)
            raise

    # -- opening -------------------------------------------------------------------------

    def _open(self, direct_io: bool) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CREAT
        if direct_io:
            try:
                return os.open(self.path, flags | os.O_DIRECT, 0o600), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise TierIOError(f"cannot open NVMe tier file {self.path}: {e.strerror}") from e
                log.warning("the filesystem holding %s refuses O_DIRECT; the NVMe tier uses buffered I/O, "
                            "so reads may come from the page cache", self.path)
        try:
            return os.open(self.path, flags, 0o600), False
        except OSError as e:
            raise TierIOError(f"cannot open NVMe tier file {self.path}: {e.strerror}") from e

    def _format(self) -> None:
        try:
            os.posix_fallocate(self._fd, 0, self.file_bytes)
        except OSError as e:
            os.unlink(self.path)  # the caller closes the descriptor
            raise TierIOError(f"cannot preallocate {self.file_bytes} bytes for the NVMe tier at {self.path}: "
                              f"{e.strerror}; lower nvme_tier_bytes or free space") from e
        page = aligned_buffer(PAGE)
        page[:] = pack_superblock(self.slot_nbytes, self.num_slots, self.geometry)
        os.pwrite(self._fd, page, 0)
        if self.geometry.single:  # every chunk is the one class's slot from the start
            table = aligned_buffer(table_bytes(self.geometry.num_chunks))
            np.frombuffer(table, dtype="<u8", count=self.geometry.num_chunks)[:] = self.geometry.strides
            os.pwrite(self._fd, table, PAGE)
        os.fsync(self._fd)

    def _read_table(self) -> None:
        """The chunks' strides, from the chunk table (0: a chunk never used)."""
        n = self.geometry.num_chunks
        table = aligned_buffer(table_bytes(n))
        if os.preadv(self._fd, [table], PAGE) != len(table):
            raise TierIOError(f"{self.path}: short read of the chunk table")
        strides = np.frombuffer(table, dtype="<u8", count=n).astype(np.uint64)
        bad = np.flatnonzero((strides % PAGE != 0) | (strides > self.geometry.chunk_bytes))
        if bad.size:
            raise TierIOError(f"{self.path}: the chunk table is damaged (chunk {int(bad[0])} has slots of "
                              f"{int(strides[bad[0]])} bytes); remove the file to start afresh (its blocks are lost)")
        self.geometry.strides[:] = strides

    def _reassign(self, chunk: int, stride: int) -> None:
        # Headers first (a crash after them leaves an empty chunk of the old class), then the table.
        failed = self._put_headers({slot: bytes(HEADER_BYTES) for slot in self.geometry.chunk_ids(chunk)})
        if failed:
            raise next(iter(failed.values()))
        at = PAGE + chunk * 8
        page_offset = at - at % PAGE
        page = self._buffer("header", PAGE)
        with self._table_lock:
            if os.preadv(self._fd, [page], page_offset) != PAGE:
                raise TierIOError(f"{self.path}: short read of the chunk table at byte {page_offset}")
            struct.pack_into("<Q", page, at - page_offset, stride)
            if os.pwritev(self._fd, [page], page_offset) != PAGE:
                raise TierIOError(f"{self.path}: short write of the chunk table at byte {page_offset}")

    def _check_superblock(self) -> None:
        page = aligned_buffer(PAGE)
        if os.preadv(self._fd, [page], 0) != PAGE:
            raise TierIOError(f"{self.path} is shorter than one page; remove it to start afresh")
        magic, version = _SUPER_HEAD.unpack_from(page, 0)
        if magic != _SUPER_MAGIC:
            raise TierIOError(f"{self.path} is not a kvstore NVMe tier file")
        if version != _VERSION:
            what = f" ({_VERSIONS[version]})" if version in _VERSIONS else ""
            raise TierIOError(
                f"{self.path} is an NVMe tier file of format version {version}{what}; this kvstore reads version "
                f"{_VERSION} (size classes: chunks of slots, a chunk table; all slot headers in one region) and "
                "cannot adopt its blocks: remove the file to start afresh (its blocks are lost)")
        _, _, slot_nbytes, chunk_bytes, ids, num_chunks = _SUPER.unpack_from(page, 0)
        size = os.fstat(self._fd).st_size
        if ids < 1 or size < geometry_bytes(chunk_bytes, ids, num_chunks):
            raise TierIOError(f"{self.path} is {size} bytes, shorter than its {num_chunks} chunks need; it was "
                              "truncated: remove it to start afresh")
        g = self.geometry
        ours = (self.slot_nbytes if g.single else 0, g.chunk_bytes, g.ids_per_chunk, g.num_chunks)
        if (slot_nbytes, chunk_bytes, ids, num_chunks) != ours:
            def geometry(one, chunk, count, n):
                return (f"{n} slots of {one} bytes" if one else
                        f"{n} chunks of {chunk} bytes ({count} slot numbers each: block_sizes)")
            raise ConfigError(
                f"{self.path} holds {geometry(slot_nbytes, chunk_bytes, ids, num_chunks)}, but the configuration "
                f"asks for {geometry(*ours)}; restore slot_bytes/block_sizes/min_slot_bytes/chunk_bytes/"
                "nvme_tier_bytes or remove the file (its blocks are lost)")

    def _header_runs(self) -> list[tuple[int, int, int]]:
        """(first slot, count, stride) of the headers worth reading: the slots of the chunks in
        use, neighbours merged, each run at most `_SCAN_CHUNK` bytes of headers."""
        g = self.geometry
        most = _SCAN_CHUNK // HEADER_BYTES
        if g.single:  # every chunk is one slot of the one class: one run
            return [(first, min(most, self.num_slots - first), g.chunk_bytes)
                    for first in range(0, self.num_slots, most)]
        runs: list[list[int]] = []
        used = np.flatnonzero(g.strides)
        for chunk, stride in zip(used.tolist(), g.strides[used].tolist()):
            first, count = chunk * g.ids_per_chunk, g.slots_per_chunk(stride)
            if runs and runs[-1][2] == stride and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += count
            else:
                runs.append([first, count, stride])
        return [(first + at, min(most, count - at), stride) for first, count, stride in runs
                for at in range(0, count, most)]

    def _header_chunks(self) -> Iterator[tuple[int, np.ndarray, int]]:
        """(first slot, header rows, stride) of the slots in use, a run at a time, read ahead on
        the pool while the caller works on a run. The rows are a view of a buffer that is read
        into again: valid until the next run."""
        runs = self._header_runs()
        if not runs:
            return
        span = _SCAN_CHUNK + 2 * PAGE
        buffers = [aligned_buffer(span) for _ in range(min(_SCAN_AHEAD + 1, len(runs)))]

        def extent(first: int, count: int) -> tuple[int, int]:
            start = self._headers_at + first * HEADER_BYTES
            aligned = start - start % PAGE
            return aligned, round_up(start + count * HEADER_BYTES) - aligned

        def read(run: tuple[int, int, int], buf: mmap.mmap) -> None:
            offset, want = extent(run[0], run[1])
            got = os.preadv(self._fd, [memoryview(buf)[:want]], offset)
            if got != want:
                raise TierIOError(f"{self.path}: short read of the slot headers at byte {offset}: "
                                  f"{got} of {want} bytes")

        reads = deque(self._pool.submit(read, runs[i], buffers[i]) for i in range(len(buffers) - 1))
        for i, run in enumerate(runs):
            ahead = i + len(buffers) - 1
            if ahead < len(runs):
                reads.append(self._pool.submit(read, runs[ahead], buffers[ahead % len(buffers)]))
            reads.popleft().result()
            first, count, stride = run
            skip = (self._headers_at + first * HEADER_BYTES) % PAGE
            yield first, np.frombuffer(buffers[i % len(buffers)], dtype="<u8", count=count * _WORDS,
                                       offset=skip).reshape(count, _WORDS), stride

    def _scan(self) -> np.ndarray:
        """Which slots hold a block, from one pass over the headers of the chunks in use; keeps
        the newest copy of a key and claims the slots. Only a few bytes a block are kept:
        `recovered` reads the headers again as the store indexes them, so a tier of many millions
        of slots never holds all its headers in memory."""
        found_slots: list[np.ndarray] = []
        found_words: list[np.ndarray] = []  # the first word of each key: to find copies
        max_generation = 0
        damaged: list[np.ndarray] = []
        for first, words, stride in self._header_chunks():
            sound = self._sound(words, stride)
            rows = np.flatnonzero(sound)
            if rows.size:
                found_slots.append(rows + first)
                found_words.append(words[rows, 1].copy())
                max_generation = max(max_generation, int(words[rows, _GENERATION].max()))
            if rows.size != len(words):
                bad = np.flatnonzero(~sound & (words[:, _MAGIC] != 0))  # all zeros: never written, or erased
                if bad.size:
                    damaged.append(bad + first)
        if damaged:
            bad = np.concatenate(damaged)
            self.corrupt_dropped += int(bad.size)
            log.warning("NVMe tier %s: dropping %d damaged slots at open (the header fails its checksum): "
                        "slots %s%s", self.path, bad.size, ", ".join(map(str, bad[:10].tolist())),
                        ", ..." if bad.size > 10 else "")
        slots = np.concatenate(found_slots) if found_slots else np.zeros(0, dtype=np.int64)
        first_words = np.concatenate(found_words) if found_words else np.zeros(0, dtype=np.uint64)
        slots = self._drop_older_copies(slots, first_words)
        self._generation = itertools.count(max_generation + 1)
        self.allocator.claim(slots)
        if slots.size or damaged:
            log.info("NVMe tier %s: recovered %d blocks, dropped %d corrupt slots", self.path, slots.size,
                     self.corrupt_dropped)
        return slots

    def _drop_older_copies(self, slots: np.ndarray, first_words: np.ndarray) -> np.ndarray:
        """Of slots whose headers name the same key, keeps the one of the highest generation;
        returns the slots kept (sorted).

        Copies are rare (a crash between writing a block anew and erasing its old slot): a sort of
        every key's first word tells whether there are any; only slots sharing one are read again
        and compared in full.
        """
        ordered = np.sort(first_words)
        if not (ordered[1:] == ordered[:-1]).any():
            return slots
        order = np.argsort(first_words, kind="stable")
        ordered = first_words[order]
        shared = np.flatnonzero(ordered[1:] == ordered[:-1])
        newest: dict[bytes, tuple[int, int]] = {}  # key -> (generation, slot)
        dropped: list[int] = []
        for slot in np.unique(slots[order[np.concatenate([shared, shared + 1])]]).tolist():
            meta, generation = self._read_header(slot)  # sound at the scan, just now
            held = newest.get(meta.key)
            if held is None:
                newest[meta.key] = (generation, slot)
                continue
            older, newer = sorted([held, (generation, slot)])
            dropped.append(older[1])
            newest[meta.key] = newer
        return np.setdiff1d(slots, np.array(dropped, dtype=slots.dtype)) if dropped else slots

    def _sound(self, headers: np.ndarray, stride: int) -> np.ndarray:
        """Per header row: well-formed, its checksum holds, and its length fits the slot."""
        limit = self.slot_nbytes if self.geometry.single else stride
        return ((headers[:, _MAGIC] == _SLOT_MAGIC) & (header_sums(headers) == headers[:, _HEADER_SUM])
                & (headers[:, _NBYTES] <= limit))

    def recovered(self) -> Iterator[tuple[int, SlotMeta]]:
        """The blocks found at open, their headers read again a chunk at a time; to be taken
        once, before the tier is written."""
        found, self._found = self._found, None
        if found is None or not found.size:
            return
        for first, words, _ in self._header_chunks():
            lo, hi = np.searchsorted(found, [first, first + len(words)])
            if hi > lo:
                rows = found[lo:hi] - first
                yield from _metas(rows + first, words[rows])

    # -- slots ---------------------------------------------------------------------------

    def header_offset(self, slot: int) -> int:
        return self._headers_at + slot * HEADER_BYTES

    def payload_offset(self, slot: int) -> int:
        return self._payloads_at + self.geometry.offset(slot)

    def _buffer(self, kind: str, nbytes: int) -> mmap.mmap:
        """A per-thread aligned buffer, allocated and prefaulted once per thread."""
        buf = getattr(self._local, kind, None)
        if buf is None or len(buf) < nbytes:  # the bounce buffer grows to the largest class used
            buf = aligned_buffer(nbytes)
            setattr(self._local, kind, buf)
        return buf

    def _header_page(self, slot: int) -> tuple[int, int]:
        """(file offset of the page holding the slot's header, the header's offset in it)."""
        offset = self.header_offset(slot)
        return offset - offset % PAGE, offset % PAGE

    def _put_headers(self, headers: dict[int, bytes]) -> dict[int, TierIOError]:
        """Writes slot -> header, each header page read, patched and written back once (a batch
        of neighbouring slots shares a few pages), pages in parallel. Returns the slots whose
        page failed, with the error."""
        by_page: dict[int, list[tuple[int, int, bytes]]] = {}
        for slot, header in headers.items():
            page_offset, at = self._header_page(slot)
            by_page.setdefault(page_offset, []).append((slot, at, header))

        def put_page(page_offset: int, patches: list[tuple[int, int, bytes]]) -> TierIOError | None:
            page = self._buffer("header", PAGE)
            try:
                with self._page_locks[page_offset // PAGE % _PAGE_LOCKS]:
                    if os.preadv(self._fd, [page], page_offset) != PAGE:
                        return TierIOError(f"short read of the header page at byte {page_offset} of {self.path}")
                    for _, at, header in patches:
                        page[at:at + HEADER_BYTES] = header
                    if os.pwritev(self._fd, [page], page_offset) != PAGE:
                        return TierIOError(f"short write of the header page at byte {page_offset} of {self.path}")
            except OSError as e:
                return TierIOError(f"I/O on the header page at byte {page_offset} of {self.path} failed: {e.strerror}")
            return None

        pages = list(by_page.items())
        errors = [put_page(*pages[0])] if len(pages) == 1 else list(self._pool.map(lambda p: put_page(*p), pages))
        return {slot: err for (_, patches), err in zip(pages, errors) if err is not None for slot, _, _ in patches}

    def _read_header(self, slot: int) -> tuple[SlotMeta, int] | None:
        """(the block the slot's header names, its generation); None for a slot never written or
        erased."""
        page_offset, at = self._header_page(slot)
        page = self._buffer("header", PAGE)
        if os.preadv(self._fd, [page], page_offset) != PAGE:
            raise TierIOError(f"short read of the header page of slot {slot} of {self.path}")
        words = np.frombuffer(page, dtype="<u8", count=_WORDS, offset=at).reshape(1, _WORDS)
        if not words[0, _MAGIC]:
            return None
        if not self._sound(words, self.stride_of(slot))[0]:
            raise CorruptBlockError(f"slot {slot} of {self.path}: the header fails its checksum")
        _, meta = next(_metas(np.array([slot]), words.copy()))
        return meta, int(words[0, _GENERATION])

    def _payload_target(self, t: torch.Tensor, length: int) -> memoryview | None:
        """`t` itself when direct I/O can use it (CPU, aligned, long enough); else None."""
        if (t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % PAGE == 0
                and t.numel() >= length):
            return _u8(t)[:length]
        return None

    def _write_payload(self, slot: int, src: torch.Tensor, meta: SlotMeta) -> int:
        """Writes the block's bytes (not its header); returns their checksum."""
        length = round_up(meta.nbytes)
        payload = self._payload_target(src, length)
        if payload is None:
            bounce = self._buffer("bounce", length)
            np.frombuffer(bounce, dtype=np.uint8, count=meta.nbytes)[:] = src[:meta.nbytes].cpu().numpy()
            payload = memoryview(bounce)[:length]
        # A block moving down keeps the checksum it was committed with: if its bytes were damaged
        # on the way, the read that brings them back finds out.
        payload_sum = meta.checksum if meta.checksum is not None else checksum(payload[:meta.nbytes])
        written = os.pwritev(self._fd, [payload], self.payload_offset(slot))
        if written != length:
            raise TierIOError(f"short write to slot {slot} of {self.path}: {written} of {length} bytes")
        return payload_sum

    def _read_one(self, slot: int, dst: torch.Tensor, meta: SlotMeta) -> None:
        length = round_up(meta.nbytes)
        payload = self._payload_target(dst, length)
        direct = payload is not None
        if not direct:
            payload = memoryview(self._buffer("bounce", length))[:length]
        got = os.preadv(self._fd, [payload], self.payload_offset(slot))
        if got != length:
            raise TierIOError(f"short read from slot {slot} of {self.path}: {got} of {length} bytes")
        expected = meta.checksum if meta.checksum is not None else self._stored_block(slot, meta).checksum
        if checksum(payload[:meta.nbytes]) != expected:
            raise self._why_corrupt(slot, meta)
        if not direct:
            dst[:meta.nbytes].copy_(torch.frombuffer(payload, dtype=torch.uint8, count=meta.nbytes))

    def _stored_block(self, slot: int, meta: SlotMeta) -> SlotMeta:
        """The slot's header, which must name the block `meta` describes."""
        header = self._read_header(slot)
        if header is None:
            raise CorruptBlockError(f"slot {slot} of {self.path}: block {meta.key.hex()} was erased")
        stored, _ = header
        if stored.key != meta.key or stored.nbytes != meta.nbytes:
            raise CorruptBlockError(f"slot {slot} of {self.path} holds block {stored.key.hex()}, "
                                    f"not {meta.key.hex()}")
        return stored

    def _why_corrupt(self, slot: int, meta: SlotMeta) -> CorruptBlockError:
        """The error for a payload that fails its checksum, saying what the header tells."""
        try:
            stored = self._stored_block(slot, meta)
        except CorruptBlockError as e:
            return e
        if meta.checksum is not None and stored.checksum != meta.checksum:
            return CorruptBlockError(f"slot {slot} of {self.path}: block {meta.key.hex()} has checksum "
                                     f"{stored.checksum:#x} on disk, {meta.checksum:#x} when committed")
        return CorruptBlockError(f"slot {slot} of {self.path}: checksum mismatch for block {meta.key.hex()}")

    def _run(self, fn, items: Sequence[tuple[int, torch.Tensor, SlotMeta]]) -> list:
        """Runs fn over items on the pool; returns per-item results (fn's value, or the error
        the item failed with)."""
        def guarded(item):
            try:
                return fn(*item)
            except (CorruptBlockError, TierIOError) as e:
                return e
            except OSError as e:
                return TierIOError(f"I/O on slot {item[0]} of {self.path} failed: {e.strerror}")
        results = [guarded(items[0])] if len(items) == 1 else list(self._pool.map(guarded, items))
        self.corrupt_dropped += sum(isinstance(e, CorruptBlockError) for e in results)
        return results

    @staticmethod
    def _moved(items: Sequence[tuple[int, torch.Tensor, SlotMeta]], results: list) -> int:
        return sum(meta.nbytes for (_, _, meta), r in zip(items, results) if not isinstance(r, Exception))

    def write_many(self, items, checksums=None):
        # Payloads first, then their headers: a header on disk never names bytes not yet written.
        sums = self._run(self._write_payload, items)
        written = [(slot, meta, s) for (slot, _, meta), s in zip(items, sums) if not isinstance(s, Exception)]
        failed: dict[int, TierIOError] = {}
        if written:
            headers = pack_headers([m.key for _, m, _ in written], [m.layout_id for _, m, _ in written],
                                   [m.parent for _, m, _ in written], [m.nbytes for _, m, _ in written],
                                   [next(self._generation) for _ in written], [s for _, _, s in written])
            failed = self._put_headers({slot: row.tobytes() for (slot, _, _), row in zip(written, headers)})
        results = [failed.get(slot, s) for (slot, _, _), s in zip(items, sums)]
        self.bytes_written += self._moved(items, results)
        if checksums is not None:
            checksums.extend(None if isinstance(r, Exception) else r for r in results)
        return [r if isinstance(r, Exception) else None for r in results]

    def read_many(self, items, verify=None):
        results = self._run(self._read_one, items)
        self.bytes_read += self._moved(items, results)
        return results

    def erase(self, slot: int) -> None:
        failed = self._put_headers({slot: bytes(HEADER_BYTES)})
        if failed:
            raise failed[slot]

    def close(self) -> None:
        if self._fd < 0:
            return
        self._pool.shutdown(wait=True)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def stats(self) -> dict:
        return {**super().stats(), "path": self.path, "direct_io": self.direct_io,
                "corrupt_dropped": self.corrupt_dropped}


def _metas(slots: np.ndarray, words: np.ndarray) -> Iterator[tuple[int, SlotMeta]]:
    """(slot, SlotMeta) for header rows, made one at a time as the store indexes them."""
    keys, layouts, parents = (words[:, part].tobytes() for part in (_KEY, _LAYOUT, _PARENT))
    for i, (slot, nbytes, payload_sum) in enumerate(zip(slots.tolist(), words[:, _NBYTES].tolist(),
                                                         words[:, _PAYLOAD_SUM].tolist())):
        at = slice(16 * i, 16 * i + 16)
        parent = parents[at]
        yield slot, SlotMeta(key=keys[at], layout_id=layouts[at], nbytes=nbytes,
                             parent=None if parent == _NO_PARENT else parent, checksum=payload_sum)
