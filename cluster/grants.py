"""A client's granted slots: how a same-node put makes no call to the node actor.

The node grants a client slots of its host arena before the client knows which blocks will go
there (NodeService.grant). A put takes slots from this pool (each slot's generation in the
mapped arena checked: the node changes it when it fences the slot), copies the bytes in and sends
the bind, which names the keys and makes them visible, without waiting for it (cluster/
commits.py: the client reads its own writes at once). Only when the pool runs short does a put
wait for a call: for the slots it lacks plus up to `put_grant_bytes` ahead, taken only from free
slots. A grant lives lease_ttl_s after its last bind; a client that dies or idles loses its
unbound slots to the node's fence, and a slot this pool still lists then fails the generation
check (or the local deadline, which runs out first) and is dropped, never written.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

from kvstore.layout import Layout

_MARGIN_S = 1.0  # a slot is not used this close to its grant's deadline (the bind is still to land)


@dataclasses.dataclass(frozen=True)
class GrantedSlot:
    grant_id: str
    slot: int
    generation: int


class SlotPool:
    """Granted slots per layout; `ask(layout_dict, n, ahead)` is the node's grant call."""

    def __init__(self, ask: Callable[[dict, int, int], tuple[str, list, float]], generations, ahead_bytes: int) -> None:
        self._ask = ask
        self._generations = generations  # the arena's per-slot generations (shared memory)
        self._ahead_bytes = ahead_bytes
        self._slots: dict[bytes, collections.deque[GrantedSlot]] = {}  # layout id -> slots, oldest grant first
        self._deadlines: dict[str, float] = {}  # grant id -> when this client stops using its slots
        self._ttl: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, layout: Layout, n: int) -> list[GrantedSlot]:
        """Up to n live slots for blocks of `layout` (fewer when the node has no room). Each one's
        generation is checked here, just before the caller copies into it: a slot the node fenced
        since is dropped (it may be another writer's now), and the fence's grace covers the copy."""
        with self._lock:
            pool = self._slots.setdefault(layout.id, collections.deque())
            now = time.monotonic()
            taken: list[GrantedSlot] = []
            while pool and len(taken) < n:
                granted = pool.popleft()
                if self._live(granted, now):
                    taken.append(granted)
            if len(taken) < n:
                need = n - len(taken)
                grant_id, slots, ttl = self._ask(layout.to_dict(), need, self._ahead_bytes // layout.block_nbytes)
                self._forget_ended(now)
                self._deadlines[grant_id] = time.monotonic() + ttl - _MARGIN_S
                self._ttl[grant_id] = ttl
                fresh = [GrantedSlot(grant_id, slot, generation) for slot, generation in slots]
                taken.extend(fresh[:need])
                pool.extend(fresh[need:])
            return taken

    def binding(self, grant_ids: set[str]) -> None:
        """A bind of these grants is being sent: each lives lease_ttl_s from when it lands."""
        now = time.monotonic()
        with self._lock:
            for grant_id in grant_ids:
                if grant_id in self._ttl:  # else its deadline passed meanwhile: its slots are not used again
                    self._deadlines[grant_id] = now + self._ttl[grant_id] - _MARGIN_S

    def put_back(self, layout: Layout, unused: list[GrantedSlot]) -> None:
        """Slots a put took but did not bind (its copy failed)."""
        with self._lock:
            self._slots.setdefault(layout.id, collections.deque()).extendleft(reversed(unused))

    def drain(self) -> set[str]:
        """Empties the pool (the client closing): the grants to give back."""
        with self._lock:
            grants = {granted.grant_id for pool in self._slots.values() for granted in pool} | set(self._deadlines)
            self._slots.clear()
            self._deadlines.clear()
            self._ttl.clear()
            return grants

    def _forget_ended(self, now: float) -> None:
        for grant_id in [g for g, deadline in self._deadlines.items() if deadline <= now]:
            del self._deadlines[grant_id], self._ttl[grant_id]

    def _live(self, granted: GrantedSlot, now: float) -> bool:
        return now < self._deadlines.get(granted.grant_id, 0.0) and \
            int(self._generations[granted.slot]) == granted.generation
