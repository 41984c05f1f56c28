"""A client's memory of where other nodes' blocks are, so a remote get asks the controller only
for keys it has not seen (or whose owner turned out not to have them any more), and of which
peers failed lately, so it does not keep waiting on them (`PeerBreaker`).

Locations are hints, never trusted for bytes: a block pulled from a stale owner is simply not
sent (and every block that is sent is checked against its key and checksum), so a stale entry
costs one more lookup, never wrong KV. Bounded: the least recently used entries go first.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Iterable


class LocationCache:
    def __init__(self, capacity: int = 1 << 18) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def owner(self, key: bytes) -> str | None:
        """The node last known to hold key, or None."""
        with self._lock:
            node = self._owner.get(key)
            if node is not None:
                self._owner.move_to_end(key)
            return node

    def learn(self, key: bytes, node_id: str) -> None:
        with self._lock:
            self._owner[key] = node_id
            self._owner.move_to_end(key)
            while len(self._owner) > self.capacity:
                self._owner.popitem(last=False)

    def forget(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._owner.pop(key, None)

    def forget_node(self, node_id: str) -> None:
        """Drops every entry of a node that died or stopped answering."""
        with self._lock:
            for key in [k for k, n in self._owner.items() if n == node_id]:
                del self._owner[key]

    def __len__(self) -> int:
        return len(self._owner)


class PeerBreaker:
    """Which peers a client leaves alone for now: one whose transfer failed (dead, stalled,
    refusing) is skipped for `cooldown_s`, doubled at each failure in a row up to `max_s`, so
    gets whose blocks only it holds are misses at once instead of waiting out a deadline each.
    A success closes the breaker again."""

    def __init__(self, cooldown_s: float = 2.0, max_s: float = 60.0) -> None:
        self.cooldown_s, self.max_s = cooldown_s, max_s
        self._open: dict[str, tuple[float, float]] = {}  # node id -> (skip until, its last cooldown)
        self._lock = threading.Lock()
        self.skipped = 0  # pulls not tried because their peer was left alone

    def failed(self, node_id: str) -> float:
        """Opens (or widens) the breaker of a peer; returns for how long it is left alone."""
        with self._lock:
            _, last = self._open.get(node_id, (0.0, 0.0))
            cooldown = min(self.max_s, last * 2 if last else self.cooldown_s)
            self._open[node_id] = (time.monotonic() + cooldown, cooldown)
            return cooldown

    def succeeded(self, node_id: str) -> None:
        with self._lock:
            self._open.pop(node_id, None)

    def allows(self, node_id: str) -> bool:
        """Whether to try this peer now (an expired cooldown lets one try through)."""
        with self._lock:
            until, _ = self._open.get(node_id, (0.0, 0.0))
            if time.monotonic() < until:
                self.skipped += 1
                return False
            return True
