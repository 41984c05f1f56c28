"""The host arena's directory: which block each slot holds, readable by every process on the node
without asking the node's owner.

It lives in the arena's shared memory, written only by the owning store (under its lock), read
lock-free by other processes (engine workers, clients):

- per slot, a header: the key, the checksum, the length, a *sequence* number, a touched flag;
- an open-addressing hash index, key -> slot, for the blocks ready to read.

A reader never pins anything. It looks the key up, reads the slot's sequence (even: stable; odd:
being written), checks the header names its key, copies the bytes, and reads the sequence again:
the copy is the block's bytes iff the sequence did not change. The owner makes a slot's sequence
odd when it hands the slot out for writing (nothing else ever writes a slot) and even again when
a block is published in it, so a reader overlapping a reuse always sees a change. A block that
was evicted or deleted but whose slot was not reused yet still reads as its own bytes: keys are
content addresses, so that is correct, just late. On x86 (total store order) the protocol needs
no fences: stores are seen in the order they were made, loads are not reordered with loads. An
index entry found mid-update at worst sends the reader to a slot that fails these checks (a miss;
the caller asks the owner instead): never to wrong bytes.

Reads set the slot's touched flag; the owner folds the flags into its eviction order before it
evicts (a second chance), so blocks read only through the directory are not evicted as cold.
"""
from __future__ import annotations

import numpy as np

from kvstore.integrity import copy_with_checksum

EMPTY = -1
TOMBSTONE = -2
HEADER_BYTES = 40  # seq, key (2 words), checksum, length: 5 x uint64
INDEX_ENTRY_BYTES = 24  # key (2 words), slot


def directory_bytes(num_slots: int) -> int:
    """Shared memory the directory of num_slots slots needs (the index has twice the entries)."""
    return num_slots * (HEADER_BYTES + 1) + 2 * num_slots * INDEX_ENTRY_BYTES


