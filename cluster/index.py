"""One index shard's table: key -> holders (node, medium), compact and vectorized.

Keys are 16-byte content hashes, so they are their own hash: a key's home slot is its last 8
bytes (its first 8 choose the shard, see cluster/shardmap.py). The table is open addressing
with linear probing over parallel NumPy columns, one row per key:

    key_hi, key_lo  uint64   the whole key (no fingerprint collisions: a lookup never names a
                             node for a key it does not hold)
    holder          uint16   the first holder's node ordinal + 1; 0 empty, 0xFFFF deleted
    medium          uint8    the first holder's medium code; the top bit says "more holders"

19 bytes a row, at most 70% full before it grows (doubling): 27-54 bytes a block with one
holder. Further holders of a key live in a dict beside the table (slot -> {ordinal: medium}):
tens of bytes more per extra holder, paid only by blocks several nodes hold. Node ids are
mapped to small ordinals here; an ordinal is reused once its node is dropped.

Every batch operation probes all its keys at once (one NumPy pass per probe step), so the cost
of a lookup grows with the prompt, not with the prompt times its holders.
"""
from __future__ import annotations

import sys

import numpy as np

from kvstore.errors import KVStoreError
from kvstore.keys import KEY_BYTES

EMPTY, DELETED = 0, 0xFFFF
MORE = 0x80  # in `medium`: the key has holders beyond the first
CODE = 0x7F  # in `medium`: the first holder's medium code
MEDIA = ("GPU", "CPU", "DISK")  # codes 0, 1, 2 in the order a reader would rather pull from
MAX_LOAD = 0.7
TARGET_LOAD = 0.5
MAX_NODES = DELETED - 1


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
        self._extra: dict[int, dict[int, int]] = {}
        self._ordinal_of: dict[str, int] = {}
        self._names: list[str | None] = []
        self._media: list[str] = list(MEDIA)

    def _allocate(self, capacity: int) -> None:
        self._hi = np.zeros(capacity, np.uint64)
        self._lo = np.zeros(capacity, np.uint64)
        self._holder = np.zeros(capacity, np.uint16)
        self._medium = np.zeros(capacity, np.uint8)
        self._mask = np.uint64(capacity - 1)
        self._live = 0
        self._used = 0  # live + deleted rows: what probing has to step over

    # -- names -------------------------------------------------------------------------------

    def ordinal(self, node_id: str) -> int:
        o = self._ordinal_of.get(node_id)
        if o is None:
            free = [i for i, name in enumerate(self._names) if name is None]
            if free:
                o = free[0]
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
            if len(self._media) >= MORE:
                raise IndexFullError(f"medium {medium!r}: a shard numbers at most {MORE} media")
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
        s = slots[found]
        mine = self._holder[s] == o + 1
        self._medium[s[mine]] = (self._medium[s[mine]] & MORE) | code
        for slot in s[~mine].tolist():  # keys other nodes hold already: the rare, multi-holder case
            self._extra.setdefault(slot, {})[o] = code
            self._medium[slot] |= MORE
        self._insert(keys[~found], o + 1, code)

    def remove(self, node_id: str, keys: np.ndarray, medium: str | None = None) -> None:
        """node_id no longer holds these keys (on `medium`; any medium when None)."""
        o = self._ordinal_of.get(node_id)
        if o is None or not len(keys):
            return
        code = None if medium is None else self.medium_code(medium)
        slots = self._find(keys)
        s = np.unique(slots[slots >= 0])
        first = self._holder[s] == o + 1
        if code is not None:
            first &= (self._medium[s] & CODE) == code
        more = (self._medium[s] & MORE) != 0
        self._delete_rows(s[first & ~more])
        for slot in s[more].tolist():
            self._remove_holder(slot, o, code)

    def drop_node(self, node_id: str) -> int:
        """Forgets everything node_id holds and frees its ordinal; returns how many keys it held."""
        o = self._ordinal_of.pop(node_id, None)
        if o is None:
            return 0
        first = np.nonzero(self._holder == o + 1)[0]
        more = (self._medium[first] & MORE) != 0
        self._delete_rows(first[~more])
        held = len(first)
        for slot in first[more].tolist():
            self._remove_holder(slot, o, None)
        for slot in [s for s, extra in self._extra.items() if o in extra]:
            self._remove_holder(slot, o, None)
            held += 1
        self._names[o] = None
        return held

    def _remove_holder(self, slot: int, o: int, code: int | None) -> None:
        """Removes ordinal o from a row that has several holders, promoting another to first."""
        extra = self._extra[slot]
        if self._holder[slot] == o + 1:
            if code is not None and (self._medium[slot] & CODE) != code:
                return
            promoted, promoted_code = next(iter(extra.items()))
            del extra[promoted]
            self._holder[slot] = promoted + 1
            self._medium[slot] = promoted_code
        elif o in extra and (code is None or extra[o] == code):
            del extra[o]
        if extra:
            self._medium[slot] |= MORE
        else:
            del self._extra[slot]
            self._medium[slot] &= CODE

    def _delete_rows(self, slots: np.ndarray) -> None:
        self._holder[slots] = DELETED
        self._live -= len(slots)

    # -- lookups -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    def first_missing(self, keys: np.ndarray) -> int:
        """How many leading keys are held somewhere."""
        missing = np.nonzero(self._find(keys) < 0)[0]
        return int(missing[0]) if len(missing) else len(keys)

    def locate(self, keys: np.ndarray) -> list[list[tuple[str, str]]]:
        """Per key, its (node id, medium) holders, the fastest medium first."""
        out = []
        for slot in self._find(keys).tolist():
            if slot < 0:
                out.append([])
                continue
            code = int(self._medium[slot])
            holders = [(int(self._holder[slot]) - 1, code & CODE)]
            if code & MORE:
                holders += self._extra[slot].items()
            holders.sort(key=lambda oc: oc[1])
            out.append([(self._names[o], self._media[c]) for o, c in holders])
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
        first = self._holder[slots].astype(np.int64) - 1
        words = (max(len(self._names), 1) + 63) >> 6
        bits = np.zeros((len(slots), words), np.uint64)
        bits[np.arange(len(slots)), first >> 6] = np.left_shift(np.uint64(1), (first & 63).astype(np.uint64))
        for row in np.nonzero(self._medium[slots] & MORE)[0].tolist():
            for o in self._extra[int(slots[row])]:
                bits[row, o >> 6] |= np.uint64(1 << (o & 63))
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
        counts = np.bincount(self._holder[(self._holder != EMPTY) & (self._holder != DELETED)],
                             minlength=len(self._names) + 1)
        for extra in self._extra.values():
            for o in extra:
                counts[o + 1] += 1
        return {name: int(counts[o + 1]) for o, name in enumerate(self._names) if name is not None}

    def nbytes(self) -> int:
        """Memory the index holds: its columns, its extra holders and its names."""
        columns = self._hi.nbytes + self._lo.nbytes + self._holder.nbytes + self._medium.nbytes
        extras = sys.getsizeof(self._extra) + sum(sys.getsizeof(e) + 28 * len(e) for e in self._extra.values())
        names = sys.getsizeof(self._ordinal_of) + sum(sys.getsizeof(n) for n in self._ordinal_of)
        return columns + extras + names

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
        holder = np.broadcast_to(np.asarray(holder, np.uint16), len(keys))
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
        extra, several = self._extra, (media & MORE) != 0
        self._allocate(1 << max(int(live / TARGET_LOAD) - 1, 1023).bit_length())
        self._insert(keys, holders, media)
        self._extra = dict(zip(self._find(keys[several]).tolist(), (extra[r] for r in rows[several].tolist())))


def _unique(keys: np.ndarray) -> np.ndarray:
    """The distinct rows of keys (order not kept)."""
    if len(keys) < 2:
        return keys
    return np.unique(np.ascontiguousarray(keys).view("V16")).view("<u8").reshape(-1, 2)
