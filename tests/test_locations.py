"""A client's location hints and peer breaker (cluster/locations.py), on their own."""
from __future__ import annotations

import os

from kvstore.cluster.locations import LocationCache, PeerBreaker


def test_location_hints_are_bounded_and_forgotten_by_node():
    cache = LocationCache(capacity=3)
    keys = [os.urandom(16) for _ in range(4)]
    for i, key in enumerate(keys):
        cache.learn(key, "a" if i % 2 else "b")
    assert cache.owner(keys[0]) is None and len(cache) == 3  # the least recently used went
    cache.forget_node("a")
    assert [cache.owner(k) for k in keys[1:]] == [None, "b", None]


def test_a_failing_peer_is_left_alone_longer_each_time_until_it_succeeds(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("kvstore.cluster.locations.time.monotonic", lambda: now[0])
    breaker = PeerBreaker(cooldown_s=2.0, max_s=5.0)
    assert breaker.allows("b")
    assert breaker.failed("b") == 2.0
    assert not breaker.allows("b") and breaker.allows("c") and breaker.skipped == 1
    now[0] += 2.1
    assert breaker.allows("b")  # one try goes through after the cooldown
    assert breaker.failed("b") == 4.0 and breaker.failed("b") == 5.0  # doubled, capped
    now[0] += 4.9
    assert not breaker.allows("b")
    breaker.succeeded("b")
    assert breaker.allows("b") and breaker.failed("b") == 2.0  # a success resets the cooldown
