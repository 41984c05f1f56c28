"""The compact index (cluster/index.py) against a dict model, and how shards' answers combine
(cluster/shardmap.py): the same answers as one index holding everything."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from kvstore.cluster import shardmap
from kvstore.cluster.index import CompactIndex, keys_array
from kvstore.errors import KVStoreError

MEDIA = ("GPU", "CPU", "DISK")


class Model:
    """key -> {node: medium}: the index as the old controller kept it."""

    def __init__(self) -> None:
        self.holders: dict[bytes, dict[str, str]] = {}

    def add(self, node, keys, medium):
        for k in keys:
            self.holders.setdefault(k, {})[node] = medium

    def remove(self, node, keys, medium):
        for k in keys:
            h = self.holders.get(k, {})
            if node in h and (medium is None or h[node] == medium):
                del h[node]
                if not h:
                    del self.holders[k]

    def drop_node(self, node):
        for k in list(self.holders):
            self.remove(node, [k], None)

    def prefix_by_node(self, prompt):
        out, open_nodes = {}, None
        for i, k in enumerate(prompt):
            held = set(self.holders.get(k, {}))
            open_nodes = held if open_nodes is None else open_nodes & held
            if not open_nodes:
                break
            for n in open_nodes:
                out[n] = i + 1
        return out


def random_ops(seed: int, index, model, keys, nodes, steps: int):
    rng = random.Random(seed)
    for _ in range(steps):
        node, medium = rng.choice(nodes), rng.choice(MEDIA)
        chosen = rng.sample(keys, rng.randint(1, 40))
        op = rng.random()
        if op < 0.6:
            index.add(node, keys_array(chosen), medium)
            model.add(node, chosen, medium)
        elif op < 0.95:
            medium = rng.choice([medium, None])
            index.remove(node, keys_array(chosen), medium)
            model.remove(node, chosen, medium)
        else:
            index.drop_node(node)
            model.drop_node(node)


@pytest.mark.parametrize("seed", [1, 2])
def test_index_answers_like_a_dict_of_holders(seed):
    rng = random.Random(seed)
    keys = [rng.randbytes(16) for _ in range(1500)]
    nodes = [f"node-{i}" for i in range(70)]  # more than 64: several bitmap words
    index, model = CompactIndex(capacity=8), Model()  # tiny: it must grow (and sweep) many times
    for round_ in range(10):
        random_ops(seed * 100 + round_, index, model, keys, nodes, 200)
        assert len(index) == len(model.holders)
        for key, holders in zip(keys, index.locate(keys_array(keys))):
            assert dict(holders) == model.holders.get(key, {})
            assert [m for _, m in holders] == sorted((m for _, m in holders), key=MEDIA.index)
        held = [k for k in keys if k in model.holders]
        for prompt in (held[:60], rng.sample(keys, 30), held[:1]):
            assert index.prefix_by_node(keys_array(prompt)) == model.prefix_by_node(prompt)
            expected = next((i for i, k in enumerate(prompt) if k not in model.holders), len(prompt))
            assert index.first_missing(keys_array(prompt)) == expected


def test_a_node_holding_a_long_prompt_is_found_among_many():
    index = CompactIndex()
    prompt = [os.urandom(16) for _ in range(500)]
    for n in range(64):
        index.add(f"n{n}", keys_array(prompt[:n * 7]), "CPU")  # n{n} holds the first n*7 keys
    per_node = index.prefix_by_node(keys_array(prompt))
    assert per_node == {f"n{n}": n * 7 for n in range(1, 64)}


def test_one_holder_costs_at_most_64_bytes_a_block():
    index = CompactIndex()
    rows = np.frombuffer(os.urandom(16 * 200_000), "<u8").reshape(-1, 2)
    for start in range(0, len(rows), 10_000):
        index.add(f"n{start % 64}", rows[start:start + 10_000], "DISK")
    assert len(index) == len(rows)
    assert index.nbytes() / len(index) <= 64


def test_dropped_ordinals_are_reused_and_names_stay_right():
    index = CompactIndex()
    a, b = keys_array([b"a" * 16]), keys_array([b"b" * 16])
    index.add("old", a, "CPU")
    index.drop_node("old")
    index.add("new", b, "CPU")
    assert index.locate(a) == [[]] and index.locate(b) == [[("new", "CPU")]]


def test_a_key_buffer_of_the_wrong_length_is_named():
    with pytest.raises(KVStoreError, match="17 bytes"):
        keys_array(b"x" * 17)


def sharded(count: int, seed: int):
    """count indexes fed by key hash, and one index fed everything, from the same operations."""
    rng = random.Random(seed)
    keys = [rng.randbytes(16) for _ in range(800)]
    nodes = [f"node-{i}" for i in range(5)]
    shards, whole = [CompactIndex() for _ in range(count)], CompactIndex()
    for _ in range(300):
        node, medium, chosen = rng.choice(nodes), rng.choice(MEDIA), rng.sample(keys, 30)
        prefix = keys[:rng.randint(0, 400)]  # long shared prefixes, so answers are not trivially 0
        for batch in (chosen, prefix):
            op = "add" if rng.random() < 0.7 else "remove"
            getattr(whole, op)(node, keys_array(batch), medium)
            for part in shardmap.split(batch, count):
                getattr(shards[part.shard], op)(node, keys_array(part.keys), medium)
    return keys, nodes, shards, whole


@pytest.mark.parametrize("count", [2, 3, 8])
def test_sharded_answers_equal_one_whole_index(count):
    keys, nodes, shards, whole = sharded(count, count)
    for prompt in (keys[:400], keys[100:200], keys[::-1][:50]):
        parts = shardmap.split(prompt, count)
        ask = lambda method: [getattr(shards[p.shard], method)(keys_array(p.keys)) for p in parts]  # noqa: E731
        rows = keys_array(prompt)
        assert shardmap.longest_prefix(parts, ask("first_missing"), len(prompt)) == whole.first_missing(rows)
        assert shardmap.locate(parts, ask("locate"), len(prompt)) == whole.locate(rows)
        expected = {n: whole.prefix_by_node(rows).get(n, 0) for n in nodes}
        assert shardmap.prefix_by_node(parts, ask("prefix_by_node"), nodes, len(prompt)) == expected


def test_a_shard_that_does_not_answer_shortens_answers_and_names_no_wrong_node():
    keys, nodes, shards, whole = sharded(3, 7)
    prompt = keys[:400]
    parts = shardmap.split(prompt, 3)
    rows = keys_array(prompt)
    silent = parts[0].shard
    ask = lambda method: [None if p.shard == silent else getattr(shards[p.shard], method)(keys_array(p.keys))  # noqa: E731
                          for p in parts]
    assert shardmap.longest_prefix(parts, ask("first_missing"), len(prompt)) <= whole.first_missing(rows)
    for got, truth in zip(shardmap.locate(parts, ask("locate"), len(prompt)), whole.locate(rows)):
        assert set(got) <= set(truth)
    full = whole.prefix_by_node(rows)
    for node, n in shardmap.prefix_by_node(parts, ask("prefix_by_node"), nodes, len(prompt)).items():
        assert n <= full.get(node, 0)


def test_no_keys_no_parts():
    assert shardmap.split([], 4) == []
    assert shardmap.longest_prefix([], [], 0) == 0
    assert shardmap.prefix_by_node([], [], ["a"], 0) == {"a": 0}
