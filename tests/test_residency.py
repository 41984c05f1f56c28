"""Engines' HBM residency (cluster/residency.py) in an index shard and in best_node's choice."""
from __future__ import annotations

import time

import pytest

from kvstore.cluster import shardmap
from kvstore.cluster.lookups import IndexReader
from kvstore.cluster.residency import Engines, best_node, check_engine_id
from kvstore.cluster.shards import IndexShard
from kvstore.errors import InvalidKeyError
from kvstore.events import BlockStored, encode_batch

from kvtest_support import rand_key


def shards(count: int = 2):
    """In-process shards and a reader over them, as the controller has them."""
    table = [IndexShard(s, count) for s in range(count)]
    return table, IndexReader(lambda shard, requests: table[shard].batch(requests), count, 5.0)


def report(table, engine_id: str, stored=(), removed=(), cleared=False) -> None:
    """What the controller's report_residency does: each shard gets its part."""
    stored_parts = {p.shard: p.keys for p in shardmap.split(list(stored), len(table))} if stored else {}
    removed_parts = {p.shard: p.keys for p in shardmap.split(list(removed), len(table))} if removed else {}
    for s, shard in enumerate(table):
        shard.report_residency(engine_id, stored_parts.get(s, b""), removed_parts.get(s, b""), cleared)


def test_an_engines_hbm_prefix_is_counted_apart_from_the_stores_holders():
    table, reader = shards()
    prompt = [rand_key() for _ in range(6)]
    report(table, "e1", prompt[:4])
    report(table, "e2", prompt[1:6])  # not a prefix: its first block is missing
    assert reader.hbm_prefix_by_engine(prompt, ["e1", "e2"]) == {"e1": 4, "e2": 0}
    assert reader.longest_prefix(prompt) == 0 and reader.locate(prompt[:1]) == [[]]  # no store holds them
    report(table, "e1", removed=prompt[2:3])
    assert reader.hbm_prefix_by_engine(prompt, ["e1"]) == {"e1": 2}
    report(table, "e1", prompt[:1], cleared=True)  # a restarted engine starts afresh
    assert reader.hbm_prefix_by_engine(prompt, ["e1"]) == {"e1": 1}
    for shard in table:
        shard.forget_engines(["e1"])
    assert reader.hbm_prefix_by_engine(prompt, ["e1"]) == {"e1": 0}


def test_a_shard_has_an_engines_whole_residency_only_from_a_cleared_report_on():
    """What the controller asks to answer "resend": a shard restarted (a new one here) or one
    that forgot a silent engine lacks its earlier reports until one says all it holds."""
    table, _ = shards()
    prompt = [rand_key() for _ in range(4)]
    report(table, "e1", prompt, cleared=True)
    assert [shard.whole_engines() for shard in table] == [["e1"], ["e1"]]
    table[0] = IndexShard(0, 2)  # restarted: empty
    report(table, "e1", removed=prompt[:1])
    assert [shard.whole_engines() for shard in table] == [[], ["e1"]]
    report(table, "e1", prompt[1:], cleared=True)
    assert [shard.whole_engines() for shard in table] == [["e1"], ["e1"]]
    table[1].forget_engines(["e1"])
    assert table[1].whole_engines() == []


def test_the_stores_holders_and_hbm_residency_do_not_mix():
    table, reader = shards()
    prompt = [rand_key() for _ in range(3)]
    for part in shardmap.split(prompt, len(table)):
        keys = [part.keys[i:i + 16] for i in range(0, len(part.keys), 16)]
        table[part.shard].apply_events("node-a", encode_batch([BlockStored(keys, None, "CPU")]))
    report(table, "node-a", prompt)  # an engine named like a node is still an engine
    assert reader.prefix_by_node(prompt, ["node-a"]) == {"node-a": 3}
    report(table, "node-a", removed=prompt)
    assert reader.prefix_by_node(prompt, ["node-a"]) == {"node-a": 3}  # the store's blocks stay
    assert reader.hbm_prefix_by_engine(prompt, ["node-a"]) == {"node-a": 0}


def test_best_node_prefers_an_hbm_prefix_on_a_tie_and_the_longer_prefix_otherwise():
    node_of = {"e-a": "node-a", "e-b": "node-b"}
    store_wins = best_node({"node-a": 5, "node-b": 2}, {"e-a": 3, "e-b": 4}, node_of)
    assert store_wins["node_id"] == "node-a" and store_wins["engine_id"] is None
    assert store_wins["prefix_blocks"] == 5 and store_wins["hbm_prefix_blocks"] == 0
    hbm_wins = best_node({"node-a": 5, "node-b": 2}, {"e-b": 6}, node_of)
    assert (hbm_wins["node_id"], hbm_wins["engine_id"], hbm_wins["prefix_blocks"]) == ("node-b", "e-b", 6)
    tie = best_node({"node-a": 4, "node-b": 0}, {"e-b": 4}, node_of)
    assert (tie["node_id"], tie["engine_id"], tie["hbm_prefix_blocks"]) == ("node-b", "e-b", 4)
    gone = best_node({"node-a": 1}, {"e-gone": 9}, node_of)  # an engine no longer registered
    assert gone["node_id"] == "node-a" and gone["per_engine"] == {}
    assert best_node({}, {}, {})["node_id"] is None


def test_engines_not_heard_from_are_forgotten():
    engines = Engines(ttl_s=0.05)
    engines.heard("e1", "node-a")
    engines.heard("e2", "node-b")
    assert engines.on_nodes({"node-b"}) == ["e2"]
    assert engines.expired() == []
    time.sleep(0.1)
    assert engines.expired() == ["e1"] and engines.node_of() == {}


@pytest.mark.parametrize("bad", ["", "x" * 129, None, 7, b"bytes"])
def test_bad_engine_ids_are_named(bad):
    with pytest.raises(InvalidKeyError, match="engine_id="):
        check_engine_id(bad)
