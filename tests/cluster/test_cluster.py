"""The cluster on a real three-node Ray cluster on this machine (127.0.0.2-4).

Tests run in file order and share one cluster: the destructive ones (controller restart, node
death) come last.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

import msgpack
import numpy as np
import pyarrow.flight as flight
import pytest
import ray
import torch
import zmq

import kvstore
from kvstore import Layout, block_keys, chain_parents
from kvstore.cluster.localcluster import RayTestCluster
from kvstore.cluster.shardmap import shard_actor_name
from kvstore.connectors.vllm_residency import HBMResidency
from delayed_binds import DelayedBinds
from kvtest_support import http_call, http_service, wait_for

pytestmark = pytest.mark.cluster
# Ray workers cannot import this test module: ship its classes and functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYOUT = Layout("test/cluster", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
TOKEN = "test-token-" + os.urandom(4).hex()


def payload(keys: list[bytes]) -> torch.Tensor:
    """Blocks whose bytes are derived from their keys, so any misplaced byte is detected."""
    rows = [np.frombuffer(hashlib.shake_128(k).digest(LAYOUT.block_nbytes), dtype=np.uint8) for k in keys]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty((0, LAYOUT.block_nbytes), dtype=torch.uint8)


def tokens(seed: int, blocks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, blocks * LAYOUT.block_tokens)


@ray.remote(num_cpus=0)
class NodeClient:
    """A kvstore client living on one Ray node (placed with that node's custom resource)."""

    def __init__(self, **settings) -> None:
        self.client = kvstore.connect(**settings)
        self.node_id = self.client.node_id

    def put(self, seed: int, blocks: int, namespace: str = "default") -> list[bytes]:
        keys = block_keys(tokens(seed, blocks), LAYOUT, namespace)
        result = self.client.put(LAYOUT, keys, payload(keys), parents=chain_parents(keys))
        assert not result.rejected, result
        return keys

    def where(self, keys: list[bytes]) -> list:
        return self.client.where(keys)

    def pin(self, keys: list[bytes], ttl_s: float) -> int:
        """Pins blocks for reading in place and never gives them back (the caller kills us)."""
        return sum(v is not None for v in self.client.acquire(LAYOUT, keys, ttl_s=ttl_s).views)

    def handoff(self, seed: int, blocks: int) -> dict:
        """A prefill's save of `blocks` blocks, layer by layer; returns its handle."""
        from kvstore.connectors.handoff import SaveSession

        session = SaveSession(self.client, LAYOUT, tokens(seed, blocks).tolist(), "handoff")
        n = blocks * LAYOUT.block_tokens
        for layer in range(LAYOUT.num_layers):
            kv = torch.full((n, LAYOUT.num_kv_heads, LAYOUT.head_dim), float(layer + seed), dtype=torch.float16)
            session.save_layer(layer, kv, -kv)
        return session.finish().to_dict()

    def put_keys(self, keys: list[bytes]) -> int:
        return self.client.put(LAYOUT, keys, payload(keys)).stored

    def get_checked(self, keys: list[bytes]) -> dict:
        """Gets keys; returns hits, corrupt count and sources."""
        out = torch.zeros((len(keys), LAYOUT.block_nbytes), dtype=torch.uint8)
        result = self.client.get(LAYOUT, keys, out)
        expected = payload(keys)
        corrupt = sum(1 for i, found in enumerate(result.found) if found and not torch.equal(out[i], expected[i]))
        return {"hits": result.hits, "corrupt": corrupt, "sources": result.sources}

    def load(self, seed: int, n_blocks: int, batch: int, peers_keys: list[bytes]) -> dict:
        """Puts n_blocks of its own and gets peers' keys, in batches; counts what went wrong."""
        own = block_keys(tokens(seed, n_blocks), LAYOUT, f"load-{seed}")
        acknowledged = 0
        for start in range(0, len(own), batch):
            chunk = own[start:start + batch]
            r = self.client.put(LAYOUT, chunk, payload(chunk))
            acknowledged += r.stored + r.present
        gets = corrupt = misses = 0
        for start in range(0, len(peers_keys), batch):
            chunk = peers_keys[start:start + batch]
            r = self.get_checked(chunk)
            gets += len(chunk)
            corrupt += r["corrupt"]
            misses += len(chunk) - r["hits"]
        return {"keys": own, "acknowledged": acknowledged, "gets": gets, "corrupt": corrupt, "misses": misses}


KV_CLUSTER = {"nodes": 3, "settings": dict(auth_token=TOKEN, host_tier_bytes="32MiB", slot_bytes="8KiB",
                                           nvme_tier_bytes="16MiB", event_batch_ms=10, lease_ttl_s=30,
                                           kv_events_endpoint="tcp://127.0.0.1:*")}


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    return kv_cluster


def on_node(rc: RayTestCluster, i: int):
    return NodeClient.options(resources={rc.resources[i]: 0.01}).remote()


def put_on(rc: RayTestCluster, client, i: int, keys: list[bytes]) -> None:
    """Puts keys from a client on node i and waits until the cluster's index has them all."""
    ray.get(on_node(rc, i).put_keys.remote(keys))
    wait_for(lambda: client.longest_prefix(keys) == len(keys), 10, f"node {i}'s blocks to be indexed")



def test_three_nodes_each_run_a_node_actor(cluster):
    rc, client = cluster
    nodes = client.nodes()
    assert len(nodes) == 3
    assert sorted(n["address"].split(":")[0] for n in nodes) == rc.ips
    assert client.node_id == rc.node_id(0)


def test_put_on_a_get_on_c_bytes_equal(cluster):
    rc, client = cluster
    keys = block_keys(tokens(1, 40), LAYOUT)
    client.put(LAYOUT, keys, payload(keys), parents=chain_parents(keys))
    wait_for(lambda: client.longest_prefix(keys) == 40, 10, "the index to learn the blocks")
    c = on_node(rc, 2)
    got = ray.get(c.get_checked.remote(keys))
    assert got["hits"] == 40 and got["corrupt"] == 0
    assert {s for s in got["sources"]} == {(rc.node_id(0), "remote")}
    # Pulled blocks are cached on C now: the index holds both nodes, and a second get is local.
    wait_for(lambda: all(len(h) == 2 for h in client.where(keys)), 10, "C's copies to be indexed")
    again = ray.get(c.get_checked.remote(keys))
    assert again["hits"] == 40 and {s[1] for s in again["sources"]} == {"local"}


class Counting:
    """An actor handle that counts the calls of one method (None: of any) made through it."""

    def __init__(self, handle, method: str | None) -> None:
        self.handle, self.method, self.calls, self.names = handle, method, 0, []

    def __getattr__(self, name):
        self.calls += self.method is None or name == self.method
        self.names.append(name)
        return getattr(self.handle, name)


def pull(client, keys, cache=False):
    out = torch.zeros((len(keys), LAYOUT.block_nbytes), dtype=torch.uint8)
    result = client.get(LAYOUT, keys, out, cache=cache)
    ok = [found and torch.equal(out[i], payload(keys[i:i + 1])[0]) for i, found in enumerate(result.found)]
    assert ok == result.found, "a block was served with bytes other than its own"
    return result


def test_a_same_node_get_calls_no_actor(cluster):
    _, client = cluster
    keys = block_keys(tokens(14, 8), LAYOUT, "no-call")
    client.put(LAYOUT, keys, payload(keys))
    client._report_directory_reads()
    before = ray.get(client._node.stats.remote())["store"]["hits"]
    counting = client._node = Counting(client._node, "acquire")
    try:
        out = torch.zeros((8, LAYOUT.block_nbytes), dtype=torch.uint8)
        result = client.get(LAYOUT, keys, out)
        assert result.sources == [(client.node_id, "local")] * 8 and torch.equal(out, payload(keys))
        assert counting.calls == 0  # straight from the arena's directory
        # ... and still counted by the node, in the report the client sends at most once a second.
        node = counting.handle
        client._report_directory_reads()
        wait_for(lambda: ray.get(node.stats.remote())["store"]["hits"] >= before + 8, 10,
                 "the node to count the directory's hits")
        client.get(LAYOUT, block_keys(tokens(15, 1), LAYOUT, "no-call"), out[:1])
        assert counting.calls == 1  # a block not in the arena may be on this node's NVMe: ask it
    finally:
        client._node = counting.handle


def test_a_put_does_not_wait_for_its_commit_and_its_client_reads_and_deletes_it_at_once(cluster):
    _, client = cluster
    keys = block_keys(tokens(31, 3), LAYOUT, "own-writes")
    delayed = client._node = DelayedBinds(client._node)
    try:
        assert client.put(LAYOUT, keys, payload(keys)).stored == 3
        assert ray.wait(delayed.refs, timeout=0)[0] == []  # returned before its bind ran (or was even sent)
        out = torch.zeros((3, LAYOUT.block_nbytes), dtype=torch.uint8)
        result = client.get(LAYOUT, keys, out)
        assert result.sources == [(client.node_id, "local")] * 3 and torch.equal(out, payload(keys))
        # A delete right after a put is not undone by the put's commit coming later.
        more = block_keys(tokens(32, 2), LAYOUT, "own-writes")
        client.put(LAYOUT, more, payload(more))
        assert client.delete(more) == 2
        assert delayed.refs and ray.wait(delayed.refs, num_returns=len(delayed.refs), timeout=0)[0] == delayed.refs
        assert pull(client, more).hits == 0
    finally:
        client._node = delayed.handle


def test_same_node_puts_make_no_call_while_their_granted_slots_last(cluster):
    rc, client = cluster
    client.put(LAYOUT, *_own("warm-up", 0, 1))  # the first put asks for a grant, with slots ahead
    counting = client._node = Counting(client._node, None)
    try:
        written = []
        for i in range(1, 21):
            keys, blocks = _own("granted", i, 2)
            assert client.put(LAYOUT, keys, blocks).stored == 2
            written += keys
        assert set(counting.names) <= {"bind_many"}  # queued, sent in batches, never waited for
        assert pull(client, written).hits == 40  # its own writes, at once
        keys, blocks = _own("granted", 99, 2)
        with pytest.raises(kvstore.errors.InvalidKeyError, match="parents has 1 entries"):  # not lost in a bind
            client.put(LAYOUT, keys, blocks, parents=[None])
        with pytest.raises(kvstore.errors.InvalidKeyError, match="position 1"):
            client.put(LAYOUT, keys, blocks, parents=[None, b"short"])
    finally:
        client._node = counting.handle
    # Another process on the node reads them once their binds ran, bytes checked.
    got = ray.get(on_node(rc, 0).get_checked.remote(written))
    assert got["hits"] == 40 and got["corrupt"] == 0 and {s[1] for s in got["sources"]} == {"local"}


def test_granted_slots_of_a_writer_that_died_are_fenced_and_reclaimed(cluster):
    rc, _ = cluster
    node = ray.get_actor(f"kvstore-node-{rc.node_id(1)}", namespace="kvstore")
    store = lambda: ray.get(node.stats.remote())["store"]  # noqa: E731
    used = lambda: sum(t["used_slots"] for t in store()["tiers"])  # noqa: E731
    before, blocks, fenced = used(), store()["blocks"], store()["fenced_writes"]
    writer = NodeClient.options(resources={rc.resources[1]: 0.01}).remote(lease_ttl_s=1.0)
    ray.get(writer.put.remote(90, 2, "dead-writer"))
    wait_for(lambda: store()["blocks"] == blocks + 2, 10, "the writer's bind to run")
    granted = store()["granted_slots"]
    assert granted > 0 and used() == before + 2 + granted  # slots ahead are the writer's, unused
    ray.kill(writer)  # dies holding them
    wait_for(lambda: store()["granted_slots"] == 0, 15, "the dead writer's grant to expire")
    assert store()["fenced_writes"] >= fenced + granted
    wait_for(lambda: used() == before + 2, 30, "the fenced slots to be free after the grace")


def _own(namespace: str, seed: int, n: int):
    keys = block_keys(tokens(1000 + seed, n), LAYOUT, namespace)
    return keys, payload(keys)


def test_pulls_from_several_owners_at_once_and_cache_their_locations(cluster):
    rc, client = cluster
    keys = block_keys(tokens(11, 12), LAYOUT, "several-owners")
    b, c = on_node(rc, 1), on_node(rc, 2)
    ray.get([b.put_keys.remote(keys[:6]), c.put_keys.remote(keys[6:])])
    wait_for(lambda: client.longest_prefix(keys) == 12, 10, "the index to learn the blocks")
    counting = client._index = Counting(client._index, "locate")  # the index shards' lookups
    try:
        first = pull(client, keys)
        assert first.sources == [(rc.node_id(1), "remote")] * 6 + [(rc.node_id(2), "remote")] * 6
        assert counting.calls == 1  # one lookup for the whole batch, both owners
        second = pull(client, keys)
        assert second.sources == first.sources and counting.calls == 1  # owners remembered
    finally:
        client._index = counting.handle
    client.flush()
    assert client.contains(keys) == [True] * 12
    assert not any(ray.get(ray.get_actor(f"kvstore-node-{rc.node_id(0)}", namespace="kvstore")
                           .contains.remote(keys)))  # cache=False: nothing copied onto this node


def test_a_large_pull_from_one_owner_splits_over_streams(cluster, monkeypatch):
    import dataclasses

    import kvstore.cluster.client as client_module
    from kvstore.cluster.dataplane import DataPlaneClient

    rc, client = cluster
    keys = block_keys(tokens(19, 12), LAYOUT, "split-streams")
    put_on(rc, client, 1, keys)
    streams = []
    real_get = DataPlaneClient.get
    monkeypatch.setattr(DataPlaneClient, "get", lambda self, layout, ks, *a, **kw: (
        streams.append(len(ks)), real_get(self, layout, ks, *a, **kw))[1])
    monkeypatch.setattr(client_module, "_STREAM_MIN_BYTES", 1)  # the test's blocks are tiny
    monkeypatch.setattr(client, "config", dataclasses.replace(client.config, pull_streams=3))
    result = pull(client, keys)
    assert result.sources == [(rc.node_id(1), "remote")] * 12
    assert sorted(streams) == [4, 4, 4]


def test_a_stale_location_is_a_miss_or_a_fresh_lookup_never_wrong_bytes(cluster):
    rc, client = cluster
    keys = block_keys(tokens(12, 4), LAYOUT, "stale-location")
    b, c = on_node(rc, 1), on_node(rc, 2)
    ray.get(b.put_keys.remote(keys))
    wait_for(lambda: client.longest_prefix(keys) == 4, 10, "the index to learn the blocks")
    assert pull(client, keys).hits == 4  # the client now believes B holds them
    node_b = ray.get_actor(f"kvstore-node-{rc.node_id(1)}", namespace="kvstore")
    assert ray.get(node_b.delete.remote(keys)) == 4  # evicted from B behind the client's back
    ray.get(c.put_keys.remote(keys[:2]))  # two of them now live on C
    wait_for(lambda: [bool(h) for h in client.where(keys)] == [True, True, False, False], 10,
             "the index to follow the move")
    again = pull(client, keys)
    assert again.sources == [(rc.node_id(2), "remote")] * 2 + [None, None]


def test_a_known_owner_is_pulled_from_without_a_lookup(cluster):
    rc, client = cluster
    keys = block_keys(tokens(13, 3), LAYOUT, "known-owner")
    put_on(rc, client, 1, keys)
    counting = client._index = Counting(client._index, "locate")  # the index shards' lookups
    try:
        out = torch.zeros((3, LAYOUT.block_nbytes), dtype=torch.uint8)
        result = client.get(LAYOUT, keys, out, cache=False, owner=rc.node_id(1))  # as a handoff handle names it
        assert result.sources == [(rc.node_id(1), "remote")] * 3 and torch.equal(out, payload(keys))
        assert counting.calls == 0
    finally:
        client._index = counting.handle


def test_a_lease_is_taken_on_its_owner_and_ended_by_the_pull(cluster):
    rc, client = cluster
    keys = block_keys(tokens(15, 3), LAYOUT, "lease-on-owner")
    put_on(rc, client, 1, keys)  # committed on B (another client's put is seen once indexed)
    node_b = ray.get_actor(f"kvstore-node-{rc.node_id(1)}", namespace="kvstore")
    holds = lambda: ray.get(node_b.stats.remote())["holds"]  # noqa: E731
    before = holds()
    counting = client._controller = Counting(client._controller, None)
    try:
        lease = client.lease(LAYOUT, keys, ttl_s=30, node_id=rc.node_id(1))
        assert lease.keys == keys and lease.node_id == rc.node_id(1) and holds() == before + 1
        out = torch.zeros((3, LAYOUT.block_nbytes), dtype=torch.uint8)
        result = client.get(LAYOUT, keys, out, cache=False, owner=rc.node_id(1), lease=lease)
        assert result.sources == [(rc.node_id(1), "remote")] * 3 and torch.equal(out, payload(keys))
        wait_for(lambda: holds() == before, 10, "the owner to give the lease back after the pull")
        with pytest.raises(kvstore.errors.LeaseError):
            client.release_lease(lease)  # the pull ended it
        # Taken, used and ended without the controller (which at most told a new peer's address).
        assert set(counting.names) <= {"nodes"}, counting.names
    finally:
        client._controller = counting.handle


def test_a_handoff_is_loaded_from_its_node_without_a_local_copy_and_ends_its_lease(cluster):
    from kvstore.connectors.handoff import Handle, load

    rc, client = cluster
    handle = Handle.from_dict(ray.get(on_node(rc, 1).handoff.remote(17, 3)))
    node_b = ray.get_actor(f"kvstore-node-{rc.node_id(1)}", namespace="kvstore")
    assert handle.node_id == rc.node_id(1) and ray.get(node_b.stats.remote())["holds"] >= 1
    loaded = load(client, handle)
    assert loaded.num_blocks == 3 and loaded.sources == [(rc.node_id(1), "remote")] * 3
    k, v = loaded.layer(1)
    assert torch.all(k == 18.0) and torch.all(v == -18.0)
    wait_for(lambda: ray.get(node_b.stats.remote())["holds"] == 0, 10, "the pull to end the handoff's lease")
    client.flush()
    out = torch.zeros_like(loaded.blocks)
    again = client.get(LAYOUT, handle.keys, out, cache=False)
    assert again.sources == [(rc.node_id(1), "remote")] * 3 and torch.equal(out, loaded.blocks)  # no copy kept here


def test_a_load_in_flight_gives_every_layer_and_its_result_cuts_at_a_missing_block(cluster):
    from kvstore.connectors.handoff import Handle, start_load

    rc, client = cluster
    handle = Handle.from_dict(ray.get(on_node(rc, 1).handoff.remote(23, 3)))
    node_b = ray.get_actor(f"kvstore-node-{rc.node_id(1)}", namespace="kvstore")
    assert ray.get(node_b.delete.remote(handle.keys[1:2])) == 1  # evicted before the decode side came
    loading = start_load(client, handle)
    T = LAYOUT.block_tokens
    for layer in range(LAYOUT.num_layers):  # each layer is given, although a block never comes
        k, v = loading.layer(layer)
        assert k.shape[0] == 3 * T and torch.all(k[:T] == 23.0 + layer) and torch.all(v[:T] == -23.0 - layer)
    loaded = loading.result()
    assert loaded.num_blocks == 1 and loaded.missing == handle.keys[1:]  # only what came whole before the gap
    assert torch.all(loaded.layer(1)[0] == 24.0)
    wait_for(lambda: ray.get(node_b.stats.remote())["holds"] == 0, 10, "the pull to end the handoff's lease")


def test_a_stalled_peer_is_a_miss_within_the_deadline_and_then_left_alone(cluster):
    rc, client = cluster
    keys = block_keys(tokens(16, 2), LAYOUT, "stalled-peer")
    put_on(rc, client, 1, keys)
    pid = next(n["pid"] for n in client.nodes() if n["node_id"] == rc.node_id(1))
    os.kill(pid, signal.SIGSTOP)  # B's node actor stops answering, its sockets stay open
    try:
        start = time.monotonic()
        assert pull(client, keys).hits == 0
        assert time.monotonic() - start < 2 * client.config.transfer_timeout_s + 5  # not gRPC's own minutes
        skipped = client._breaker.skipped
        start = time.monotonic()
        assert pull(client, keys).hits == 0 and client._breaker.skipped > skipped  # B not tried again
        assert time.monotonic() - start < client.config.transfer_timeout_s
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: pull(client, keys).hits == 2, 60, "B to serve again once its breaker closes")


