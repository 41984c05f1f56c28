"""Right KV or a clean miss, across nodes: checksums on the wire and on local reads, fenced
writers whose holds expired, renewals of long holds, and honest replies from Flight puts.

A two-node cluster with a tiny host tier (32 slots, no NVMe, so a full tier stays full), short
holds and deadlines.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import ray
import torch

import kvstore
from kvstore import Layout, block_keys
from kvstore.cluster.node import node_actor_name
from kvstore.connectors.handoff import SaveSession
from kvstore.errors import LeaseError
from kvstore.tiers.host import HostArena
from kvtest_support import wait_for

pytestmark = pytest.mark.cluster
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYOUT = Layout("test/integrity", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
TOKEN = "test-token-" + os.urandom(4).hex()
SLOTS = 32
KV_CLUSTER = {"nodes": 2, "settings": dict(
    auth_token=TOKEN, host_tier_bytes=f"{SLOTS * 8}KiB", slot_bytes="8KiB", event_batch_ms=10,
    lease_ttl_s=1.5, fence_grace_s=0.5, transfer_timeout_s=2.0, verify_reads="always")}


def payload(keys: list[bytes]) -> torch.Tensor:
    rows = [np.frombuffer(hashlib.shake_128(k).digest(LAYOUT.block_nbytes), dtype=np.uint8) for k in keys]
    return torch.from_numpy(np.stack(rows))


def keys_of(tag: str, n: int) -> list[bytes]:
    return block_keys(np.arange(n * LAYOUT.block_tokens) + 7, LAYOUT, f"integrity-{tag}-{os.urandom(4).hex()}")


@ray.remote(num_cpus=0)
class Writer:
    """A client on another node."""

    def __init__(self) -> None:
        self.client = kvstore.connect()

    def put(self, keys: list[bytes]) -> int:
        return self.client.put(LAYOUT, keys, payload(keys)).stored


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    rc, client = kv_cluster
    writer = Writer.options(resources={rc.resources[1]: 0.01}).remote()
    return rc, client, writer


def node_actor(client, node_id: str):
    return ray.get_actor(node_actor_name(node_id), namespace=client.config.ray_namespace)


def scribble(client, node_id: str, keys: list[bytes]) -> None:
    """Flips bytes of stored blocks in place in a node's arena, as a stray writer could."""
    actor = node_actor(client, node_id)
    info = ray.get(actor.info.remote())
    hold, slots, _ = ray.get(actor.acquire.remote(LAYOUT.to_dict(), keys))
    arena = HostArena.open(info["shm_name"])
    try:
        for slot in slots:
            arena.tensor[slot, 64:96] ^= 0x5A
    finally:
        arena.close()
        ray.get(actor.release.remote(hold))


def store_stats(client, node_id: str) -> dict:
    return ray.get(node_actor(client, node_id).stats.remote())["store"]



def other_node(rc, client) -> str:
    return next(n["node_id"] for n in client.nodes() if n["node_id"] != client.node_id)


def test_a_block_damaged_at_its_owner_is_a_miss_when_pulled(cluster):
    rc, client, writer = cluster
    keys = keys_of("wire", 3)
    assert ray.get(writer.put.remote(keys)) == 3
    owner = other_node(rc, client)
    scribble(client, owner, keys[1:2])
    # Negative control: the owner really serves the damaged bytes under the good checksum.
    address = next(n["address"] for n in client.nodes() if n["node_id"] == owner)
    fc = flight.FlightClient(f"grpc+tcp://{address}")
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=10)
    ticket = msgpack.packb({"v": 1, "op": "get", "layout": LAYOUT.to_dict(), "keys": keys[1:2]})
    table = fc.do_get(flight.Ticket(ticket), options).read_all()
    assert table.column("data")[0].as_py() != payload(keys[1:2])[0].numpy().tobytes()
    fc.close()

    out = torch.zeros((3, LAYOUT.block_nbytes), dtype=torch.uint8)
    result = client.get(LAYOUT, keys, out)
    assert result.found == [True, False, True]
    assert torch.equal(out[0], payload(keys)[0]) and torch.equal(out[2], payload(keys)[2])
    assert client.corrupt_received == 1
    client.flush()
    assert client.contains(keys[1:2]) == [True]  # only at its owner, who has not read it itself


def test_a_scribbled_local_block_is_a_miss_and_dropped_by_its_node(cluster):
    _, client, _ = cluster
    keys = keys_of("local", 2)
    assert client.put(LAYOUT, keys, payload(keys)).stored == 2
    scribble(client, client.node_id, keys[:1])
    out = torch.zeros((2, LAYOUT.block_nbytes), dtype=torch.uint8)
    assert client.get(LAYOUT, keys, out).found == [False, True]  # verify_reads=always here
    assert torch.equal(out[1], payload(keys)[1])
    wait_for(lambda: store_stats(client, client.node_id)["corrupt_dropped"] >= 1, 10, "the node to drop it")
    wait_for(lambda: client.contains(keys[:1]) == [False], 10, "the index to forget it")


def test_an_expired_write_hold_cannot_corrupt_another_block(cluster):
    _, client, _ = cluster
    tokens = np.arange(3 * LAYOUT.block_tokens) + 1000
    session = SaveSession(client, LAYOUT, tokens, namespace=f"late-{os.urandom(4).hex()}")
    assert all(v is not None for v in session.hold.views)
    # The prefill stalls past its hold's TTL and the fence's grace; the slots go to other blocks.
    time.sleep(1.5 + 0.5 + 0.5)
    others = keys_of("after", SLOTS)
    assert client.put(LAYOUT, others, payload(others)).stored == SLOTS
    with pytest.raises(LeaseError, match="fenced"):
        client.check_hold(session.hold)
    k = torch.randn(len(tokens), 2, 8).half()
    with pytest.raises(LeaseError, match="expired"):
        session.save_layer(0, k, k)  # it tries to renew, and learns its hold expired
    with pytest.raises(LeaseError, match="expired"):
        client.commit(session.hold)
    out = torch.zeros((SLOTS, LAYOUT.block_nbytes), dtype=torch.uint8)
    assert client.get(LAYOUT, others, out).hits == SLOTS
    assert torch.equal(out, payload(others))
    assert client.contains(session.keys) == [False] * 3
    assert store_stats(client, client.node_id)["fenced_writes"] >= 3


