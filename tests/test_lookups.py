"""Lookups of many callers at once (cluster/lookups.py): one call per shard per round, each
caller its own answer; a shard that fails answers None."""
from __future__ import annotations

import os
import threading

from kvstore.cluster import shardmap
from kvstore.cluster.index import keys_array
from kvstore.cluster.lookups import ShardLookups
from kvstore.cluster.shards import IndexShard


def shards_holding(prompts: list[list[bytes]], count: int) -> list[IndexShard]:
    shards = [IndexShard(i, count) for i in range(count)]
    for n, prompt in enumerate(prompts):
        for part in shardmap.split(prompt, count):
            shards[part.shard]._index.add(f"node-{n}", keys_array(part.keys), "CPU")
    return shards


def test_concurrent_lookups_share_calls_and_each_gets_its_answer():
    prompts = [[os.urandom(16) for _ in range(40)] for _ in range(8)]
    shards = shards_holding(prompts, 2)
    gate, calls = threading.Event(), []

    def call(shard, requests):
        calls.append(len(requests))
        gate.wait()  # the first round is held until every caller has queued
        return shards[shard].batch(requests)

    lookups = ShardLookups(call, 2, timeout_s=30)
    results = {}

    def lookup(n):
        parts = shardmap.split(prompts[n][: 10 + n], 2)
        results[n] = shardmap.prefix_by_node(parts, lookups.ask(parts, "prefix_by_node"), ["node-%d" % n], 10 + n)

    callers = [threading.Thread(target=lookup, args=(n,)) for n in range(8)]
    for t in callers:
        t.start()
    while sum(len(q) for q in lookups._queues) + sum(calls) < 16:  # every request queued or in the first round
        threading.Event().wait(0.001)
    gate.set()
    for t in callers:
        t.join()
    lookups.stop()
    assert results == {n: {f"node-{n}": 10 + n} for n in range(8)}
    assert lookups.counters["requests"] == 16 and lookups.counters["calls"] < 16


def test_a_failing_shard_answers_none_and_the_other_still_answers():
    prompt = [os.urandom(16) for _ in range(30)]
    shards = shards_holding([prompt], 2)

    def call(shard, requests):
        if shard == 0:
            raise ConnectionError("shard 0 is restarting")
        return shards[shard].batch(requests)

    lookups = ShardLookups(call, 2, timeout_s=30)
    parts = shardmap.split(prompt, 2)
    answers = lookups.ask(parts, "first_missing")
    lookups.stop()
    assert [a is None for a in answers] == [p.shard == 0 for p in parts]
    assert shardmap.longest_prefix(parts, answers, len(prompt)) == int(parts[[p.shard for p in parts].index(0)].positions[0])