def test_each_node_publishes_its_block_events_for_routers_over_zmq(cluster):
    import zmq

    _, client = cluster
    endpoint = next(n for n in client.nodes() if n["node_id"] == client.node_id)["kv_events"]["endpoint"]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kvstore")
    sub.setsockopt(zmq.RCVTIMEO, 2000)
    sub.connect(endpoint)
    try:
        stored: set[bytes] = set()
        for seed in range(40, 50):  # until the subscription is up, PUB drops (ZMQ's slow joiner)
            keys = block_keys(tokens(seed, 2), LAYOUT, "kv-events")
            client.put(LAYOUT, keys, payload(keys))
            try:
                while not set(keys) <= stored:
                    _, events, _ = msgpack.unpackb(sub.recv_multipart()[2], raw=False)
                    stored |= {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
                break
            except zmq.Again:
                continue
        assert set(keys) <= stored
    finally:
        sub.close(linger=0)


def test_when_a_put_is_seen_where(cluster):
    rc, client = cluster
    # wait_index: the controller has the blocks when put returns, so another node's lookup does.
    waited = block_keys(tokens(16, 3), LAYOUT, "seen-waited")
    client.put(LAYOUT, waited, payload(waited), wait_index=True)
    assert ray.get(on_node(rc, 1).where.remote(waited)) == [[(client.node_id, "CPU")]] * 3
    # Without it: readable at once by any process on this node, in the index with the next batch.
    plain = block_keys(tokens(17, 3), LAYOUT, "seen-plain")
    client.put(LAYOUT, plain, payload(plain))
    neighbour = NodeClient.options(resources={rc.resources[0]: 0.01}).remote()
    got = ray.get(neighbour.get_checked.remote(plain))
    assert got["hits"] == 3 and got["corrupt"] == 0 and {s[1] for s in got["sources"]} == {"local"}
    wait_for(lambda: all(client.where(plain)), 5, "the next event batch to reach the index")
    late = block_keys(tokens(18, 2), LAYOUT, "seen-synced")
    client.put(LAYOUT, late, payload(late))
    client.sync()
    assert all(client.where(late))


def test_longest_prefix_and_best_node_across_nodes(cluster):
    rc, client = cluster
    keys = block_keys(tokens(2, 30), LAYOUT)
    a, b = on_node(rc, 0), on_node(rc, 1)
    ray.get(a.put_keys.remote(keys[:10]))
    ray.get(b.put_keys.remote(keys[10:30]))
    wait_for(lambda: client.longest_prefix(keys) == 30, 10, "the prefix to span both nodes")
    assert client.longest_prefix(keys + block_keys(tokens(3, 1), LAYOUT)) == 30
    best = client.best_node(keys[:10])
    assert best["node_id"] == rc.node_id(0) and best["prefix_blocks"] == 10
    assert best["per_node"][rc.node_id(1)] == 0  # B holds blocks 10..29 but not the prompt's start
    c = on_node(rc, 2)
    got = ray.get(c.get_checked.remote(keys))
    assert got["hits"] == 30 and got["corrupt"] == 0


def test_best_node_prefers_an_engine_holding_the_prompt_in_hbm(cluster):
    rc, client = cluster
    keys = block_keys(tokens(70, 6), LAYOUT, "hbm")
    client.put(LAYOUT, keys[:4], payload(keys[:4]), wait_index=True)  # node A's store: the first 4 blocks
    assert client.best_node(keys)["node_id"] == rc.node_id(0)
    # An engine on node B reports 5 of them in its HBM (its connector, from vLLM's KV events).
    assert client.report_residency("engine-b", keys[:5], node_id=rc.node_id(1)) == {"known_node": True, "resend": False}
    best = client.best_node(keys)
    assert (best["node_id"], best["engine_id"], best["hbm_prefix_blocks"]) == (rc.node_id(1), "engine-b", 5)
    assert client.where(keys[4:5]) == [[]]  # an engine's HBM is no holder to pull from
    client.report_residency("engine-b", removed=keys[3:5], node_id=rc.node_id(1))  # evicted from its HBM
    best = client.best_node(keys)
    assert (best["node_id"], best["engine_id"], best["prefix_blocks"]) == (rc.node_id(0), None, 4)
    assert best["per_engine"] == {"engine-b": 3}
    assert not client.report_residency("engine-x", keys, node_id="no-such-node")["known_node"]  # ignored
    client.report_residency("engine-b", cleared=True, node_id=rc.node_id(1))
    assert client.best_node(keys)["per_engine"] == {}


def test_lease_pins_and_expires(cluster):
    rc, client = cluster
    keys = block_keys(tokens(4, 5), LAYOUT)
    client.put(LAYOUT, keys, payload(keys))
    lease = client.lease(LAYOUT, keys, ttl_s=1.0)
    assert lease.keys == keys and lease.node_id == rc.node_id(0)
    node = ray.get_actor(f"kvstore-node-{rc.node_id(0)}", namespace="kvstore")
    assert ray.get(node.stats.remote())["holds"] >= 1
    wait_for(lambda: ray.get(node.stats.remote())["holds"] == 0, 10, "the lease's hold to expire")
    with pytest.raises(kvstore.errors.LeaseError):
        client.release_lease(lease)
    consumed = client.lease(LAYOUT, keys, ttl_s=30)
    client.release_lease(consumed)
    assert ray.get(node.stats.remote())["holds"] == 0


def test_pins_of_a_reader_that_died_are_reclaimed(cluster):
    rc, client = cluster
    keys = block_keys(tokens(20, 4), LAYOUT, "dead-reader")
    client.put(LAYOUT, keys, payload(keys))
    node = ray.get_actor(f"kvstore-node-{rc.node_id(0)}", namespace="kvstore")
    reader = NodeClient.options(resources={rc.resources[0]: 0.01}).remote()
    assert ray.get(reader.pin.remote(keys, 2.0)) == 4
    ray.kill(reader)  # dies holding its pins
    used = lambda: sum(t["used_slots"] for t in ray.get(node.stats.remote())["store"]["tiers"])  # noqa: E731
    wait_for(lambda: ray.get(node.stats.remote())["holds"] == 0, 10, "the dead reader's hold to expire")
    before = used()
    assert ray.get(node.delete.remote(keys)) == 4
    assert used() == before - 4  # unpinned: their slots are free at once, not left to a dead reader


def _flight(client, i: int = 0):
    address = sorted(client.nodes(), key=lambda n: n["address"])[i]["address"]
    return flight.FlightClient(f"grpc+tcp://{address}")


def _ticket(keys, layout=LAYOUT):
    return flight.Ticket(msgpack.packb({"v": 1, "op": "get", "layout": layout.to_dict(), "keys": keys}))


def test_flight_refuses_missing_or_wrong_token(cluster):
    _, client = cluster
    fc = _flight(client)
    keys = block_keys(tokens(1, 2), LAYOUT)
    for options in (flight.FlightCallOptions(timeout=10),
                    flight.FlightCallOptions(headers=[(b"authorization", b"Bearer wrong")], timeout=10)):
        with pytest.raises(flight.FlightUnauthenticatedError):
            fc.do_get(_ticket(keys), options).read_all()


@pytest.mark.parametrize("ticket", [
    os.urandom(64),
    b"",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"v": 1, "op": "get", "layout": "nope", "keys": []}),
    msgpack.packb({"v": 1, "op": "get", "layout": LAYOUT.to_dict(), "keys": [b"short"]}),
    msgpack.packb({"v": 1, "op": "get", "layout": LAYOUT.to_dict(), "keys": "not a list"}),
    msgpack.packb({"v": 1, "op": "put", "layout": LAYOUT.to_dict(), "keys": []}),
    msgpack.packb({"v": 2, "op": "get", "layout": LAYOUT.to_dict(), "keys": []}),
    b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion entries
    b"\xc6\x7f\xff\xff\xff",  # a bin claiming 2 GiB
    msgpack.packb({"v": 1, "op": "get", "layout": LAYOUT.to_dict(), "keys": [os.urandom(16)] * 70000}),  # past MAX_KEYS
])
def test_flight_malformed_tickets_get_errors_and_server_keeps_serving(cluster, ticket):
    _, client = cluster
    fc = _flight(client)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=10)
    with pytest.raises(flight.FlightServerError, match="bad get request"):
        fc.do_get(flight.Ticket(ticket), options).read_all()
    keys = block_keys(tokens(1, 3), LAYOUT)
    table = fc.do_get(_ticket(keys), options).read_all()
    assert table.num_rows == 3


