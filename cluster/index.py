"""One index shard's table: key -> holders (node, medium), compact and vectorized.

Keys are 16-byte content hashes, so they are their own hash: a key's home slot is its last 8
bytes (its first 8 choose the shard, see cluster/shardmap.py). The table is open addressing
with linear probing over parallel NumPy columns, one row per key:

    key_hi, key_lo  uint64   the whole key (no fingerprint collisions: a lookup never names a
                             node for a key it does not hold)
    holder          uint32   0 empty, DELETED, 1 + the node's ordinal when one node holds the
                             key, SETS + a holder set's id (cluster/holdersets.py) when several do
    medium          uint8    the single holder's medium code

21 bytes a row, at most 70% full before it doubles: 30-60 bytes a block. Keys held by several
nodes share interned holder sets, so they cost the same per key. Node ids are mapped to small
ordinals here; an ordinal is reused once its node is dropped.

Every batch operation probes all its keys at once (one NumPy pass per probe step) and changes
rows per distinct holder state, not per key, so a lookup's cost grows with the prompt, not with
the prompt times its holders.
"""
from __future__ import annotations

import sys

import numpy as np

from kvstore.cluster.holdersets import HolderSets, Members
from kvstore.errors import KVStoreError
from kvstore.keys import KEY_BYTES

EMPTY, DELETED = 0, 0xFFFFFFFF
SETS = 1 << 24  # holder values from here on name a holder set
MEDIA = ("GPU", "CPU", "DISK")  # codes 0, 1, 2 in the order a reader would rather pull from
MAX_MEDIA = 256
MAX_LOAD = 0.7
TARGET_LOAD = 0.5
MAX_NODES = 1 << 16


class IndexFullError(KVStoreError):
    """More distinct nodes or media than one shard can number."""


def keys_array(keys: bytes | bytearray | memoryview | list[bytes]) -> np.ndarray:
    """(n, 2) uint64 rows of keys given as one concatenated buffer or a list of 16-byte keys."""
    blob = b"".join(keys) if isinstance(keys, list) else keys
    if len(blob) % KEY_BYTES:
        raise KVStoreError(f"a key buffer of {len(blob)} bytes is not a whole number of {KEY_BYTES}-byte keys")
    return np.frombuffer(blob, dtype="<u8").reshape(-1, 2)


