"""A client's puts whose commit is still on its way to the node actor.

A same-node put returns once its bytes are in the arena; the commit that makes them visible (a
bind of granted slots, or a reserved hold's commit) is sent to the node actor without waiting for it (a round trip saved per put). The node actor runs
calls concurrently, so a later call of the same client may overtake that commit: before this
client reads, leases or deletes keys it wrote, it waits for their commits (`settle`), and so
reads its own writes. Other processes see the blocks once the commit has run on the node (about
one actor call after the put), and other nodes with the node's next event batch.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable

import ray

log = logging.getLogger(__name__)

PRUNE_ABOVE = 4096  # keys awaiting a commit before the done ones are dropped


class PendingCommits:
    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._by_key: dict[bytes, ray.ObjectRef] = {}
        self._lock = threading.Lock()

    def add(self, keys: Iterable[bytes], commit: ray.ObjectRef) -> None:
        with self._lock:
            for key in keys:
                self._by_key[key] = commit
            full = len(self._by_key) > PRUNE_ABOVE
        if full:
            self._prune()

    def settle(self, keys: Iterable[bytes] | None = None) -> bool:
        """Returns once the commits of `keys` (None: of every put so far) have run on the node;
        whether there were any to wait for."""
        with self._lock:
            if not self._by_key:
                return False
            if keys is None:
                refs = set(self._by_key.values())
            else:
                refs = {self._by_key[k] for k in keys if k in self._by_key}
        if refs:
            self._collect(list(refs))
        return bool(refs)

    def _prune(self) -> None:
        with self._lock:
            refs = list(set(self._by_key.values()))
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        self._collect(done)

    def _collect(self, refs: list) -> None:
        """Waits for `refs` and forgets their keys; a commit that failed (its hold expired before
        it ran) is logged: its blocks never became visible, as if evicted."""
        for ref in refs:
            try:
                ray.get(ref, timeout=self._timeout_s)
            except Exception as e:  # LeaseError, or the node actor died (its blocks went with it)
                log.warning("a put's commit failed, its blocks were not stored: %s", e)
        done = set(refs)
        with self._lock:
            self._by_key = {k: r for k, r in self._by_key.items() if r not in done}
