"""The NVMe tier: one preallocated file per node, direct I/O, self-describing slots.

File layout (every part 4 KiB aligned):

    [superblock page][slot 0 header page][slot 0 payload (stride)][slot 1 header page]...

A slot header holds the block's key, layout id, parent key, length, a generation number, an
xxh3-64 checksum of the payload and a checksum of the header itself. Header and payload go to
disk in one `pwritev`. At open the headers are read back and the index is rebuilt from them; a
header that fails its checksum is dropped and counted. A payload is checked on every read, so a
torn or corrupted block is dropped and counted, never served.

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
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
import xxhash

from kvstore.errors import ConfigError, CorruptBlockError, TierIOError
from kvstore.integrity import checksum
from kvstore.tiers.base import PAGE, SlotMeta, Tier, round_up, slots_for

log = logging.getLogger(__name__)

FILE_NAME = "kvstore-blocks.dat"
_SUPER_MAGIC = b"KVSTNVME"
_SUPER = struct.Struct("<8sIQQQ")  # magic, version, slot_nbytes, slot_stride, num_slots
_VERSION = 1
_SLOT_MAGIC = b"KVBLOCK1"
_HEADER = struct.Struct("<8s16s16s16sQQQ")  # magic, key, layout id, parent, nbytes, generation, payload checksum
_HEADER_SUM = struct.Struct("<Q")
_NO_PARENT = bytes(16)


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

    def __init__(self, directory: str, slot_nbytes: int, capacity_bytes: int,
                 io_threads: int = 4, direct_io: bool = True) -> None:
        try:
            num_slots = slots_for(capacity_bytes - PAGE, slot_nbytes, "nvme_tier_bytes", overhead=PAGE)
        except ConfigError:
            if slot_nbytes < 1:
                raise
            # Name the capacity as configured, not net of the superblock.
            raise ConfigError(
                f"nvme_tier_bytes={capacity_bytes} holds no slot of {slot_nbytes} bytes (the file needs "
                f"{PAGE + PAGE + round_up(slot_nbytes)} bytes for one: superblock, header and payload)") from None
        super().__init__(slot_nbytes, num_slots)
        self.path = os.path.join(directory, FILE_NAME)
        self.file_bytes = PAGE + num_slots * (PAGE + self.slot_stride)
        self.corrupt_dropped = 0
        self._local = threading.local()
        self._generation = itertools.count(1)
        self._zero_page = aligned_buffer(PAGE)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise TierIOError(f"nvme_path={directory!r} cannot be created: {e.strerror}") from e
        existed = os.path.exists(self.path)
        self._fd, self.direct_io = self._open(direct_io)
        try:
            if existed:
                self._check_superblock()
            else:
                self._format()
            self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-nvme")
            self._recovered = self._scan() if existed else []
        except BaseException:
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
        page[:_SUPER.size] = _SUPER.pack(_SUPER_MAGIC, _VERSION, self.slot_nbytes, self.slot_stride, self.num_slots)
        os.pwrite(self._fd, page, 0)
        os.fsync(self._fd)

    def _check_superblock(self) -> None:
        page = aligned_buffer(PAGE)
        if os.preadv(self._fd, [page], 0) != PAGE:
            raise TierIOError(f"{self.path} is shorter than one page; remove it to start afresh")
        magic, version, slot_nbytes, stride, num_slots = _SUPER.unpack_from(page, 0)
        if magic != _SUPER_MAGIC or version != _VERSION:
            raise TierIOError(f"{self.path} is not a kvstore NVMe tier file of version {_VERSION}")
        size = os.fstat(self._fd).st_size
        if size < PAGE + num_slots * (PAGE + stride):
            raise TierIOError(f"{self.path} is {size} bytes, shorter than its {num_slots} slots need; it was "
                              "truncated: remove it to start afresh")
        if (slot_nbytes, num_slots) != (self.slot_nbytes, self.num_slots):
            raise ConfigError(
                f"{self.path} holds {num_slots} slots of {slot_nbytes} bytes, but the configuration asks for "
                f"{self.num_slots} slots of {self.slot_nbytes} bytes; restore slot_bytes/nvme_tier_bytes "
                "or remove the file (its blocks are lost)")

    def _scan(self) -> list[tuple[int, SlotMeta]]:
        """Rebuilds the slot map from the headers; keeps the newest copy of a key."""
        def read_header(slot: int):
            page = self._buffer("header", PAGE)
            if os.preadv(self._fd, [page], self._offset(slot)) != PAGE:
                return slot, CorruptBlockError(f"slot {slot} of {self.path}: the header cannot be read whole")
            try:
                return slot, self._parse_header(page, slot)
            except CorruptBlockError as e:
                return slot, e

        newest: dict[bytes, tuple[int, int, SlotMeta]] = {}
        max_generation = 0
        for slot, parsed in self._pool.map(read_header, range(self.num_slots)):
            if parsed is None:
                continue
            if isinstance(parsed, CorruptBlockError):
                log.warning("dropping a damaged slot at open: %s", parsed)
                self.corrupt_dropped += 1
                continue
            meta, generation, _ = parsed
            max_generation = max(max_generation, generation)
            if meta.key not in newest or newest[meta.key][0] < generation:
                newest[meta.key] = (generation, slot, meta)
        self._generation = itertools.count(max_generation + 1)
        found = sorted((slot, meta) for _, slot, meta in newest.values())
        self.allocator.claim(slot for slot, _ in found)
        if found or self.corrupt_dropped:
            log.info("NVMe tier %s: recovered %d blocks, dropped %d corrupt slots",
                     self.path, len(found), self.corrupt_dropped)
        return found

    def recovered(self) -> list[tuple[int, SlotMeta]]:
        found, self._recovered = self._recovered, []
        return found

    # -- slots ---------------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        return PAGE + slot * (PAGE + self.slot_stride)

    def _buffer(self, kind: str, nbytes: int) -> mmap.mmap:
        """A per-thread aligned buffer, allocated and prefaulted once per thread."""
        buf = getattr(self._local, kind, None)
        if buf is None:
            buf = aligned_buffer(nbytes)
            setattr(self._local, kind, buf)
        return buf

    def _parse_header(self, page, slot: int) -> tuple[SlotMeta, int, int] | None:
        """(meta, generation, payload checksum); None for a slot never written or erased."""
        magic = bytes(page[:8])
        if magic == bytes(8):
            return None
        fields = _HEADER.unpack_from(page, 0)
        (stored_sum,) = _HEADER_SUM.unpack_from(page, _HEADER.size)
        if magic != _SLOT_MAGIC or xxhash.xxh3_64_intdigest(page[:_HEADER.size]) != stored_sum:
            raise CorruptBlockError(f"slot {slot} of {self.path}: the header fails its checksum")
        _, key, layout_id, parent, nbytes, generation, payload_sum = fields
        if nbytes > self.slot_nbytes:
            raise CorruptBlockError(f"slot {slot} of {self.path}: length {nbytes} exceeds the slot")
        meta = SlotMeta(key=key, layout_id=layout_id, nbytes=nbytes, parent=None if parent == _NO_PARENT else parent,
                        checksum=payload_sum)
        return meta, generation, payload_sum

    def _payload_target(self, t: torch.Tensor, length: int) -> memoryview | None:
        """`t` itself when direct I/O can use it (CPU, aligned, long enough); else None."""
        if (t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % PAGE == 0
                and t.numel() >= length):
            return _u8(t)[:length]
        return None

    def _write_one(self, slot: int, src: torch.Tensor, meta: SlotMeta) -> None:
        length = round_up(meta.nbytes)
        payload = self._payload_target(src, length)
        if payload is None:
            bounce = self._buffer("bounce", self.slot_stride)
            np.frombuffer(bounce, dtype=np.uint8, count=meta.nbytes)[:] = src[:meta.nbytes].cpu().numpy()
            payload = memoryview(bounce)[:length]
        header = self._buffer("header", PAGE)
        # A block moving down keeps the checksum it was committed with: if its bytes were damaged
        # on the way, the read that brings them back finds out.
        payload_sum = meta.checksum if meta.checksum is not None else checksum(payload[:meta.nbytes])
        packed = _HEADER.pack(_SLOT_MAGIC, meta.key, meta.layout_id, meta.parent or _NO_PARENT, meta.nbytes,
                              next(self._generation), payload_sum)
        header[:_HEADER.size] = packed
        header[_HEADER.size:_HEADER.size + _HEADER_SUM.size] = _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(packed))
        written = os.pwritev(self._fd, [header, payload], self._offset(slot))
        if written != PAGE + length:
            raise TierIOError(f"short write to slot {slot} of {self.path}: {written} of {PAGE + length} bytes")
        return payload_sum

    def _read_one(self, slot: int, dst: torch.Tensor, meta: SlotMeta) -> None:
        length = round_up(meta.nbytes)
        payload = self._payload_target(dst, length)
        direct = payload is not None
        if not direct:
            payload = memoryview(self._buffer("bounce", self.slot_stride))[:length]
        header = self._buffer("header", PAGE)
        got = os.preadv(self._fd, [header, payload], self._offset(slot))
        if got != PAGE + length:
            raise TierIOError(f"short read from slot {slot} of {self.path}: {got} of {PAGE + length} bytes")
        parsed = self._parse_header(header, slot)
        if parsed is None:
            raise CorruptBlockError(f"slot {slot} of {self.path}: block {meta.key.hex()} was erased")
        stored, _, stored_sum = parsed
        if stored.key != meta.key or stored.nbytes != meta.nbytes:
            raise CorruptBlockError(f"slot {slot} of {self.path} holds block {stored.key.hex()}, "
                                    f"not {meta.key.hex()}")
        if meta.checksum is not None and stored_sum != meta.checksum:
            raise CorruptBlockError(f"slot {slot} of {self.path}: block {meta.key.hex()} has checksum "
                                    f"{stored_sum:#x} on disk, {meta.checksum:#x} when committed")
        if checksum(payload[:meta.nbytes]) != stored_sum:
            raise CorruptBlockError(f"slot {slot} of {self.path}: checksum mismatch for block {meta.key.hex()}")
        if not direct:
            dst[:meta.nbytes].copy_(torch.frombuffer(payload, dtype=torch.uint8, count=meta.nbytes))

    def _run(self, fn, items: Sequence[tuple[int, torch.Tensor, SlotMeta]]) -> tuple[list, int]:
        """Runs fn over items on the pool; returns per-item results (fn's value, or the error
        the item failed with) and the bytes that moved."""
        def guarded(item):
            try:
                return fn(*item)
            except (CorruptBlockError, TierIOError) as e:
                return e
            except OSError as e:
                return TierIOError(f"I/O on slot {item[0]} of {self.path} failed: {e.strerror}")
        results = [guarded(items[0])] if len(items) == 1 else list(self._pool.map(guarded, items))
        self.corrupt_dropped += sum(isinstance(e, CorruptBlockError) for e in results)
        moved = sum(meta.nbytes for (_, _, meta), r in zip(items, results) if not isinstance(r, Exception))
        return results, moved

    def write_many(self, items, checksums=None):
        results, moved = self._run(self._write_one, items)
        self.bytes_written += moved
        if checksums is not None:
            checksums.extend(None if isinstance(r, Exception) else r for r in results)
        return [r if isinstance(r, Exception) else None for r in results]

    def read_many(self, items, verify=None):
        results, moved = self._run(self._read_one, items)
        self.bytes_read += moved
        return results

    def erase(self, slot: int) -> None:
        os.pwrite(self._fd, self._zero_page, self._offset(slot))

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
