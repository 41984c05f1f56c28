"""A client's memory of where other nodes' blocks are, so a remote get asks the controller only
for keys it has not seen (or whose owner turned out not to have them any more).

Locations are hints, never trusted for bytes: a block pulled from a stale owner is simply not
sent (and every block that is sent is checked against its key and checksum), so a stale entry
costs one more lookup, never wrong KV. Bounded: the least recently used entries go first.
"""
from __future__ import annotations

import threading
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
