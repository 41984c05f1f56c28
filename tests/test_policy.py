"""Eviction policies: LRU order, S3-FIFO scan resistance, prefix-aware ordering."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError
from kvstore.policy import LRUPolicy, PrefixAwarePolicy, S3FIFOPolicy, make_policy


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Cache:
    """Drives a policy the way the store does: evict the first candidate when full."""

    def __init__(self, policy, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self.resident: set[bytes] = set()
        self.evicted: list[bytes] = []

    def access(self, key: bytes) -> None:
        if key in self.resident:
            self.policy.touch(key)
            return
        if len(self.resident) >= self.capacity:
            victim = next(iter(self.policy.candidates()))
            self.policy.remove(victim)
            self.resident.remove(victim)
            self.evicted.append(victim)
        self.policy.insert(key)
        self.resident.add(key)


def test_lru_order():
    p = LRUPolicy()
    for i in range(4):
        p.insert(k(i))
    assert list(p.candidates()) == [k(0), k(1), k(2), k(3)]
    p.touch(k(0))
    p.touch(k(2))
    assert list(p.candidates()) == [k(1), k(3), k(0), k(2)]
    p.remove(k(3))
    p.remove(k(3))  # removing twice is harmless
    p.touch(k(99))  # touching an absent key is harmless and does not add it
    assert list(p.candidates()) == [k(1), k(0), k(2)]
    assert len(p) == 3
    p.insert(k(1))  # re-insert refreshes
    assert list(p.candidates()) == [k(0), k(2), k(1)]


def test_lru_is_flushed_by_a_scan():
    """The contrast S3-FIFO exists for: under LRU a one-off scan evicts the hot block."""
    cache = Cache(LRUPolicy(), 10)
    cache.access(k(0))
    cache.access(k(0))
    cache.access(k(0))
    for i in range(1000, 1100):
        cache.access(k(i))
    assert k(0) not in cache.resident


@pytest.mark.parametrize("capacity", [4, 10, 64])
def test_s3fifo_hot_block_survives_a_one_off_scan(capacity):
    cache = Cache(S3FIFOPolicy(capacity), capacity)
    hot = [k(i) for i in range(max(1, capacity // 4))]
    for key in hot:
        cache.access(key)
    for key in hot:  # each hit twice
        cache.access(key)
        cache.access(key)
    scan = [k(10_000 + i) for i in range(20 * capacity)]
    for key in scan:
        cache.access(key)
    assert set(hot) <= cache.resident
    assert cache.evicted, "the scan must have evicted something"
    assert set(cache.evicted) <= set(scan), "only the scan's own blocks may be evicted"
    assert len(cache.resident) == capacity


def test_s3fifo_ghost_readmits_to_main():
    p = S3FIFOPolicy(10)
    p.insert(k(1))
    p.remove(k(1))  # leaves the small queue: remembered as a ghost
    p.insert(k(1))  # comes back: straight to main
    for i in range(2, 12):
        p.insert(k(i))
    # Small is over target, so it is drained first: k(1) in main is offered last.
    assert list(p.candidates())[-1] == k(1)


def test_s3fifo_never_offers_a_key_twice():
    """The store takes several victims before removing any (a batched put): every offer must
    be a distinct key, or it would move one block twice."""
    p = S3FIFOPolicy(8)
    for i in range(8):
        p.insert(k(i))
    for i in range(8):
        p.touch(k(i))
    victim = next(iter(p.candidates()))
    p.remove(victim)
    p.insert(k(8))  # small: [k8], main: the other seven
    two = list(itertools.islice(p.candidates(), 2))
    assert len(set(two)) == 2, two


def test_s3fifo_offers_a_victim_when_everything_is_hot():
    p = S3FIFOPolicy(8)
    for i in range(8):
        p.insert(k(i))
        p.remove(k(i))  # ghosts
    for i in range(8):
        p.insert(k(i))  # readmitted to main
    for _ in range(5):
        for i in range(8):
            p.touch(k(i))  # frequency saturates
    assert sorted(p.candidates()) == [k(i) for i in range(8)]


def test_s3fifo_capacity_must_be_positive():
    with pytest.raises(ConfigError, match="capacity=0"):
        S3FIFOPolicy(0)


def test_prefix_aware_children_before_parents():
    # Chain a -> b -> c, and a lone block d; LRU order a, b, c, d.
    a, b, c, d = k(1), k(2), k(3), k(4)
    children = {a: 1, b: 1}
    p = PrefixAwarePolicy(LRUPolicy(), children.__contains__)
    for key in (a, b, c, d):
        p.insert(key)
    assert list(p.candidates()) == [c, d, a, b]
    # c is evicted: b loses its child and goes before its own parent a.
    p.remove(c)
    del children[b]
    assert list(p.candidates()) == [b, d, a]
    p.touch(b)
    assert list(p.candidates()) == [d, b, a]
    assert len(p) == 3


def test_prefix_aware_still_evicts_when_everything_has_children():
    children = {k(i): 1 for i in range(3)}
    p = PrefixAwarePolicy(LRUPolicy(), children.__contains__)
    for i in range(3):
        p.insert(k(i))
    assert list(p.candidates()) == [k(0), k(1), k(2)]


def test_make_policy():
    assert isinstance(make_policy("lru", 4), LRUPolicy)
    assert isinstance(make_policy("s3fifo", 4), S3FIFOPolicy)
    assert isinstance(make_policy("lru", 4, lambda key: False), PrefixAwarePolicy)
    with pytest.raises(ConfigError, match="'arc'"):
        make_policy("arc", 4)


ops = st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove", "evict"]), st.integers(0, 15)),
               max_size=120)


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
@pytest.mark.parametrize("prefix", [False, True])
@given(ops=ops, take=st.integers(1, 6))
@settings(max_examples=60, deadline=None, database=None)
def test_candidates_offer_each_resident_key_once(name, prefix, ops, take):
    """Whatever happened before, candidates() offers exactly the resident keys, each once, when
    none is taken; and the first `take` offers (a batched eviction) are distinct."""
    capacity = 8
    children = {k(i): 1 for i in range(0, 16, 3)}
    policy = make_policy(name, capacity, children.__contains__ if prefix else None)
    resident: set[bytes] = set()
    for op, i in ops:
        key = k(i)
        if op == "insert" and key not in resident:
            if len(resident) >= capacity:
                continue
            policy.insert(key)
            resident.add(key)
        elif op == "touch":
            policy.touch(key)
        elif op == "remove" and key in resident:
            policy.remove(key)
            resident.discard(key)
        elif op == "evict" and resident:
            victim = next(iter(policy.candidates()))
            assert victim in resident
            policy.remove(victim)
            resident.discard(victim)
        assert len(policy) == len(resident)
    offered = list(policy.candidates())
    assert sorted(offered) == sorted(resident)
    first = list(itertools.islice(policy.candidates(), take))
    assert len(set(first)) == len(first) == min(take, len(resident))