def test_a_long_prefill_renews_its_hold(cluster):
    _, client, _ = cluster
    tokens = np.arange(2 * LAYOUT.block_tokens) + 5000
    session = SaveSession(client, LAYOUT, tokens, namespace=f"slow-{os.urandom(4).hex()}")
    kv = [torch.randn(len(tokens), 2, 8).half() for _ in range(LAYOUT.num_layers)]
    for layer in range(LAYOUT.num_layers):
        time.sleep(1.0)  # 2 s in all, past the 1.5 s TTL: only renewals keep the slots
        session.save_layer(layer, kv[layer], kv[layer])
    handle = session.finish()
    assert handle.num_tokens == len(tokens)
    out = torch.zeros((2, LAYOUT.block_nbytes), dtype=torch.uint8)
    assert client.get(LAYOUT, handle.keys, out).hits == 2
    client.release_lease(handle.lease_id)


def _raw_put(address: str, keys: list[bytes]):
    fc = flight.FlightClient(f"grpc+tcp://{address}")
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())], timeout=20)
    cmd = msgpack.packb({"v": 1, "op": "put", "layout": LAYOUT.to_dict(), "keys": keys})
    from kvstore.cluster.protocol import BLOCK_SCHEMA
    writer, reader = fc.do_put(flight.FlightDescriptor.for_command(cmd), BLOCK_SCHEMA, options)
    return fc, writer, reader


def _batch(key: bytes, data: bytes, block_sum: int):
    from kvstore.cluster.protocol import BLOCK_SCHEMA
    return pa.RecordBatch.from_arrays([pa.array([key], pa.binary(16)), pa.array([block_sum], pa.uint64()),
                                       pa.array([0], pa.uint64()), pa.array([data], pa.large_binary())],
                                      schema=BLOCK_SCHEMA)


def test_a_flight_put_without_room_reports_rejected_not_present(cluster):
    from kvstore.cluster.dataplane import DataPlaneClient

    rc, client, _ = cluster
    node = next(n for n in client.nodes() if n["node_id"] == client.node_id)
    filler = keys_of("full", SLOTS)
    client.put(LAYOUT, filler, payload(filler))
    hold = client.acquire(LAYOUT, filler)  # every slot pinned: nothing can be evicted
    try:
        assert all(v is not None for v in hold.views)
        peer = DataPlaneClient(node["address"], TOKEN, timeout_s=10)
        fresh = keys_of("no-room", 2)
        reply = peer.put(LAYOUT, fresh, list(payload(fresh)))
        peer.close()
        assert reply == {"stored": 0, "present": 0, "rejected": 2, "corrupt": 0}
        assert client.contains(fresh) == [False, False]
    finally:
        client.release(hold)


def test_a_flight_put_with_damaged_bytes_stores_nothing_of_them(cluster):
    from kvstore.integrity import checksum

    _, client, _ = cluster
    node = next(n for n in client.nodes() if n["node_id"] == client.node_id)
    keys = keys_of("damaged-put", 2)
    rows = payload(keys)
    fc, writer, reader = _raw_put(node["address"], keys)
    writer.write_batch(_batch(keys[0], rows[0].numpy().tobytes(), checksum(rows[0])))
    writer.write_batch(_batch(keys[1], rows[1].numpy().tobytes(), checksum(rows[1]) ^ 1))
    writer.done_writing()
    reply = msgpack.unpackb(reader.read().to_pybytes())
    writer.close()
    fc.close()
    assert reply == {"stored": 1, "present": 0, "rejected": 0, "corrupt": 1}
    wait_for(lambda: client.contains(keys) == [True, False], 10, "the index to learn the one stored block")


def test_a_stalled_flight_put_gives_its_slots_back(cluster):
    _, client, _ = cluster
    node = next(n for n in client.nodes() if n["node_id"] == client.node_id)
    before = store_stats(client, client.node_id)["fenced_writes"]
    stalled = keys_of("stalled", SLOTS // 2)
    fc, writer, reader = _raw_put(node["address"], stalled)
    # Half the tier is reserved by a sender that sends nothing: past transfer_timeout_s (2 s) and
    # the grace, the slots are back and a full tier's worth of blocks fits again.
    wait_for(lambda: store_stats(client, client.node_id)["fenced_writes"] >= before + len(stalled), 10,
             "the stalled put's slots to be fenced")
    time.sleep(0.6)
    others = keys_of("after-stall", SLOTS)
    assert client.put(LAYOUT, others, payload(others)).stored == SLOTS
    rows = payload(stalled)
    from kvstore.integrity import checksum
    with pytest.raises(flight.FlightError, match="did not finish within"):
        writer.write_batch(_batch(stalled[0], rows[0].numpy().tobytes(), checksum(rows[0])))
        writer.done_writing()
        reader.read()
        writer.close()
    fc.close()
    out = torch.zeros((SLOTS, LAYOUT.block_nbytes), dtype=torch.uint8)
    assert client.get(LAYOUT, others, out).hits == SLOTS and torch.equal(out, payload(others))
    assert client.contains(stalled[:1]) == [False]
