"""A client's puts whose commit is still on its way to the node actor (or queued to be sent).

A same-node put returns once its bytes are in the arena; the commit that makes them visible (a
bind of granted slots, or a reserved hold's commit) is sent to the node actor without waiting for it (a round trip saved per put). The node actor runs
calls concurrently, so a later call of the same client may overtake that commit: before this
client reads, leases or deletes keys it wrote, it waits for their commits (`settle`), and so
reads its own writes. Other processes see the blocks once the commit has run on the node (about
one actor call after the put), and other nodes with the node's next event batch.

Binds of granted slots (cluster/grants.py) are not even sent by the put: it queues them, and a
thread sends everything queued in one call (NodeService.bind_many), so a run of small puts
costs one call between them, and a put costs a copy. A settle sends what is queued for its keys
at once.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

import ray

log = logging.getLogger(__name__)

PRUNE_ABOVE = 4096  # keys awaiting a commit before the done ones are dropped


_QUEUED = object()  # a key whose bind is queued here, not sent yet


class PendingCommits:
    """`send(binds)`, where binds is [(grant id, writes)], sends deferred binds in one call (the
    node's bind_many) and returns its ObjectRef."""

    def __init__(self, timeout_s: float, send: Callable[[list], ray.ObjectRef] | None = None) -> None:
        self._timeout_s = timeout_s
        self._send = send
        self._by_key: dict[bytes, object] = {}  # key -> the ObjectRef of its commit, or _QUEUED
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a queued bind was sent
        self._queued: list[tuple[list[bytes], str, list]] = []  # (keys, grant id, writes)
        self._sending = threading.Lock()  # one sender at a time: the thread, or a settle
        self._sender: threading.Thread | None = None

    def defer(self, keys: list[bytes], grant_id: str, writes: list) -> None:
        """Queues a bind of granted slots: a thread sends what is queued in one call, as soon as
        it can (a put returns without even the cost of sending one)."""
        with self._lock:
            self._queued.append((keys, grant_id, writes))
            for key in keys:
                self._by_key[key] = _QUEUED
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_queued_forever, name="kvstore-binds", daemon=True)
                self._sender.start()
            self._changed.notify_all()

    def _send_queued_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queued:
                    self._changed.wait()
            self._send_queued()

    def _send_queued(self) -> None:
        """Sends every queued bind in one call and records its ref for their keys."""
        with self._sending:
            with self._lock:
                batch, self._queued = self._queued, []
            if not batch:
                return
            try:
                ref = self._send([(grant_id, writes) for _, grant_id, writes in batch])
            except Exception as e:  # noqa: BLE001 - the node is gone: these blocks were never stored
                log.warning("sending %d puts' binds failed, their blocks were not stored: %s", len(batch), e)
                ref = None
            with self._lock:
                for keys, _, _ in batch:
                    for key in keys:
                        if self._by_key.get(key) is _QUEUED:
                            if ref is None:
                                del self._by_key[key]
                            else:
                                self._by_key[key] = ref
                self._changed.notify_all()
                full = len(self._by_key) > PRUNE_ABOVE
            if full:
                self._prune()

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
            keys = list(self._by_key) if keys is None else [k for k in keys if k in self._by_key]
            queued = any(self._by_key[k] is _QUEUED for k in keys)
        if queued:
            self._send_queued()  # now, rather than wait for the thread
        with self._lock:
            # A batch the thread took before the call above may still be on its way out.
            while any(self._by_key.get(k) is _QUEUED for k in keys):
                self._changed.wait(self._timeout_s)
            refs = {self._by_key[k] for k in keys if k in self._by_key}
        if refs:
            self._collect(list(refs))
        return bool(refs)

    def _prune(self) -> None:
        with self._lock:
            refs = list({r for r in self._by_key.values() if r is not _QUEUED})
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
            self._by_key = {k: r for k, r in self._by_key.items() if r is _QUEUED or r not in done}
