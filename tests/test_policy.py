"""Eviction policies: LRU order, S3-FIFO scan resistance, prefix-aware ordering."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import ConfigError
from kvstore.policy import LRUPolicy, S3FIFOPolicy, make_policy


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
@pytest.mark.parametrize("prefix", [False, True])
def test_s3fifo_hot_block_survives_a_one_off_scan(capacity, prefix):
    cache = Cache(make_policy("s3fifo", capacity, Chains().has_children if prefix else None), capacity)
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


class Chains:
    """Tells a prefix-aware policy of children appearing and going, as the store does."""

    def __init__(self) -> None:
        self.children: dict[bytes, int] = {}
        self.policy = None

    def has_children(self, key: bytes) -> bool:
        return key in self.children

    def link(self, parent: bytes) -> None:
        self.children[parent] = self.children.get(parent, 0) + 1
        if self.children[parent] == 1:
            self.policy.set_has_children(parent, True)

    def unlink(self, parent: bytes) -> None:
        self.children[parent] -= 1
        if not self.children[parent]:
            del self.children[parent]
            self.policy.set_has_children(parent, False)


def prefix_aware(name: str, capacity: int = 100) -> tuple:
    chains = Chains()
    chains.policy = make_policy(name, capacity, chains.has_children)
    return chains.policy, chains


def test_prefix_aware_children_before_parents():
    # Chain a -> b -> c, and a lone block d; LRU order a, b, c, d.
    a, b, c, d = k(1), k(2), k(3), k(4)
    p, chains = prefix_aware("lru")
    for key in (a, b, c, d):
        p.insert(key)
    chains.link(a)
    chains.link(b)
    assert list(p.candidates()) == [c, d, a, b]
    # c is evicted: b loses its child and goes before its own parent a.
    p.remove(c)
    chains.unlink(b)
    assert list(p.candidates()) == [b, d, a]
    p.touch(b)
    assert list(p.candidates()) == [d, b, a]
    assert len(p) == 3


def test_prefix_aware_lru_stays_lru_among_leaves():
    """Childless blocks go in plain LRU order; a parent that loses its last child takes its
    place in time: first when it was used before every leaf, last when used after all."""
    p, chains = prefix_aware("lru")
    plain = LRUPolicy()
    old_parent, root = k(10), k(11)
    p.insert(old_parent)
    chains.link(old_parent)  # used before every leaf below
    for i in range(6):
        p.insert(k(i))
        plain.insert(k(i))
    p.insert(root)
    chains.link(root)  # a root shared by many prompts
    for i in (3, 0, 4):
        p.touch(k(i))
        plain.touch(k(i))
    p.touch(root)  # used after every leaf
    assert list(p.candidates()) == list(plain.candidates()) + [old_parent, root]
    assert list(plain.candidates()) == [k(1), k(2), k(5), k(3), k(0), k(4)]
    chains.unlink(old_parent)
    chains.unlink(root)
    assert list(p.candidates()) == [old_parent, k(1), k(2), k(5), k(3), k(0), k(4), root]


def test_prefix_aware_still_evicts_when_everything_has_children():
    for name in ("lru", "s3fifo"):
        p, chains = prefix_aware(name)
        for i in range(3):
            p.insert(k(i))
            chains.link(k(i))
        assert sorted(p.candidates()) == [k(0), k(1), k(2)]


def test_not_prefix_aware_ignores_children():
    p = make_policy("lru", 4)
    for i in range(3):
        p.insert(k(i))
    p.set_has_children(k(0), True)
    assert list(p.candidates()) == [k(0), k(1), k(2)]


class CountedKey(bytes):
    """A key that counts how often a dict or set looks it up: the keys a policy visits."""

    lookups = 0

    def __hash__(self) -> int:
        CountedKey.lookups += 1
        return bytes.__hash__(self)


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_finding_a_victim_visits_the_same_keys_at_any_size(name):
    """O(1) per victim: in a prompt chain every block but the tail has a child, and the victim
    (the tail) must be found without walking past the parents."""
    def lookups_per_victim(n: int) -> int:
        p, chains = prefix_aware(name, capacity=n)
        keys = [CountedKey(k(i)) for i in range(n)]
        for i in reversed(range(n)):  # leaf first, as the store inserts a chain
            p.insert(keys[i])
            if i:
                chains.link(keys[i - 1])
        for _ in range(3):  # settle S3-FIFO's first pass
            victim = next(iter(p.candidates()))
            p.remove(victim)
        CountedKey.lookups = 0
        for _ in range(10):
            victim = next(iter(p.candidates()))
            p.remove(victim)
            chains.unlink(keys[keys.index(victim) - 1])
        return CountedKey.lookups - 10 * 4  # the driver's own link bookkeeping

    small, large = lookups_per_victim(100), lookups_per_victim(10_000)
    assert large == small, (small, large)
    assert small < 10 * 20


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_a_chain_is_eaten_from_its_tail(name):
    p, chains = prefix_aware(name, capacity=10)
    chain = [k(i) for i in range(8)]
    for i in reversed(range(8)):
        p.insert(chain[i])
        if i:
            chains.link(chain[i - 1])
    evicted = []
    for _ in range(8):
        victim = next(iter(p.candidates()))
        p.remove(victim)
        evicted.append(victim)
        i = chain.index(victim)
        if i:
            chains.unlink(chain[i - 1])
    assert evicted == chain[::-1]


def test_s3fifo_prefix_aware_hot_chains_survive_a_one_off_chained_scan():
    """A long prompt seen once is one chain: all its blocks but the tail have children. It must
    not flush the reused prefixes (hot chains in the main queue) all the same."""
    capacity = 40
    p, chains = prefix_aware("s3fifo", capacity)
    resident: list[bytes] = []
    parent_of: dict[bytes, bytes] = {}

    def put_chain(keys: list[bytes]) -> None:
        for i in reversed(range(len(keys))):
            while len(resident) >= capacity:
                victim = next(iter(p.candidates()))
                p.remove(victim)
                resident.remove(victim)
                if victim in parent_of:
                    chains.unlink(parent_of[victim])
            p.insert(keys[i])
            resident.append(keys[i])
            if i:
                parent_of[keys[i]] = keys[i - 1]
                chains.link(keys[i - 1])

    hot = [[k(100 * c + i) for i in range(4)] for c in range(3)]
    for chain in hot:
        put_chain(chain)
        for _ in range(2):
            for key in chain:
                p.touch(key)
    scan = [k(10_000 + i) for i in range(20 * capacity)]
    for start in range(0, len(scan), 10):  # put in pieces, as the store chunks a batch
        put_chain(scan[start:start + 10])
    assert {key for chain in hot for key in chain} <= set(resident)
    assert len(resident) == capacity


def test_make_policy():
    assert isinstance(make_policy("lru", 4), LRUPolicy)
    assert isinstance(make_policy("s3fifo", 4), S3FIFOPolicy)
    with pytest.raises(ConfigError, match="'arc'"):
        make_policy("arc", 4)


ops = st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove", "evict", "link", "unlink"]),
                         st.integers(0, 15)),
               max_size=120)


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
@pytest.mark.parametrize("prefix", [False, True])
@given(ops=ops, take=st.integers(1, 6))
@settings(max_examples=60, deadline=None, database=None)
def test_candidates_offer_each_resident_key_once(name, prefix, ops, take):
    """Whatever happened before, candidates() offers exactly the resident keys, each once, when
    none is taken; and the first `take` offers (a batched eviction) are distinct. Prefix-aware
    LRU offers every leaf before every parent."""
    capacity = 8
    chains = Chains()
    for i in range(0, 16, 3):
        chains.children[k(i)] = 1
    policy = make_policy(name, capacity, chains.has_children if prefix else None)
    chains.policy = policy
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
        elif op == "link":
            chains.link(key)
        elif op == "unlink" and key in chains.children:
            chains.unlink(key)
        assert len(policy) == len(resident)
    offered = list(policy.candidates())
    assert sorted(offered) == sorted(resident)
    if prefix and name == "lru":
        flags = [chains.has_children(key) for key in offered]
        assert flags == sorted(flags), "a parent was offered before a leaf"
    first = list(itertools.islice(policy.candidates(), take))
    assert len(set(first)) == len(first) == min(take, len(resident))