def test_flight_put_with_wrong_sizes_is_refused(cluster):
    _, client = cluster
    from kvstore.cluster.dataplane import DataPlaneClient
    from kvstore.errors import TransferError

    node = sorted(client.nodes(), key=lambda n: n["address"])[1]
    peer = DataPlaneClient(node["address"], TOKEN, timeout_s=10)
    keys = block_keys(tokens(5, 2), LAYOUT, "flight-put")
    with pytest.raises(TransferError, match="bad put stream"):
        peer.put(LAYOUT, keys, [torch.zeros(100, dtype=torch.uint8)] * 2)
    assert peer.put(LAYOUT, keys, list(payload(keys))) == {"stored": 2, "present": 0, "rejected": 0, "corrupt": 0}
    assert peer.put(LAYOUT, keys, list(payload(keys))) == {"stored": 0, "present": 2, "rejected": 0, "corrupt": 0}
    peer.close()


def test_load_eight_clients_no_corruption(cluster):
    rc, client = cluster
    n_clients, n_blocks, batch = 8, 1000, 50
    actors = [NodeClient.options(resources={rc.resources[i % 3]: 0.01}).remote() for i in range(n_clients)]
    # Round one: everyone puts; round two: everyone reads the blocks of the client after it.
    firsts = ray.get([a.load.remote(100 + i, n_blocks, batch, []) for i, a in enumerate(actors)])
    assert all(f["acknowledged"] == n_blocks for f in firsts)
    all_keys = [f["keys"] for f in firsts]
    wait_for(lambda: all(client.longest_prefix(ks) == n_blocks for ks in all_keys), 20, "all puts to be indexed")
    seconds = ray.get([a.load.remote(200 + i, 0, batch, all_keys[(i + 1) % n_clients])
                       for i, a in enumerate(actors)])
    assert sum(s["corrupt"] for s in seconds) == 0
    assert sum(s["gets"] for s in seconds) == n_clients * n_blocks
    stats = client.stats()
    evictions = sum(t["evictions"] for n in stats["nodes"].values() for t in n["store"]["tiers"])
    misses = sum(s["misses"] for s in seconds)
    assert misses <= evictions, f"{misses} acknowledged blocks unreadable, only {evictions} evicted"


