"""Per-tenant quotas: the bytes each owner's blocks take in each tier, and which of its blocks
make room when it would go over.

A block put by a tenant (through the data plane, kvstore/tenants.py) carries the tenant's name
as its owner; the admin's blocks have none and count against nothing. An owner's usage in a tier
is the sum of its blocks' lengths (not their slots' rounding) from the moment a slot is reserved
for one until that slot is let go, in whichever tier the block has moved to. The store
(kvstore/store.py) enforces the quotas: a put that would take its owner over the top tier's quota
first demotes that owner's least recently used blocks there, never another owner's; blocks
demoted into a tier where their owner is over quota push out the owner's own blocks there, or
are dropped; what still does not fit is rejected, as a put into a full tier is. Quotas bound a
tenant's share: a tier that is full for everyone still evicts by its policy, so quotas that sum
to at most a tier's size keep tenants from evicting each other there.

`OwnerUsage` is the bookkeeping only: per tier, each owner's bytes and its blocks' keys in
least-recently-used order, updated by the store under its lock as slots are occupied, touched and
let go.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from kvstore.errors import ConfigError

QuotaOf = Callable[[str, str], "int | None"]  # (owner, tier name) -> its quota in bytes there; None: none
MAX_OWNERS = 65535  # owner ids are uint16 per slot; id 0 is "no owner"


class OwnerUsage:
    def __init__(self, tier_names: list[str], slots_per_tier: list[int], quota_of: QuotaOf | None = None) -> None:
        self.tier_names = tier_names
        self.quota_of = quota_of
        self._names = [""]  # owner id -> name
        self._ids: dict[str, int] = {}
        self._slot_owner = [np.zeros(n, dtype=np.uint16) for n in slots_per_tier]
        self._key_at: list[dict[int, bytes]] = [{} for _ in tier_names]  # per tier: slot -> key, owned slots
        self._bytes: list[dict[int, int]] = [{} for _ in tier_names]  # per tier: owner id -> bytes
        self._order: list[dict[int, dict[bytes, None]]] = [{} for _ in tier_names]  # per tier: owner -> keys, LRU first

    def owner_id(self, name: str | None) -> int:
        """The id blocks of owner `name` carry (0 for None: no owner)."""
        if not name:
            return 0
        found = self._ids.get(name)
        if found is None:
            if len(self._names) > MAX_OWNERS:
                raise ConfigError(f"more than {MAX_OWNERS} block owners (tenants) in one store")
            found = self._ids[name] = len(self._names)
            self._names.append(name)
        return found

    def occupied(self, t: int, slot: int, key: bytes, owner: int, nbytes: int) -> None:
        if not owner:
            return
        self._slot_owner[t][slot] = owner
        self._key_at[t][slot] = key
        self._bytes[t][owner] = self._bytes[t].get(owner, 0) + nbytes
        self._order[t].setdefault(owner, {})[key] = None

    def vacated(self, t: int, slot: int, nbytes: int) -> None:
        """Slot `slot` of tier t, holding a block of `nbytes`, is let go (idempotent)."""
        owner = int(self._slot_owner[t][slot])
        if not owner:
            return
        self._slot_owner[t][slot] = 0
        key = self._key_at[t].pop(slot)
        self._bytes[t][owner] -= nbytes
        self._order[t][owner].pop(key, None)

    def touched(self, t: int, slot: int) -> None:
        """The block in slot `slot` of tier t was read: its owner's most recently used."""
        owner = int(self._slot_owner[t][slot])
        if owner:
            order = self._order[t][owner]
            key = self._key_at[t][slot]
            del order[key]
            order[key] = None

    def room(self, t: int, owner: int) -> int | None:
        """Bytes owner `owner` may still add to tier t; None if it has no quota there."""
        if not owner or self.quota_of is None:
            return None
        quota = self.quota_of(self._names[owner], self.tier_names[t])
        return None if quota is None else quota - self._bytes[t].get(owner, 0)

    def oldest(self, t: int, owner: int) -> Iterator[bytes]:
        """Owner's keys in tier t, least recently used first (do not change tier t meanwhile)."""
        return iter(self._order[t].get(owner, {}))

    def stats(self) -> dict:
        """Per owner: per tier, its bytes and its quota (None: no quota there)."""
        out: dict[str, dict] = {}
        for owner, name in enumerate(self._names[1:], start=1):
            out[name] = {tier: {"bytes": self._bytes[t].get(owner, 0),
                                "quota": None if self.quota_of is None else self.quota_of(name, tier)}
                         for t, tier in enumerate(self.tier_names)}
        return out
