"""The remote client (`kvstore.connect("kvstore://...")`) against a real two-node cluster, from
processes in which Ray cannot be imported: engines outside Ray, with a tenant's credential.

Tenant A's first process puts two chains, one to each node, and reads them back; a second process
of A reads the first's blocks, pulling from both nodes at once; tenant B's process, knowing A's
keys, gets misses. The blocks are in the cluster under A's scope (the in-Ray admin client finds
them by their scoped keys, not by the keys A named). A remote client with the admin token reads
what the in-Ray client put (both address blocks as stored).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from kvstore import Layout, block_keys, chain_parents
from kvstore.tenants import Tenant, Tenants
from kvtest_support import NO_RAY, http_service

pytestmark = pytest.mark.cluster

LAYOUT = Layout("test/remote-client", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
ADMIN = "admin-" + os.urandom(8).hex()
A_TOKEN, B_TOKEN = "tenant-a-" + os.urandom(8).hex(), "tenant-b-" + os.urandom(8).hex()
TENANTS_FILE = os.path.join(tempfile.mkdtemp(prefix="kvstore-tenants-"), "tenants.yaml")
with open(TENANTS_FILE, "w") as f:
    f.write(f"tenants:\n  - name: a\n    token: {A_TOKEN}\n  - name: b\n    token: {B_TOKEN}\n")
KV_CLUSTER = {"nodes": 2, "settings": dict(auth_token=ADMIN, tenants_file=TENANTS_FILE, host_tier_bytes="16MiB",
                                           event_batch_ms=10)}
BLOCKS = 5  # per chain

# Run with `python -c`: Ray made unimportable first, then the engine's side. argv: url, token,
# action ("put" or "get"), the chains' seeds (JSON). Prints one JSON line.
ENGINE = NO_RAY + textwrap.dedent("""
    import json
    import numpy as np
    import torch
    import kvstore
    from kvstore import Layout, block_keys, chain_parents

    url, token, action, seeds = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    layout = Layout.from_dict(json.loads(sys.argv[5]))

    def chain(seed):
        tokens = np.random.default_rng(seed).integers(0, 50_000, {n} * layout.block_tokens).tolist()
        data = np.random.default_rng(seed + 1).integers(0, 256, ({n}, layout.block_nbytes), dtype=np.uint8)
        return block_keys(tokens, layout, "shared-namespace"), torch.from_numpy(data)

    chains = [chain(s) for s in seeds]
    keys = [k for ks, _ in chains for k in ks]
    want = torch.cat([d for _, d in chains])
    report = {{}}
    with kvstore.connect(url, token=token) as client:
        assert type(client).__name__ == "RemoteClient", type(client)
        if action == "put":
            nodes = sorted(n["node_id"] for n in client.nodes())
            report["stored"] = []
            for i, (ks, data) in enumerate(chains):
                client.put_node = nodes[i % len(nodes)]  # one chain to each node
                result = client.put(layout, ks, data, parents=chain_parents(ks), wait_index=True)
                report["stored"].append([result.stored, result.present, len(result.rejected)])
        out = torch.zeros_like(want)
        got = client.get(layout, keys, out)
        report["sources"] = got.sources
        report["equal"] = [bool(torch.equal(out[i], want[i])) for i in range(len(keys))]
        report["untouched"] = [not bool(out[i].any()) for i in range(len(keys))]
        report["contains"] = client.contains(keys)
        report["prefix"] = [client.longest_prefix(ks) for ks, _ in chains]
        report["best"] = [client.best_node(ks) for ks, _ in chains]
    report["ray_imported"] = "ray" in sys.modules
    print(json.dumps(report))
""".format(n=BLOCKS))


def engine(url: str, token: str, action: str, seeds: list[int]) -> dict:
    done = subprocess.run([sys.executable, "-c", ENGINE, url, token, action, json.dumps(seeds),
                           json.dumps(LAYOUT.to_dict())], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ray_imported"] is False
    return report


def chain(seed: int) -> tuple[list[bytes], torch.Tensor]:
    """The same chain the engine processes make from a seed."""
    tokens = np.random.default_rng(seed).integers(0, 50_000, BLOCKS * LAYOUT.block_tokens).tolist()
    data = np.random.default_rng(seed + 1).integers(0, 256, (BLOCKS, LAYOUT.block_nbytes), dtype=np.uint8)
    return block_keys(tokens, LAYOUT, "shared-namespace"), torch.from_numpy(data)


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    return kv_cluster


@pytest.fixture(scope="module")
def url(cluster):
    for base in http_service(cluster[1], Tenants(ADMIN, TENANTS_FILE)):
        yield "kvstore://" + base.removeprefix("http://")


def test_engines_outside_ray_put_and_get_as_a_tenant_and_another_tenant_misses(cluster, url):
    _, ray_client = cluster
    nodes = sorted(n["node_id"] for n in ray_client.nodes())
    seeds = [11, 12]

    first = engine(url, A_TOKEN, "put", seeds)  # tenant A, process 1: a chain to each node, read back
    assert first["stored"] == [[BLOCKS, 0, 0], [BLOCKS, 0, 0]]
    assert all(first["equal"]) and all(first["contains"]) and first["prefix"] == [BLOCKS, BLOCKS]
    assert [(b["node_id"], b["prefix_blocks"]) for b in first["best"]] == [(n, BLOCKS) for n in nodes]
    assert [s[0] for s in first["sources"]] == [nodes[0]] * BLOCKS + [nodes[1]] * BLOCKS

    # In the cluster under A's scope: the in-Ray (admin) client finds the scoped keys only.
    a = Tenant.make("a", A_TOKEN)
    keys = [k for s in seeds for k in chain(s)[0]]
    assert ray_client.contains(a.stored(keys)) == [True] * len(keys)
    assert ray_client.contains(keys) == [False] * len(keys)
    assert [h[0][0] for h in ray_client.where(a.stored(keys))] == [nodes[0]] * BLOCKS + [nodes[1]] * BLOCKS

    second = engine(url, A_TOKEN, "get", seeds)  # tenant A, process 2: the first's blocks, from both nodes
    assert all(second["equal"]) and second["sources"] == first["sources"]

    other = engine(url, B_TOKEN, "get", seeds)  # tenant B knows the keys: misses, nothing written
    assert other["sources"] == [None] * len(keys) and all(other["untouched"])
    assert other["contains"] == [False] * len(keys) and other["prefix"] == [0, 0]
    assert [b["prefix_blocks"] for b in other["best"]] == [0, 0]
    assert all(set(b["per_node"].values()) <= {0} for b in other["best"])


def test_a_remote_admin_client_reads_what_the_ray_client_put(cluster, url):
    _, ray_client = cluster
    keys, data = chain(21)
    ray_client.put(LAYOUT, keys, data, parents=chain_parents(keys), wait_index=True)
    report = engine(url, ADMIN, "get", [21])
    assert all(report["equal"]) and report["sources"] == [[ray_client.node_id, "remote"]] * BLOCKS
    assert engine(url, A_TOKEN, "get", [21])["sources"] == [None] * BLOCKS  # not in A's scope