def _words(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")


class SlotDirectory:
    """A view of the directory in `buffer` (zeroed memory when `init`)."""

    def __init__(self, buffer, offset: int, num_slots: int, init: bool = False) -> None:
        self.num_slots = num_slots
        self.capacity = 2 * num_slots
        headers = np.frombuffer(buffer, dtype=np.uint64, count=5 * num_slots, offset=offset).reshape(num_slots, 5)
        self.seq = headers[:, 0]
        self.keys = headers[:, 1:3]
        self.sums = headers[:, 3]
        self.lens = headers[:, 4]
        offset += HEADER_BYTES * num_slots
        self.touched = np.frombuffer(buffer, dtype=np.uint8, count=num_slots, offset=offset)
        offset += num_slots
        index = np.frombuffer(buffer, dtype=np.int64, count=3 * self.capacity, offset=offset).reshape(self.capacity, 3)
        self._index_keys = index[:, 0:2].view(np.uint64)
        self._index_slots = index[:, 2]
        self._tombstones = 0
        if init:
            self._index_slots[:] = EMPTY

    # -- the owner (under its store lock) ---------------------------------------------------

    def begin_write(self, slot: int) -> None:
        """The slot is handed out for writing: readers of its old bytes must see a change."""
        if not self.seq[slot] & 1:
            self.seq[slot] += 1

    def publish(self, slot: int, key: bytes, checksum: int, nbytes: int) -> None:
        """A block is ready to read in the slot."""
        k0, k1 = _words(key)
        if not self.seq[slot] & 1:  # published in place (a slot not handed out, e.g. at recovery)
            self.seq[slot] += 1
        self.keys[slot, 0], self.keys[slot, 1] = k0, k1
        self.sums[slot], self.lens[slot] = checksum, nbytes
        self.seq[slot] += 1  # even: stable, and after the header in store order
        self._insert(k0, k1, slot)

    def withdraw(self, key: bytes) -> None:
        """The block is no longer to be read from this tier (its slot's bytes stay until reused)."""
        k0, k1 = _words(key)
        i = self._find(k0, k1)
        if i is not None:
            self._index_slots[i] = TOMBSTONE
            self._tombstones += 1
            if self._tombstones > self.capacity // 4:
                self._rebuild()

    def invalidate(self, slots: range) -> None:
        """The slots' bytes are about to lie elsewhere (their chunk goes to another size class):
        each sequence is made odd, so a reader that read it before sees a change, and each header
        is cleared, so a reader that comes later finds no block there. Before the chunk's new
        stride is written (readers read the sequence and the header before the stride)."""
        seq = self.seq[slots.start:slots.stop]
        seq += ~seq & np.uint64(1)
        self.keys[slots.start:slots.stop] = 0
        self.lens[slots.start:slots.stop] = 0

    def take_touched(self) -> list[tuple[int, bytes]]:
        """(slot, key in its header) of the slots read since the last call; their flags cleared."""
        slots = np.flatnonzero(self.touched)
        self.touched[slots] = 0
        return [(int(s), int(self.keys[s, 0]).to_bytes(8, "little") + int(self.keys[s, 1]).to_bytes(8, "little"))
                for s in slots]

    def _insert(self, k0: int, k1: int, slot: int) -> None:
        i = k0 % self.capacity
        free = None
        while True:
            s = self._index_slots[i]
            if s == EMPTY:
                break
            if s == TOMBSTONE:
                free = i if free is None else free
            elif self._index_keys[i, 0] == k0 and self._index_keys[i, 1] == k1:
                self._index_slots[i] = slot  # the same block published again (moved back up)
                return
            i = (i + 1) % self.capacity
        i = i if free is None else free
        if free is not None:
            self._tombstones -= 1
        # Key words first, the slot last: a reader that sees the slot sees its key.
        self._index_keys[i, 0], self._index_keys[i, 1] = k0, k1
        self._index_slots[i] = slot

    def _rebuild(self) -> None:
        """Drops tombstones by reinserting every live entry (readers meanwhile may miss)."""
        live = [(int(k[0]), int(k[1]), int(s)) for k, s in zip(self._index_keys, self._index_slots) if s >= 0]
        self._index_slots[:] = EMPTY
        self._tombstones = 0
        for k0, k1, slot in live:
            self._insert(k0, k1, slot)

    # -- any process, lock-free ------------------------------------------------------------

    def _find(self, k0: int, k1: int) -> int | None:
        i = k0 % self.capacity
        for _ in range(self.capacity):
            s = self._index_slots[i]
            if s == EMPTY:
                return None
            if s != TOMBSTONE and self._index_keys[i, 0] == k0 and self._index_keys[i, 1] == k1:
                return i
            i = (i + 1) % self.capacity
        return None

    def holds(self, key: bytes) -> bool:
        """Whether key's block is published here now (a writer skips it; a race only costs a copy)."""
        k0, k1 = _words(key)
        i = self._find(k0, k1)
        if i is None:
            return False
        slot = int(self._index_slots[i])
        return slot >= 0 and not int(self.seq[slot]) & 1 and self.keys[slot, 0] == k0 and self.keys[slot, 1] == k1

    def read(self, key: bytes, slots, dst, verify: bool) -> str:
        """Copies key's block out of `slots` (the arena's tensor: `slots[slot, :n]` is a slot's bytes) into
        dst (uint8, the block's length). Returns "hit"; "miss" (not here, or being rewritten: the
        caller asks the owner, which has the final word); or "corrupt" (with `verify`, the bytes
        fail the checksum the block was committed with)."""
        k0, k1 = _words(key)
        i = self._find(k0, k1)
        if i is None:
            return "miss"
        slot = int(self._index_slots[i])
        if slot < 0:
            return "miss"
        seq = int(self.seq[slot])
        if seq & 1 or self.keys[slot, 0] != k0 or self.keys[slot, 1] != k1 or self.lens[slot] != len(dst):
            return "miss"
        source = slots[slot, :len(dst)]
        if verify:
            good = copy_with_checksum(dst, source) == int(self.sums[slot])
        else:
            dst.copy_(source)
            good = True
        if int(self.seq[slot]) != seq:  # the slot was handed out meanwhile: what was copied is not it
            return "miss"
        self.touched[slot] = 1
        return "hit" if good else "corrupt"
