"""Interned holder sets: the nodes (and media) of the keys that several nodes hold.

A key held by one node stores that node in its own index row (cluster/index.py). A key held by
several stores the id of its set here instead. Sets are few compared with keys: blocks shared
across nodes are mostly whole prompt prefixes on the same group of nodes, so one set serves
thousands of keys and a change to many keys is one computation per distinct set. Each set
also has a bitmap of its nodes, so a lookup turns a prompt's sets into bits in one NumPy step.
A set no key uses any more is freed and its id reused.
"""
from __future__ import annotations

import sys

import numpy as np

Members = tuple[tuple[int, int], ...]  # sorted (node ordinal, medium code) pairs


class HolderSets:
    def __init__(self) -> None:
        self._members: list[Members | None] = []
        self._id_of: dict[Members, int] = {}
        self._refs = np.zeros(0, np.int64)
        self._bits = np.zeros((0, 1), np.uint64)
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._id_of)

    def members(self, set_id: int) -> Members:
        return self._members[set_id]

    def intern(self, members: Members, count: int) -> int:
        """The id of this set, now used by `count` more keys."""
        set_id = self._id_of.get(members)
        if set_id is None:
            set_id = self._free.pop() if self._free else self._grow()
            self._members[set_id] = members
            self._id_of[members] = set_id
            words = max(o for o, _ in members) // 64 + 1
            if words > self._bits.shape[1]:
                self._bits = np.pad(self._bits, ((0, 0), (0, words - self._bits.shape[1])))
            self._bits[set_id] = 0
            for o, _ in members:
                self._bits[set_id, o >> 6] |= np.uint64(1 << (o & 63))
        self._refs[set_id] += count
        return set_id

    def release(self, set_id: int, count: int) -> None:
        """`count` keys no longer use this set; with none left it is freed."""
        self._refs[set_id] -= count
        if self._refs[set_id] == 0:
            del self._id_of[self._members[set_id]]
            self._members[set_id] = None
            self._free.append(set_id)

    def with_node(self, ordinal: int) -> list[int]:
        return [i for i, m in enumerate(self._members) if m is not None and any(o == ordinal for o, _ in m)]

    def bits(self, set_ids: np.ndarray, words: int) -> np.ndarray:
        """(len(set_ids), words) node bitmaps of these sets."""
        bits = self._bits[set_ids]
        if bits.shape[1] < words:
            bits = np.pad(bits, ((0, 0), (0, words - bits.shape[1])))
        return bits[:, :words]

    def uses(self) -> list[tuple[Members, int]]:
        """Every live set with how many keys use it."""
        return [(m, int(self._refs[i])) for i, m in enumerate(self._members) if m is not None]

    def nbytes(self) -> int:
        interned = sum(sys.getsizeof(m) + len(m) * 64 for m in self._id_of)  # the tuples, their pairs, the dict entry
        return self._refs.nbytes + self._bits.nbytes + sys.getsizeof(self._members) + sys.getsizeof(self._id_of) + interned

    def _grow(self) -> int:
        set_id = len(self._members)
        self._members.append(None)
        if set_id >= len(self._refs):
            size = max(16, 2 * len(self._refs))
            self._refs = np.pad(self._refs, (0, size - len(self._refs)))
            self._bits = np.pad(self._bits, ((0, size - len(self._bits)), (0, 0)))
        return set_id
