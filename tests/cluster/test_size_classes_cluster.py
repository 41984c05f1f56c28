"""Several block sizes in one cluster: a real two-node Ray cluster on this machine whose nodes
keep 64 KiB, 2 MiB and 5 MiB blocks at once (block_sizes: auto, the default). A put on one node is
read on that node through the arena's directory (no call) and pulled by the other over Flight,
also into its own arena; bytes equal everywhere."""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
import ray
import torch

import kvstore
from kvstore import Layout, block_keys, chain_parents
from kvstore.cluster.localcluster import RayTestCluster
from kvtest_support import wait_for

pytestmark = pytest.mark.cluster
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYOUTS = {
    "64KiB": Layout("test/classes-small", 2, 2, 64, "bfloat16", 64),
    "2MiB": Layout("test/classes-8b", 32, 8, 128, "bfloat16", 16),
    "5MiB": Layout("test/classes-70b", 80, 8, 128, "bfloat16", 16),
}
COUNTS = {"64KiB": 24, "2MiB": 6, "5MiB": 3}
TOKEN = "test-token-" + os.urandom(4).hex()
# 96 MiB hosts: 8 chunks of 12 MiB (a tier smaller than 8 default chunks gets smaller ones).
KV_CLUSTER = {"nodes": 2, "settings": dict(auth_token=TOKEN, host_tier_bytes="96MiB", event_batch_ms=10)}


def payload(layout: Layout, keys: list[bytes]) -> torch.Tensor:
    rows = [np.frombuffer(hashlib.shake_128(k).digest(layout.block_nbytes), dtype=np.uint8) for k in keys]
    return torch.from_numpy(np.stack(rows))


def keys_for(name: str, seed: int) -> list[bytes]:
    layout = LAYOUTS[name]
    tokens = np.random.default_rng(seed).integers(0, 50_000, COUNTS[name] * layout.block_tokens)
    return block_keys(tokens, layout)


@ray.remote(num_cpus=0)
class NodeClient:
    def __init__(self) -> None:
        self.client = kvstore.connect()

    def get_checked(self, name: str, keys: list[bytes]) -> dict:
        layout = LAYOUTS[name]
        out = torch.zeros((len(keys), layout.block_nbytes), dtype=torch.uint8)
        result = self.client.get(layout, keys, out)
        expected = payload(layout, keys)
        equal = sum(1 for i, found in enumerate(result.found) if found and torch.equal(out[i], expected[i]))
        self.client.flush()
        return {"hits": result.hits, "equal": equal, "sources": [s[1] if s else None for s in result.sources]}

    def stats(self) -> dict:
        return self.client.stats()


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    return kv_cluster


def test_a_node_keeps_three_block_sizes_and_the_other_pulls_them_bytes_equal(cluster):
    rc, client = cluster
    assert client.node_id == rc.node_id(0)
    keys = {name: keys_for(name, seed) for seed, name in enumerate(LAYOUTS)}
    for name, layout in LAYOUTS.items():
        result = client.put(layout, keys[name], payload(layout, keys[name]), parents=chain_parents(keys[name]))
        assert result.stored == COUNTS[name] and not result.rejected, (name, result)
    for name, layout in LAYOUTS.items():
        wait_for(lambda: client.longest_prefix(keys[name]) == COUNTS[name], 10,
                 f"the index to learn the {name} blocks")
    # On the node that stored them: straight from the shared arena.
    for name, layout in LAYOUTS.items():
        out = torch.zeros((COUNTS[name], layout.block_nbytes), dtype=torch.uint8)
        got = client.get(layout, keys[name], out)
        assert got.hits == COUNTS[name] and torch.equal(out, payload(layout, keys[name]))
        assert {s[1] for s in got.sources} == {"local"}
    # On the other node: pulled over Flight (and cached in its arena), then local there.
    other = NodeClient.options(resources={rc.resources[1]: 0.01}).remote()
    for name in LAYOUTS:
        first = ray.get(other.get_checked.remote(name, keys[name]))
        assert first["hits"] == first["equal"] == COUNTS[name], (name, first)
        assert "local" not in first["sources"]
        again = ray.get(other.get_checked.remote(name, keys[name]))
        assert again["hits"] == again["equal"] == COUNTS[name] and set(again["sources"]) == {"local"}, again
    for node in client.nodes():
        store = client.stats()["nodes"][node["node_id"]]["store"]
        classes = {c["slot_bytes"]: c["blocks"] for c in store["classes"]}
        assert classes == {64 * 1024: 24, 2 * 1024**2: 6, 5 * 1024**2: 3}, classes
        assert store["rounding_loss"] == 0.0