@pytest.fixture(scope="module")
def http(cluster):
    """The HTTP service over the real cluster client, on a loopback port, in a thread."""
    yield from http_service(cluster[1], TOKEN)


_http = http_call


def test_http_health_needs_no_token_everything_else_does(http):
    assert _http(http + "/healthz") == (200, '{"status": "ok"}')
    for path in ("/metrics", "/v1/stats", "/v1/nodes", "/"):
        assert _http(http + path)[0] == 401
        assert _http(http + path, token="wrong")[0] == 401
        assert _http(http + path, token=TOKEN)[0] == 200
    assert _http(http + f"/?token={TOKEN}")[0] == 401  # never a credential in a URL


def test_http_metrics_and_stats_show_real_numbers(cluster, http):
    import json

    from kvstore.metrics import names

    _, client = cluster
    code, text = _http(http + "/metrics", token=TOKEN)
    assert code == 200
    for name in ("kvstore_nodes", "kvstore_index_keys", "kvstore_tier_used_bytes", "kvstore_tier_hits_total",
                 "kvstore_tier_evictions_total", "kvstore_store_misses_total", "kvstore_dataplane_bytes_sent_total",
                 "kvstore_store_io_errors_total"):
        assert name in names(text), name
    assert "kvstore_nodes 3" in text
    sent = sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvstore_dataplane_bytes_sent_total{"))
    assert sent > 0  # earlier tests pulled blocks between nodes
    stats = json.loads(_http(http + "/v1/stats", token=TOKEN)[1])
    assert stats["nodes_registered"] == 3 and stats["index_keys"] > 0
    nodes = json.loads(_http(http + "/v1/nodes", token=TOKEN)[1])
    assert len(nodes) == 3
    page = _http(http + "/", token=TOKEN)[1]
    assert all(n["node_id"][:12] in page for n in nodes) and "blocks indexed" in page


def test_http_lookup_by_keys_and_by_tokens(cluster, http):
    import json

    _, client = cluster
    toks = tokens(9, 6)
    keys = block_keys(toks, LAYOUT)
    client.put(LAYOUT, keys[:4], payload(keys[:4]))
    wait_for(lambda: client.longest_prefix(keys) == 4, 10, "the blocks to be indexed")
    code, text = _http(http + "/v1/lookup", {"keys": [k.hex() for k in keys]}, TOKEN)
    assert code == 200
    body = json.loads(text)
    assert body["blocks"] == 6 and body["prefix_blocks"] == 4
    assert body["best_node"]["node_id"] == client.node_id
    assert body["locations"][0]["holders"] == [{"node_id": client.node_id, "medium": "CPU"}]
    by_tokens = json.loads(_http(http + "/v1/lookup", {"token_ids": toks.tolist(), "layout": LAYOUT.to_dict()},
                                 TOKEN)[1])
    assert by_tokens["prefix_blocks"] == 4


@pytest.mark.parametrize("body, message", [
    (b"{not json", "JSON"),
    ([1, 2], "object"),
    ({"keys": ["zz"]}, "not hex"),
    ({"keys": ["00" * 15]}, "15 bytes"),
    ({"keys": "abc"}, "list"),
    ({"token_ids": [1, 2], "layout": {"model_id": "x"}}, "incomplete"),
    ({"token_ids": [-1] * 16, "layout": LAYOUT.to_dict()}, "-1"),
    ({"nothing": 1}, "give either"),
])
def test_http_bad_lookups_get_400_with_a_message(http, body, message):
    code, text = _http(http + "/v1/lookup", body, TOKEN)
    assert code == 400 and message in text, text
    assert _http(http + "/healthz")[0] == 200


def test_the_index_has_at_least_two_shards_and_one_restarted_rebuilds_from_the_nodes(cluster):
    rc, client = cluster
    keys = block_keys(tokens(9, 60), LAYOUT, "shard-restart")
    put_on(rc, client, 1, keys)
    b_id = rc.node_id(1)
    shards = client.stats()["index"]["shards"]
    assert len(shards) >= 2 and sum(s["keys"] for s in shards) >= 60
    streams_elsewhere = [s["streams"] for s in shards[1:]]

    ray.kill(ray.get_actor(shard_actor_name(0), namespace="kvstore"), no_restart=False)
    seen_partial = False

    def whole_again() -> bool:
        nonlocal seen_partial
        prefix, holders = client.longest_prefix(keys), client.where(keys)
        # While shard 0 rebuilds: shorter answers, never a node that does not hold the block.
        assert all(h in ([], [(b_id, "CPU")]) for h in holders), holders
        seen_partial |= prefix < 60
        return prefix == 60 and all(holders)

    wait_for(whole_again, 60, "shard 0 to rebuild from the nodes")
    shards = client.stats()["index"]["shards"]
    assert shards[0]["streams"] >= 1
    assert [s["streams"] for s in shards[1:]] == streams_elsewhere, "the other shards were not resent anything"
    print(f"shard 0 rebuilt; a partial answer was seen during the rebuild: {seen_partial}")


def test_an_engines_hbm_residency_is_reported_again_after_a_shard_restart(cluster, tmp_path):
    """The connector's residency reporter follows an engine's KV events (vLLM's wire format, on a
    real ZMQ socket). A restarted shard has lost its part of the reports: the cluster answers the
    engine's next report (its heartbeat at the latest) with "resend", and the reporter sends
    everything the engine holds, so best_node names the engine for the whole prompt again."""
    rc, client = cluster
    keys = block_keys(tokens(71, 12), LAYOUT, "hbm-resend")
    hashes = [f"vllm-hash-{i}".encode() for i in range(len(keys))]
    pub = zmq.Context.instance().socket(zmq.PUB)
    endpoint = f"ipc://{tmp_path}/kv-events"
    pub.bind(endpoint)
    reporter = HBMResidency(client, "engine-resend", endpoint)
    try:
        reporter.learn(hashes, keys)
        stored = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None, "token_ids": [],
                  "block_size": 16, "lora_id": None, "medium": "GPU"}

        def named() -> bool:
            pub.send_multipart([b"", (0).to_bytes(8, "big"), msgpack.packb([time.time(), [stored], 0])])
            best = client.best_node(keys)  # (sent until the subscription has joined: ZMQ drops before)
            return (best["engine_id"], best["hbm_prefix_blocks"]) == ("engine-resend", 12)

        wait_for(named, 30, "the engine's HBM residency to be reported")
        assert reporter.resends == 0
        ray.kill(ray.get_actor(shard_actor_name(0), namespace="kvstore"), no_restart=False)
        # No more events: only the reporter's heartbeat can learn that shard 0 lost its part.
        wait_for(lambda: reporter.resends >= 1, 30, "the cluster to ask the reporter for everything again")
        wait_for(lambda: client.best_node(keys)["hbm_prefix_blocks"] == 12, 10, "the engine's whole residency again")
        assert client.best_node(keys)["engine_id"] == "engine-resend"
    finally:
        reporter.close()
        pub.close(linger=0)


