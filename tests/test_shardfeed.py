"""A node's feed to the index shards (cluster/shardfeed.py) against in-process shards
(cluster/shards.py): chunked, numbered, retried, resynced one shard at a time."""
from __future__ import annotations

import os

import pytest

from kvstore import events as event_wire
from kvstore.cluster import shardfeed, shardmap
from kvstore.cluster.index import keys_array
from kvstore.cluster.shardfeed import ShardFeed
from kvstore.cluster.shards import IndexShard
from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, stored_events


class FakeStore:
    """What the feed needs of a TieredStore: events through a listener, and a snapshot."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, str] = {}
        self.listener = None

    def put(self, keys: list[bytes], medium: str = "CPU") -> None:
        self.blocks.update(dict.fromkeys(keys, medium))
        self.listener(stored_events(keys, [None] + keys[:-1], medium))

    def evict(self, keys: list[bytes]) -> None:
        for key in keys:  # one event a block, as TieredStore._drop announces them
            self.listener([BlockRemoved([key], self.blocks.pop(key))])

    def resync(self) -> None:
        events = [AllBlocksCleared()]
        for medium in ("CPU", "DISK"):
            keys = [k for k, m in self.blocks.items() if m == medium]
            events += [BlockStored(keys, None, medium)] if keys else []
        self.listener(events)


class LocalShards:
    """The feed's transport to in-process shards; `fail(shard, seq)` says "lose this attempt":
    "request" (the shard never sees it) or "reply" (the shard applies it, the answer is lost)."""

    def __init__(self, shards: list[IndexShard], fail=lambda shard, seq: None) -> None:
        self.shards, self.fail, self.sent = shards, fail, []

    def count(self):
        return len(self.shards)

    def send(self, shard, node_id, stream, seq, payload, synced):
        self.sent.append((shard, seq, len(payload)))
        lost = self.fail(shard, seq)
        if lost == "request":
            return ConnectionError(f"shard {shard} unreachable")
        answer = self.shards[shard].apply(node_id, stream, seq, payload, synced)
        return TimeoutError("reply lost") if lost == "reply" else answer

    def wait(self, pending, timeout_s):
        return list(pending)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def feed_for(store: FakeStore, transport, node_id: str = "node-a") -> ShardFeed:
    feed = ShardFeed(node_id, transport, snapshot=store.resync)
    store.listener = feed.enqueue
    return feed


def held(shards, node_id, blocks) -> int:
    parts = shardmap.split(blocks, len(shards))
    answers = [shards[p.shard].prefix_by_node(p.keys).get(node_id, 0) for p in parts]
    return shardmap.prefix_by_node(parts, [{node_id: a} for a in answers], [node_id], len(blocks))[node_id]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(shardfeed, "BACKOFF_MIN_S", 0.0)
    monkeypatch.setattr(shardfeed, "BACKOFF_MAX_S", 0.0)


def test_a_resync_larger_than_one_message_lands_once(monkeypatch):
    monkeypatch.setattr(event_wire, "MAX_EVENT_BATCH_BYTES", 4096)  # ~200 keys a message
    shards = [IndexShard(i, 2) for i in range(2)]
    transport = LocalShards(shards)
    store = FakeStore()
    feed = feed_for(store, transport)
    blocks = keys(3000)
    store.blocks.update(dict.fromkeys(blocks, "DISK"))  # found on NVMe at start
    feed.resync()
    assert feed.drain(timeout_s=60)
    assert max(size for _, _, size in transport.sent) <= 4096
    for shard in shards:
        stats = shard.stats()
        assert stats["streams"] == 1 and stats["duplicates"] == 0 and stats["resyncs_asked"] == 0
        assert stats["chunks"] > 1 and shard.synced_nodes() == ["node-a"]
    assert sum(s.stats()["keys"] for s in shards) == 3000
    assert feed.counters["snapshots"] == 1
    assert held(shards, "node-a", blocks) == 3000


def test_lost_chunks_are_sent_again_and_applied_once(monkeypatch):
    monkeypatch.setattr(event_wire, "MAX_EVENT_BATCH_BYTES", 2048)
    attempts: dict[tuple, int] = {}

    def fail(shard, seq):  # every chunk: first the request is lost, then the reply
        n = attempts[shard, seq] = attempts.get((shard, seq), 0) + 1
        return {1: "request", 2: "reply"}.get(n)

    shards = [IndexShard(i, 3) for i in range(3)]
    store = FakeStore()
    feed = feed_for(store, LocalShards(shards, fail))
    feed.resync()
    blocks = keys(1000)
    store.put(blocks)
    store.evict(blocks[500:])
    assert feed.drain(timeout_s=60)
    assert sum(s.stats()["keys"] for s in shards) == 500
    assert sum(s.stats()["duplicates"] for s in shards) == len(attempts)  # each reply lost once, applied once
    assert all(s.stats()["streams"] == 1 for s in shards)  # no resync: the stream went on
    assert feed.counters["snapshots"] == 1
    assert held(shards, "node-a", blocks) == 500


def test_an_eviction_round_travels_as_one_removal_event():
    shards = [IndexShard(0, 1)]
    store = FakeStore()
    transport = LocalShards(shards)
    feed = feed_for(store, transport)
    blocks = keys(300)
    store.put(blocks)
    feed.resync()
    assert feed.drain()
    events_before = shards[0].stats()["key_events"]
    store.evict(blocks[:200])  # 200 BlockRemoved events from the store
    sent = []
    transport.send = lambda *args, orig=transport.send: sent.append(args[4]) or orig(*args)
    assert feed.drain()
    (payload,) = sent
    _, wire = event_wire.decode_batch(payload)
    assert [type(e) for e in wire] == [BlockRemoved] and len(wire[0].block_hashes) == 200
    assert shards[0].stats()["key_events"] - events_before == 200


def test_a_restarted_shard_rebuilds_only_its_share_and_answers_from_what_it_knows(monkeypatch):
    monkeypatch.setattr(event_wire, "MAX_EVENT_BATCH_BYTES", 4096)
    shards = [IndexShard(i, 2) for i in range(2)]
    transport = LocalShards(shards)
    store_a, store_b = FakeStore(), FakeStore()
    feed_a, feed_b = feed_for(store_a, transport, "node-a"), feed_for(store_b, transport, "node-b")
    blocks = keys(2000)
    store_a.put(blocks)
    store_b.put(blocks[:1000], "DISK")
    for feed in (feed_a, feed_b):
        feed.resync()
        assert feed.drain()
    truth = {"node-a": 2000, "node-b": 1000}
    assert {n: held(shards, n, blocks) for n in truth} == truth
    survivor = shards[1].stats()

    shards[0] = IndexShard(0, 2)  # shard 0 restarts: empty, it knows no stream
    store_a.put(keys(1))  # node a's next chunk to shard 0 (if the key lands there) or none
    feed_a.resync({0})  # what the shard's restart asks every node for (IndexShard._ask_for_share)
    feed_b.resync({0})
    rebuilding = False
    while feed_a.pending() or feed_b.pending():
        feed_a.flush()
        feed_b.flush()
        # Mid-rebuild: every answer is a prefix of the truth, and a node named holds the key.
        for node, n in truth.items():
            got = held(shards, node, blocks)
            assert got <= n
            rebuilding |= got < n
        for part in shardmap.split(blocks, 2):
            for key_holders in shards[part.shard].locate(part.keys):
                assert all(node in truth and medium == {"node-a": "CPU", "node-b": "DISK"}[node]
                           for node, medium in key_holders)
    assert rebuilding, "the rebuild took several chunks, so lookups saw it partial"
    assert {n: held(shards, n, blocks) for n in truth} == truth
    after = shards[1].stats()
    assert after["streams"] == survivor["streams"] and after["resyncs_asked"] == 0, "shard 1 was not resent anything"
    assert sorted(shards[0].synced_nodes()) == ["node-a", "node-b"]


def synced_feed(blocks: list[bytes]):
    """Two shards, a node's store holding `blocks`, and its feed, with the snapshot applied."""
    shards = [IndexShard(i, 2) for i in range(2)]
    store = FakeStore()
    feed = feed_for(store, LocalShards(shards))
    store.put(blocks)
    feed.resync()
    assert feed.drain()
    return shards, store, feed


