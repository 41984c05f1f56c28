"""The host tier: a POSIX shared-memory arena every process on the node can map.

The node's owner creates the arena under a name (`/dev/shm/<name>`); engine workers, the data
plane server and tests open it by that name and read or write slots in place, so handing a
block between processes on one node copies nothing. The first page holds the geometry, so an
opener needs only the name; then come the chunks' size classes (a stride per chunk, see
tiers/geometry.py: an opener finds any slot's bytes from it), the slots' generations (one uint64 each: a writer in
another process checks its slot's generation before each copy, see TieredStore.fence), the
directory (which block each slot holds, read by other processes without asking the store: see
tiers/directory.py), then the slots. With CUDA present the mapping is registered as pinned memory
(cudaHostRegister), which keeps it shareable and makes host<->device copies asynchronous.

Pages are touched once at creation: on these virtual machines a first touch costs ~10x a copy,
so a hot path must never be the first to write a page.
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
import re
import struct

import numpy as np
import torch

from kvstore.errors import ConfigError, TierIOError
from kvstore.tiers.base import PAGE, MemoryTier, SlotMeta, memory_geometry, round_up, size_classes
from kvstore.tiers.geometry import Geometry, SizeClasses, SlotRows
from kvstore.tiers.directory import SlotDirectory, directory_bytes

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_MAGIC = b"KVSTHOST"
# magic, version, slot_nbytes (one class; 0 for several), chunk_bytes, slot numbers per chunk, chunks
_SUPER = struct.Struct("<8sIQQQQ")
_VERSION = 4
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def _path(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"shared-memory name {name!r} must be 1-200 characters of letters, digits and ._-")
    return os.path.join(SHM_DIR, name)


class HostArena:
    """A mapping of one shared-memory arena. `tensor` is [num_slots, slot_stride] uint8 for one
    size class, else `SlotRows` (indexed the same way: `tensor[slot, :nbytes]`) over `flat`."""

    def __init__(self, name: str, mm: mmap.mmap, slot_nbytes: int, chunk_bytes: int, ids_per_chunk: int,
                 num_chunks: int, owner: bool) -> None:
        self.name = name
        self.owner = owner
        self._mm = mm
        strides = np.frombuffer(mm, dtype=np.uint64, count=num_chunks, offset=PAGE)
        if slot_nbytes:
            self.geometry = Geometry(chunk_bytes, 1, num_chunks, strides, single=True)
        else:
            self.geometry = Geometry(chunk_bytes, ids_per_chunk, num_chunks, strides)
        num_slots = self.geometry.num_slots
        self.slot_nbytes = slot_nbytes
        self.slot_stride = chunk_bytes if slot_nbytes else 0
        self.num_slots = num_slots
        at = PAGE + round_up(num_chunks * 8)
        self.generations = np.frombuffer(mm, dtype=np.uint64, count=num_slots, offset=at)
        self.directory = SlotDirectory(mm, at + num_slots * 8, num_slots, init=owner)
        self.flat = torch.frombuffer(mm, dtype=torch.uint8, offset=_slots_offset(num_chunks, num_slots),
                                     count=self.geometry.data_bytes)
        self.tensor = self.flat.view(num_slots, chunk_bytes) if slot_nbytes else SlotRows(self.flat, self.geometry)
        self.pinned = _register_pinned(self.flat)

    @classmethod
    def create(cls, name: str, classes: SizeClasses | int, num_slots: int | None = None,
               geometry: Geometry | None = None) -> "HostArena":
        """A new arena: one class of `classes` bytes and `num_slots` slots, or `geometry`."""
        classes = size_classes(classes)
        if geometry is None:
            geometry = Geometry.single(classes.declared[0], num_slots)
        path = _path(name)
        size = _slots_offset(geometry.num_chunks, geometry.num_slots) + geometry.data_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise TierIOError(f"shared-memory arena {name!r} already exists at {path}; "
                              "another store owns it, or a crashed one left it (remove the file)") from None
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise TierIOError(f"cannot create a {size}-byte shared-memory arena at {path}: {e.strerror} "
                              "(is /dev/shm large enough?)") from e
        os.close(fd)
        slot_nbytes = classes.slot_nbytes if geometry.single else 0
        mm[:_SUPER.size] = _SUPER.pack(_MAGIC, _VERSION, slot_nbytes, geometry.chunk_bytes,
                                       geometry.ids_per_chunk, geometry.num_chunks)
        arena = cls(name, mm, slot_nbytes, geometry.chunk_bytes, geometry.ids_per_chunk, geometry.num_chunks,
                    owner=True)
        arena.geometry.strides[:] = geometry.strides
        arena.flat.zero_()  # prefault every page now, not on the hot path
        return arena

    @classmethod
    def open(cls, name: str) -> "HostArena":
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise TierIOError(f"no shared-memory arena named {name!r} at {path}") from None
        except OSError as e:  # a directory, no permission, ...
            raise TierIOError(f"cannot open shared-memory arena {name!r} at {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < PAGE:
                raise TierIOError(f"shared-memory arena {name!r} is {size} bytes, too small to be one")
            # MAP_POPULATE maps every page now: an opener's first read must not pay the faults.
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, version, slot_nbytes, chunk_bytes, ids, num_chunks = _SUPER.unpack_from(mm, 0)
        ids = 1 if slot_nbytes else ids
        if (magic != _MAGIC or version != _VERSION or not ids
                or size < _slots_offset(num_chunks, num_chunks * ids) + num_chunks * chunk_bytes):
            mm.close()
            raise TierIOError(f"{path} is not a kvstore host arena of version {_VERSION}")
        return cls(name, mm, slot_nbytes, chunk_bytes, ids, num_chunks, owner=False)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.pinned = False
        self.tensor = None
        self.flat = None
        self.generations = None
        self.directory = None
        if self.owner:
            try:
                os.unlink(_path(self.name))
            except FileNotFoundError:
                pass
        try:
            self._mm.close()
        except BufferError:
            # A caller still holds a view of a slot; the mapping goes when that view does.
            log.debug("host arena %s still has views; leaving the mapping to the collector", self.name)


def _slots_offset(num_chunks: int, num_slots: int) -> int:
    """Where the slots start: after the superblock page, the chunks' strides, the generations
    and the directory."""
    return PAGE + round_up(num_chunks * 8) + round_up(num_slots * 8 + directory_bytes(num_slots))


def remove_stale_arenas(pattern: str) -> list[str]:
    """Unlinks arenas matching `pattern` (a glob under /dev/shm) whose owner is dead.

    An arena's name ends in its owner's pid (`<prefix>-<node>-<pid>`); a process that was killed
    (a node stopped, an actor crashed) never unlinks its arena, and shared memory is RAM until
    someone does. A live owner's arena is never touched. Returns the paths removed.
    """
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, pattern)):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.info("removed %d shared-memory arenas left by processes that are gone", len(removed))
    return removed


def _register_pinned(tensor: torch.Tensor) -> bool:
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
    if int(err) != 0:
        log.warning("cudaHostRegister of the host arena failed (error %s); host<->GPU copies will be synchronous", err)
        return False
    return True


class HostTier(MemoryTier):
    name = "host"
    medium = "CPU"

    def __init__(self, name: str, classes: SizeClasses | int, capacity_bytes: int) -> None:
        classes = size_classes(classes)
        geometry = memory_geometry(classes, capacity_bytes, "host_tier_bytes")
        self.arena_handle = HostArena.create(name, classes, geometry=geometry)
        super().__init__(classes, self.arena_handle.geometry)
        self.arena = self.arena_handle.tensor
        self.generations = self.arena_handle.generations  # shared: writers elsewhere check them

    def _reassign(self, chunk: int, stride: int) -> None:
        # Readers in other processes find a slot's bytes from its chunk's stride: every slot
        # number of the chunk is made unreadable (sequence odd, header cleared) before it changes.
        self.arena_handle.directory.invalidate(self.geometry.chunk_ids(chunk))

    def _sync(self) -> None:
        # Copies to or from a GPU were queued non-blocking on the caller's stream.
        if self.arena_handle.pinned:
            torch.cuda.current_stream().synchronize()

    def begin_write(self, slot: int) -> None:
        self.arena_handle.directory.begin_write(slot)

    def publish(self, slot: int, meta: SlotMeta) -> None:
        self.arena_handle.directory.publish(slot, meta.key, meta.checksum or 0, meta.nbytes)

    def withdraw(self, key: bytes) -> None:
        self.arena_handle.directory.withdraw(key)

    def take_touched(self) -> list[tuple[int, bytes]]:
        return self.arena_handle.directory.take_touched()

    @property
    def shm_name(self) -> str:
        return self.arena_handle.name

    def close(self) -> None:
        self.arena = None
        self.generations = None
        self.arena_handle.close()

    def stats(self) -> dict:
        return {**super().stats(), "shm_name": self.shm_name, "pinned": self.arena_handle.pinned}