def test_controller_restart_rebuilds_the_index(cluster):
    rc, client = cluster
    keys = block_keys(tokens(6, 25), LAYOUT, "restart")
    put_on(rc, client, 1, keys)
    before = client.stats()["index_keys"]
    ray.kill(client._controller, no_restart=False)
    wait_for(lambda: _answers(client), 60, "the controller to restart")
    client.wait_ready(3)
    assert client.longest_prefix(keys) == 25, "the index is rebuilt from the nodes"
    wait_for(lambda: client.stats()["index_keys"] >= before, 30, "every node to resync")


def _answers(client) -> bool:
    try:
        return ray.get(client._controller.nodes.remote(), timeout=5) is not None and len(client.nodes()) == 3
    except Exception:
        return False


def test_node_death_drops_its_blocks_and_others_keep_serving(cluster):
    rc, client = cluster
    b_keys = block_keys(tokens(7, 20), LAYOUT, "death")
    put_on(rc, client, 1, b_keys)
    b_id = rc.node_id(1)
    assert all(h == [(b_id, "CPU")] for h in client.where(b_keys))

    killed_at = time.monotonic()
    rc.kill_node(1)
    wait_for(lambda: len(client.nodes()) == 2, 30, "the dead node to leave the membership")
    detection_s = time.monotonic() - killed_at
    assert b_id not in {n["node_id"] for n in client.nodes()}
    client.wait_ready(2, 30)
    assert client.longest_prefix(b_keys) == 0

    start = time.monotonic()
    out = torch.zeros((20, LAYOUT.block_nbytes), dtype=torch.uint8)
    result = client.get(LAYOUT, b_keys, out)
    assert result.hits == 0 and time.monotonic() - start < 30
    # A and C keep serving, across nodes.
    keys = block_keys(tokens(8, 10), LAYOUT, "after-death")
    assert client.put(LAYOUT, keys, payload(keys)).stored == 10
    # An index shard placed on the dead node comes back elsewhere first (Ray's detection + restart).
    wait_for(lambda: client.longest_prefix(keys) == 10, 30, "new blocks to be indexed")
    got = ray.get(on_node(rc, 2).get_checked.remote(keys))
    assert got["hits"] == 10 and got["corrupt"] == 0
    print(f"dead node detected and dropped in {detection_s:.1f} s")


def test_a_node_that_died_with_the_controller_is_dropped_by_the_next_one(cluster):
    rc, client = cluster
    keys = block_keys(tokens(10, 15), LAYOUT, "died-with-the-controller")
    put_on(rc, client, 2, keys)
    c_id = rc.node_id(2)
    ray.kill(client._controller, no_restart=True)  # the controller goes down with C...
    rc.kill_node(2)
    wait_for(lambda: c_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}, 30, "Ray to declare C dead")
    settings = {k: v for k, v in KV_CLUSTER["settings"].items() if k != "nvme_tier_bytes"}  # no new node is made
    fresh = kvstore.connect(rc.gcs_address, **settings)  # ...and a new one starts after
    client._controller = fresh._controller  # the fixture shuts the cluster down through its client
    fresh.close(shutdown_cluster=False)
    # The new controller never knew C, but Ray says it is dead: the shards drop its entries.
    wait_for(lambda: client.longest_prefix(keys) == 0, 30, "C's blocks to leave the index")
