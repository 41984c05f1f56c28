"""The store against a model: random sequences of puts, gets, pins, deletes, clears and restarts
over hbm (on CPU) -> host -> nvme, and a threaded stress test.

The model is the event stream itself: BlockStored / BlockRemoved say where every block is, so
every disappearance of an acknowledged put is accounted for by an eviction or a delete.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, initialize

from kvstore.block import BlockState
from kvstore.events import AllBlocksCleared, BlockStored
from kvstore.keys import chain_parents
from kvstore.store import TieredStore

from kvtest_support import (LAYOUT, EventLog, StoreFactory, assert_consistent, batch, empty_out,
                            leftover_arenas, make_store, payload)

__all__ = ["make_store"]

POOL = [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=16).digest() for i in range(24)]
MEDIUM_OF = {"hbm": "GPU", "host": "CPU", "nvme": "DISK"}
TIER_SLOTS = dict(hbm_slots=2, host_slots=3, nvme_slots=5)  # 10 slots for 24 keys: eviction is routine

indices = st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=5, unique=True)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvstore-sm-")
        self.factory = StoreFactory(None)
        self.store: TieredStore | None = None
        self.version = 0
        self.value: dict[bytes, int] = {}  # key -> version of the put that stored what is there now
        self.held: list = []  # handles from acquire, not yet released

    # -- set-up and restarts --------------------------------------------------------------------

    def _open(self) -> None:
        self.log = EventLog()
        self.store = TieredStore(
            self.factory.tiers(("hbm", "host", "nvme"), nvme_dir=self.dir, **TIER_SLOTS),
            listener=self.log, policy=self.policy, prefix_aware=self.prefix_aware,
            promote_on_hit=self.promote)
        # Blocks recovered from NVMe are the store's starting content.
        self.offset = len(self.log.where)

    @initialize(policy=st.sampled_from(["lru", "s3fifo"]), prefix_aware=st.booleans(), promote=st.booleans())
    def start(self, policy, prefix_aware, promote):
        self.policy, self.prefix_aware, self.promote = policy, prefix_aware, promote
        self._open()

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.release([h for h, _ in self.held])
        finally:
            try:
                self.factory.close()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)
                left = leftover_arenas(remove=True)
        assert not left

    # -- rules ----------------------------------------------------------------------------------

    @rule(idx=indices, chained=st.booleans())
    def put(self, idx, chained):
        keys = [POOL[i] for i in idx]
        self.version += 1
        mark = len(self.log.events)
        res = self.store.put(LAYOUT, keys, batch(keys, self.version),
                             parents=chain_parents(keys) if chained else None)
        top = self.store.tiers[0].medium
        new = [k for e in self.log.events[mark:] if isinstance(e, BlockStored) and e.medium == top
               for k in e.block_hashes]
        # During a put, BlockStored on the top medium means exactly "stored by this put".
        assert len(new) == len(set(new)) == res.stored
        assert set(new) <= set(keys)
        assert res.stored + res.present + len(res.rejected) == len(keys)
        if not self.held:
            assert res.rejected == []  # nothing pinned: there is always a victim
        for k in new:
            self.value[k] = self.version

    @rule(idx=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=6))
    def get(self, idx):
        keys = [POOL[i] for i in idx]
        before = self.store.where(keys)
        out = empty_out(len(keys))
        res = self.store.get(LAYOUT, keys, out)
        for i, (k, tier) in enumerate(zip(keys, res.tiers)):
            if tier is None:
                # A miss only for a key the events say is gone (evicted, deleted or never put).
                assert before[i] is None, f"{k.hex()} was in {before[i]} but missed"
                assert torch.all(out[i] == 0xAB)
            else:
                assert tier == before[i]
                assert torch.equal(out[i], payload(k, self.value[k])), f"wrong bytes for {k.hex()}"

    @rule(idx=indices)
    def delete(self, idx):
        keys = [POOL[i] for i in idx]
        present = self.store.contains(keys)
        assert self.store.delete(keys) == sum(present)
        assert self.store.contains(keys) == [False] * len(keys)

    @precondition(lambda self: len(self.held) < 4)
    @rule(idx=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=2))
    def acquire(self, idx):
        """A pin held across steps (an outside reader): eviction must leave it alone."""
        keys = [POOL[i] for i in idx]
        before = self.store.contains(keys)
        handles = self.store.acquire(LAYOUT, keys)
        for k, was, h in zip(keys, before, handles):
            if not was:
                assert h is None
            if h is not None:
                assert h.tier in ("hbm", "host")
                assert torch.equal(h.view, payload(k, self.value[k]))
                self.held.append((h, self.value[k]))
        self.held_handles_sanity()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.integers(0, len(self.held) - 1))
        handle, version = self.held.pop(i)
        # Nobody wrote over a pinned block, whatever happened meanwhile.
        assert torch.equal(handle.view, payload(handle.key, version))
        self.store.release([handle])

    @rule()
    def read_everything(self):
        keys = [k for k in POOL if k in self.log.where]
        out = empty_out(len(keys))
        res = self.store.get(LAYOUT, keys, out)
        assert all(res.found)
        assert torch.equal(out, torch.stack([payload(k, self.value[k]) for k in keys]) if keys else out)

    @precondition(lambda self: len(self.log.where) >= 8)  # now and then, on a well-filled store
    @rule()
    def clear(self):
        self.store.clear()
        assert isinstance(self.log.events[-1], AllBlocksCleared)
        stats = self.store.stats()
        self.offset = -self._net(stats)

    @precondition(lambda self: not self.held and sum(m == "DISK" for m in self.log.where.values()) >= 3)
    @rule()
    def restart(self):
        on_disk = {k for k, m in self.log.where.items() if m == "DISK"}
        self.factory.close()
        self._open()
        # Exactly what was on NVMe comes back; memory tiers start empty.
        assert set(self.log.where) == on_disk
        assert all(m == "DISK" for m in self.log.where.values())

    # -- invariants -----------------------------------------------------------------------------

    def held_handles_sanity(self) -> None:
        for h, _ in self.held:
            assert h.entry.pins > 0

    @staticmethod
    def _net(stats) -> int:
        evicted = sum(t["evictions"] for t in stats["tiers"])
        stored = stats["puts"] - stats["put_present"] - stats["put_rejected"]
        return stored - evicted - stats["deletes"] - stats["corrupt_dropped"]

    @invariant()
    def consistent(self):
        if self.store is None:
            return
        stats = self.store.stats()
        for t in stats["tiers"]:
            assert 0 <= t["used_slots"] <= t["slots"], t
        doomed_held = {id(h.entry) for h, _ in self.held if h.entry.state is BlockState.DOOMED}
        assert sum(t["used_slots"] for t in stats["tiers"]) == stats["blocks"] + len(doomed_held)
        # Every block the store has is one the events announced, where they said.
        where = self.store.where(POOL)
        assert {k: MEDIUM_OF[w] for k, w in zip(POOL, where) if w} == self.log.where
        assert stats["blocks"] == len(self.log.where)
        # ... and every acknowledged put that is gone was counted as evicted or deleted.
        assert stats["blocks"] == self.offset + self._net(stats)
        for k in self.log.where:
            assert k in self.value


    @invariant()
    def lru_offers_every_ready_block_leaves_first(self):
        """Each tier's LRU policy offers exactly its READY blocks, and prefix-aware, those no
        stored block names as parent before the others: the store told the policy of every
        child that came and went, in whichever tier. (S3-FIFO's offers age its queues, so
        looking would change what is checked.)"""
        if self.store is None or self.policy != "lru":
            return
        entries = list(self.store._index.values())
        parents = {e.parent for e in entries if e.visible and e.parent is not None}
        for t, policies in enumerate(self.store._policies):  # one per size class of each tier
            tier = self.store.tiers[t]
            ready = [e for e in entries if e.tier == t and e.state is BlockState.READY]
            assert sum(len(p) for p in policies.values()) == len(ready)
            for stride, policy in policies.items():
                offered = list(policy.candidates())
                assert sorted(offered) == sorted(e.key for e in ready if tier.stride_of(e.slot) == stride)
                if self.prefix_aware:
                    has_children = [key in parents for key in offered]
                    assert has_children == sorted(has_children), "a parent is offered before a leaf"


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStoreMachine = StoreMachine.TestCase


# -- threads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_threaded_stress(make_store, policy):
    """4 threads put/get/acquire/delete overlapping keys for a second per policy; every payload
    encodes its key, so any read of the wrong block, a freed slot or a half-written one is caught."""
    log = EventLog()
    store = make_store(("hbm", "host", "nvme"), hbm_slots=4, host_slots=8, nvme_slots=16, listener=log,
                       policy=policy)
    keys = [hashlib.blake2b(b"stress" + bytes([i]), digest_size=16).digest() for i in range(40)]
    expected = {k: payload(k) for k in keys}
    stop = time.monotonic() + 1.0
    errors: list[BaseException] = []
    corrupt: list[bytes] = []
    ops = [0] * 4

    def worker(n: int) -> None:
        rng = random.Random(n)
        try:
            while time.monotonic() < stop:
                ks = rng.sample(keys, rng.randint(1, 4))
                op = rng.random()
                if op < 0.4:
                    res = store.put(LAYOUT, ks, torch.stack([expected[k] for k in ks]),
                                    parents=chain_parents(ks) if rng.random() < 0.5 else None)
                    # Fewer only where another thread deleted a block while it was being written.
                    assert res.stored + res.present + len(res.rejected) <= len(ks)
                elif op < 0.85:
                    out = empty_out(len(ks))
                    res = store.get(LAYOUT, ks, out)
                    for i, tier in enumerate(res.tiers):
                        if tier is not None and not torch.equal(out[i], expected[ks[i]]):
                            corrupt.append(ks[i])
                elif op < 0.95:
                    store.delete(ks[:1])
                else:
                    handles = store.acquire(LAYOUT, ks)
                    try:
                        for k, h in zip(ks, handles):
                            if h is not None and not torch.equal(h.view, expected[k]):
                                corrupt.append(k)
                    finally:
                        store.release(handles)
                ops[n] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors
    assert not corrupt, [k.hex() for k in corrupt]
    assert all(n > 10 for n in ops), ops
    assert_consistent(store)  # no leaked slots: used == blocks
    stats = store.stats()
    assert stats["io_errors"] == 0 and stats["corrupt_dropped"] == 0
    assert stats["hits"] > 0 and sum(t["demotions"] for t in stats["tiers"]) > 0
    present = [k for k in keys if store.contains([k])[0]]
    assert {k: log.where[k] for k in present} == {
        k: MEDIUM_OF[w] for k, w in zip(present, store.where(present))}
    assert set(log.where) == set(present)
    out = empty_out(len(present))
    assert store.get(LAYOUT, present, out).hits == len(present)
    assert torch.equal(out, torch.stack([expected[k] for k in present]))
    assert_consistent(store)