class CompactIndex:
    def __init__(self, capacity: int = 1024) -> None:
        self._allocate(1 << max(int(capacity) - 1, 1).bit_length())
        self._sets = HolderSets()
        self._ordinal_of: dict[str, int] = {}
        self._names: list[str | None] = []
        self._media: list[str] = list(MEDIA)

    def _allocate(self, capacity: int) -> None:
        self._hi = np.zeros(capacity, np.uint64)
        self._lo = np.zeros(capacity, np.uint64)
        self._holder = np.zeros(capacity, np.uint32)
        self._medium = np.zeros(capacity, np.uint8)
        self._mask = np.uint64(capacity - 1)
        self._live = 0
        self._used = 0  # live + deleted rows: what probing has to step over

    # -- names -------------------------------------------------------------------------------

    def ordinal(self, node_id: str) -> int:
        o = self._ordinal_of.get(node_id)
        if o is None:
            if None in self._names:
                o = self._names.index(None)
            elif len(self._names) < MAX_NODES:
                o = len(self._names)
                self._names.append(None)
            else:
                raise IndexFullError(f"node {node_id!r}: a shard numbers at most {MAX_NODES} nodes")
            self._names[o] = node_id
            self._ordinal_of[node_id] = o
        return o

    def medium_code(self, medium: str) -> int:
        if medium not in self._media:
            if len(self._media) >= MAX_MEDIA:
                raise IndexFullError(f"medium {medium!r}: a shard numbers at most {MAX_MEDIA} media")
            self._media.append(medium)
        return self._media.index(medium)

    # -- updates -----------------------------------------------------------------------------

    def add(self, node_id: str, keys: np.ndarray, medium: str) -> None:
        """node_id holds these keys on `medium` (a key it held on another medium moves)."""
        if not len(keys):
            return
        o, code = self.ordinal(node_id), self.medium_code(medium)
        keys = _unique(keys)
        slots = self._find(keys)
        found = slots >= 0
        self._change(slots[found], lambda members: tuple(sorted([m for m in members if m[0] != o] + [(o, code)])))
        self._insert(keys[~found], o + 1, code)

    def remove(self, node_id: str, keys: np.ndarray, medium: str | None = None) -> None:
        """node_id no longer holds these keys (on `medium`; any medium when None)."""
        o = self._ordinal_of.get(node_id)
        if o is None or not len(keys):
            return
        code = None if medium is None else self.medium_code(medium)
        slots = self._find(keys)
        self._change(np.unique(slots[slots >= 0]),
                     lambda members: tuple(m for m in members if m[0] != o or (code is not None and m[1] != code)))

    def drop_node(self, node_id: str) -> int:
        """Forgets everything node_id holds and frees its ordinal; returns how many keys it held."""
        o = self._ordinal_of.pop(node_id, None)
        if o is None:
            return 0
        held = self._holder == o + 1
        sets = self._sets.with_node(o)
        if sets:
            held |= np.isin(self._holder, np.asarray(sets, np.uint32) + SETS)
        slots = np.nonzero(held)[0]
        self._change(slots, lambda members: tuple(m for m in members if m[0] != o))
        self._names[o] = None
        return len(slots)

    def _change(self, slots: np.ndarray, change) -> None:
        """Rows get change(their holders): computed once per distinct holder state among them."""
        if not len(slots):
            return
        states = (self._holder[slots].astype(np.uint64) << np.uint64(8)) | self._medium[slots]
        distinct, inverse, counts = np.unique(states, return_inverse=True, return_counts=True)
        new_holder = np.empty(len(distinct), np.uint32)
        new_medium = np.zeros(len(distinct), np.uint8)
        old_sets = []
        for i, state in enumerate(distinct.tolist()):
            holder, code = state >> 8, state & 0xFF
            if holder >= SETS:
                old_sets.append((holder - SETS, int(counts[i])))
                members = self._sets.members(holder - SETS)
            else:
                members = ((holder - 1, code),)
            new_holder[i], new_medium[i] = self._encode(change(members), int(counts[i]))
        for set_id, count in old_sets:  # after the new ones are interned: a set kept is never freed between
            self._sets.release(set_id, count)
        self._holder[slots], self._medium[slots] = new_holder[inverse], new_medium[inverse]
        self._live -= int(counts[new_holder == DELETED].sum())

    def _encode(self, members: Members, count: int) -> tuple[int, int]:
        if not members:
            return DELETED, 0
        if len(members) == 1:
            return members[0][0] + 1, members[0][1]
        return SETS + self._sets.intern(members, count), 0

    def _members(self, holder: int, code: int) -> Members:
        return self._sets.members(holder - SETS) if holder >= SETS else ((holder - 1, code),)

    # -- lookups -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    def first_missing(self, keys: np.ndarray) -> int:
        """How many leading keys are held somewhere."""
        missing = np.nonzero(self._find(keys) < 0)[0]
        return int(missing[0]) if len(missing) else len(keys)

    def locate(self, keys: np.ndarray) -> list[list[tuple[str, str]]]:
        """Per key, its (node id, medium) holders, the fastest medium first (then by node id)."""
        out = []
        slots = self._find(keys)
        found = slots >= 0
        holders = np.zeros(len(keys), np.uint32)
        codes = np.zeros(len(keys), np.uint8)
        holders[found], codes[found] = self._holder[slots[found]], self._medium[slots[found]]
        for holder, code in zip(holders.tolist(), codes.tolist()):
            members = self._members(holder, code) if holder else ()
            out.append(sorted(((self._names[o], self._media[c]) for o, c in members),
                              key=lambda nm: (self._media.index(nm[1]), nm[0])))
        return out

    def prefix_by_node(self, keys: np.ndarray) -> dict[str, int]:
        """Per node holding the first key, how many leading keys it holds itself."""
        slots = self._find(keys)
        missing = np.nonzero(slots < 0)[0]
        slots = slots[:missing[0]] if len(missing) else slots
        if not len(slots):
            return {}
        # One bit per node ordinal per key, ANDed down the prompt: a node's bit stays set exactly
        # as long as it holds every key so far, so its prefix is where its bit last changes.
        holder = self._holder[slots]
        words = (max(len(self._names), 1) + 63) >> 6
        bits = np.zeros((len(slots), words), np.uint64)
        single = np.nonzero(holder < SETS)[0]
        first = holder[single].astype(np.int64) - 1
        bits[single, first >> 6] = np.left_shift(np.uint64(1), (first & 63).astype(np.uint64))
        several = np.nonzero(holder >= SETS)[0]
        if len(several):
            bits[several] = self._sets.bits(holder[several] - SETS, words)
        running = np.bitwise_and.accumulate(bits, axis=0)
        prefix: dict[str, int] = {}
        for w in range(words):
            column = running[:, w]
            for row in np.nonzero(column[1:] != column[:-1])[0].tolist():
                self._name_bits(int(column[row] & ~column[row + 1]), w, row + 1, prefix)
            self._name_bits(int(column[-1]), w, len(slots), prefix)
        return prefix

    def _name_bits(self, bits: int, word: int, count: int, prefix: dict[str, int]) -> None:
        while bits:
            low = bits & -bits
            prefix[self._names[(word << 6) + low.bit_length() - 1]] = count
            bits ^= low

    def node_keys(self) -> dict[str, int]:
        """Per node, how many keys it holds (a full scan: for stats, not for a hot path)."""
        single = self._holder[(self._holder != EMPTY) & (self._holder < SETS)]
        counts = np.bincount(single, minlength=len(self._names) + 1)
        for members, uses in self._sets.uses():
            for o, _ in members:
                counts[o + 1] += uses
        return {name: int(counts[o + 1]) for o, name in enumerate(self._names) if name is not None}

    def nbytes(self) -> int:
        """Memory the index holds: its columns, its holder sets and its names."""
        columns = self._hi.nbytes + self._lo.nbytes + self._holder.nbytes + self._medium.nbytes
        names = sys.getsizeof(self._ordinal_of) + sum(sys.getsizeof(n) for n in self._ordinal_of)
        return columns + self._sets.nbytes() + names

    # -- the table ---------------------------------------------------------------------------

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Per key its row, -1 where absent."""
        found = np.full(len(keys), -1, np.int64)
        pending = np.arange(len(keys))
        pos = keys[:, 1] & self._mask
        hi, lo = keys[:, 0], keys[:, 1]
        while len(pending):
            p = pos.astype(np.int64)
            holder = self._holder[p]
            hit = (holder != EMPTY) & (holder != DELETED) & (self._hi[p] == hi) & (self._lo[p] == lo)
            found[pending[hit]] = p[hit]
            going = ~hit & (holder != EMPTY)
            pending, hi, lo = pending[going], hi[going], lo[going]
            pos = (pos[going] + np.uint64(1)) & self._mask
        return found

    def _insert(self, keys: np.ndarray, holder, code) -> None:
        """Rows for keys known to be absent (and distinct); `holder` (ordinal + 1) and `code` (the
        medium byte) are one value for all keys or one per key."""
        if not len(keys):
            return
        if self._used + len(keys) > MAX_LOAD * len(self._holder):
            self._resize(self._live + len(keys))
        holder = np.broadcast_to(np.asarray(holder, np.uint32), len(keys))
        code = np.broadcast_to(np.asarray(code, np.uint8), len(keys))
        pending = np.arange(len(keys))
        pos = keys[:, 1] & self._mask
        while len(pending):
            p = pos.astype(np.int64)
            state = self._holder[p]
            free = np.nonzero((state == EMPTY) | (state == DELETED))[0]
            # Two pending keys may want the same free row: the first of them takes it.
            rows, first = np.unique(p[free], return_index=True)
            winners = pending[free[first]]
            self._used += int(np.count_nonzero(self._holder[rows] == EMPTY))
            self._hi[rows], self._lo[rows] = keys[winners, 0], keys[winners, 1]
            self._holder[rows], self._medium[rows] = holder[winners], code[winners]
            placed = np.zeros(len(pending), bool)
            placed[free[first]] = True
            pending = pending[~placed]
            pos = (pos[~placed] + np.uint64(1)) & self._mask
        self._live += len(keys)

    def _resize(self, live: int) -> None:
        """Rehashes into a table sized for `live` keys at TARGET_LOAD (also sweeping deleted rows)."""
        rows = np.nonzero((self._holder != EMPTY) & (self._holder != DELETED))[0]
        keys = np.stack([self._hi[rows], self._lo[rows]], axis=1)
        holders, media = self._holder[rows], self._medium[rows]
        self._allocate(1 << max(int(live / TARGET_LOAD) - 1, 1023).bit_length())
        self._insert(keys, holders, media)


def _unique(keys: np.ndarray) -> np.ndarray:
    """The distinct rows of keys (order not kept)."""
    if len(keys) < 2:
        return keys
    return np.unique(np.ascontiguousarray(keys).view("V16")).view("<u8").reshape(-1, 2)