def test_a_shard_that_lost_the_stream_gets_a_snapshot_of_its_share_only():
    blocks = keys(400)
    shards, store, feed = synced_feed(blocks)
    shards[1] = IndexShard(1, 2)  # restarted, and no one asked: the node's next chunk finds out
    store.put(keys(64))  # some land in shard 1, whose answer is "resync"
    assert feed.drain()
    assert feed.counters["snapshots"] == 2
    assert shards[0].stats()["streams"] == 1 and shards[1].stats()["streams"] == 1
    assert held(shards, "node-a", blocks) == 400


def test_a_dead_nodes_late_chunks_are_ignored():
    shard = IndexShard(0, 1)
    shard.drop_nodes(["node-a"])
    blocks = keys(3)
    payload = event_wire.encode_batch([AllBlocksCleared(), BlockStored(blocks, None, "CPU")])
    assert shard.apply("node-a", "s1", 0, payload, True) == shardfeed.DROPPED
    assert shard.locate(keys_array(blocks).tobytes()) == [[], [], []]


def test_drain_waits_for_what_was_queued_before_it_not_for_what_keeps_coming():
    shards = [IndexShard(i, 2) for i in range(2)]
    store = FakeStore()
    transport = LocalShards(shards)
    feed = feed_for(store, transport)
    feed.resync()
    blocks = keys(50)
    store.put(blocks)
    send = transport.send

    def busy_send(*args):  # puts keep arriving while every chunk is on its way
        store.put(keys(3))
        return send(*args)

    transport.send = busy_send
    assert feed.drain(timeout_s=5), "drain chased events queued after it began"
    assert held(shards, "node-a", blocks) == 50


def test_an_idle_node_gives_a_restarted_shard_its_share(monkeypatch):
    monkeypatch.setattr(shardfeed, "HEARTBEAT_S", 0.0)
    blocks = keys(200)
    shards, _, feed = synced_feed(blocks)
    shards[0] = IndexShard(0, 2)  # restarted; its request for shares reached no one, and no put follows
    for _ in range(4):
        feed.flush()
    assert held(shards, "node-a", blocks) == 200
    assert shards[0].synced_nodes() == ["node-a"] and shards[1].stats()["resyncs_asked"] == 0
