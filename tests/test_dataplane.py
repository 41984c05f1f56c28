"""The Flight data plane on its own (a real server on loopback, no Ray): small blocks travel
packed several per batch, large ones one per batch straight out of the arena; both deliver
every block's own bytes with its committed checksum, and a damaged block is left out."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from kvstore.cluster import dataplane
from kvstore.cluster.dataplane import PACK_BELOW, DataPlaneClient, DataPlaneServer
from kvstore.cluster.protocol import ProtocolError
from kvstore.errors import TransferError
from kvstore.layout import Layout
from kvstore.store import TieredStore
from kvstore.tiers.host import HostTier

from kvtest_support import shm_name, wait_for

SMALL = Layout("test/dp-small", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
LARGE = Layout("test/dp-large", num_layers=8, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=32)
TOKEN = "dp-" + os.urandom(4).hex()


@pytest.fixture(params=[(SMALL, None), (LARGE, None), (LARGE, 256 * 1024)], ids=["packed", "one-per-batch", "pieces"])
def served(request, monkeypatch):
    layout, piece = request.param
    assert (layout.block_nbytes < PACK_BELOW) == (layout is SMALL)
    if piece is not None:  # each block travels in 4 pieces
        monkeypatch.setattr(dataplane, "PIECE_BYTES", piece)
    store = TieredStore([HostTier(shm_name(), layout.block_nbytes, 40 * layout.block_nbytes)])
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30).start()
    client = DataPlaneClient(server.address, TOKEN, timeout_s=20)
    yield layout, store, client
    client.close()
    server.shutdown()
    store.close()


def blocks(layout, keys):
    return torch.from_numpy(np.stack([np.frombuffer(np.random.default_rng(int.from_bytes(k[:4], "little"))
                                                    .bytes(layout.block_nbytes), dtype=np.uint8) for k in keys]))


def pull(client, layout, keys):
    got = {}
    delivered = client.get(layout, keys, lambda k, data, s, offset: got.__setitem__(k, (bytes(data), s)))
    return delivered, got


def test_every_block_arrives_whole_with_its_checksum(served):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(20)]
    data = blocks(layout, keys)
    store.put(layout, keys, data)
    absent = os.urandom(16)
    delivered, got = pull(client, layout, keys[:7] + [absent] + keys[7:])
    assert delivered == set(keys)
    for i, k in enumerate(keys):
        assert got[k][0] == data[i].numpy().tobytes()
        assert got[k][1] == store._index[k].checksum


def test_a_damaged_block_is_left_out_and_counted(served):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(5)]
    store.put(layout, keys, blocks(layout, keys))
    store.tiers[0].arena[store._index[keys[3]].slot, 5] ^= 0xFF
    delivered, got = pull(client, layout, keys)
    assert delivered == set(keys) - {keys[3]} and client.corrupt_received == 1
    # Negative control: unchecked, the damaged bytes do arrive.
    unchecked = {}
    client.get(layout, keys[3:4], lambda k, data, s, offset: unchecked.__setitem__(k, unchecked.get(k, b"") + bytes(data)), verify=False)
    assert unchecked[keys[3]] != blocks(layout, keys[3:4])[0].numpy().tobytes()


def test_pins_are_given_back_once_the_stream_is_done(served):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(12)]
    store.put(layout, keys, blocks(layout, keys))
    pull(client, layout, keys)
    import gc
    gc.collect()
    assert all(store._index[k].pins == 0 for k in keys)
    assert store.delete(keys) == 12 and store.stats()["tiers"][0]["used_slots"] == 0


def test_gets_share_one_session_and_a_bad_request_does_not_end_it(served):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(6)]
    store.put(layout, keys, blocks(layout, keys))
    for i in range(6):
        assert pull(client, layout, keys[i:i + 1])[0] == {keys[i]}
    assert len(client._idle) == 1  # one session, reused by every get
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        list(client._idle[0].chunks(b"\xc1 not msgpack"))  # a malformed request on it
    assert pull(client, layout, keys)[0] == set(keys)  # the same session goes on serving


@pytest.mark.parametrize("bound", ["MAX_SESSIONS", "MAX_SESSIONS_PER_PEER"])
def test_open_sessions_are_bounded_in_all_and_per_peer(served, monkeypatch, bound):
    layout, store, _ = served
    monkeypatch.setattr(dataplane, bound, 2)  # the test's clients all come from 127.0.0.1
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30).start()
    clients = [DataPlaneClient(server.address, TOKEN, timeout_s=20) for _ in range(3)]
    keys = [os.urandom(16)]
    store.put(layout, keys, blocks(layout, keys))
    try:
        for c in clients[:2]:
            assert pull(c, layout, keys)[0] == set(keys)  # each keeps its session open
        message = "more than 2 sessions open" + (" from ipv4:127.0.0.1" if bound == "MAX_SESSIONS_PER_PEER" else "")
        with pytest.raises(TransferError, match=message):
            pull(clients[2], layout, keys)
        clients[0].close_idle(0)
        wait_for(lambda: sum(server._open.values()) < 2, 10, "the closed session to end on the server")
        assert pull(clients[2], layout, keys)[0] == set(keys)
        assert server.counters["sessions_refused"] == 1
    finally:
        for c in clients:
            c.close()
        server.shutdown()


def test_a_session_is_replaced_before_its_deadline(served):
    layout, store, _ = served
    keys = [os.urandom(16)]
    store.put(layout, keys, blocks(layout, keys))
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30).start()
    client = DataPlaneClient(server.address, TOKEN, timeout_s=1.0)
    try:
        assert pull(client, layout, keys)[0] == set(keys)
        first = client._idle[0]
        first.expires = time.monotonic() + 0.4  # less than half the deadline left: not used again
        assert pull(client, layout, keys)[0] == set(keys)
        assert client._idle == [client._idle[0]] and client._idle[0] is not first
        assert server.counters["sessions_opened"] == 2
    finally:
        client.close()
        server.shutdown()


def test_a_stalled_peer_ends_the_get_at_the_deadline(served, monkeypatch):
    layout, store, _ = served
    keys = [os.urandom(16)]
    store.put(layout, keys, blocks(layout, keys))
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30).start()
    client = DataPlaneClient(server.address, TOKEN, timeout_s=1.0)
    stall = threading.Event()
    acquire = store.acquire
    monkeypatch.setattr(store, "acquire", lambda *a: (stall.wait(30), acquire(*a))[1])
    try:
        start = time.monotonic()
        with pytest.raises(TransferError):
            pull(client, layout, keys)
        assert time.monotonic() - start < 10  # the 1 s deadline, not the 30 s stall
    finally:
        stall.set()
        client.close()
        server.shutdown()


def test_a_get_that_names_a_hold_has_it_given_back(served):
    layout, store, _ = served
    keys = [os.urandom(16) for _ in range(3)]
    store.put(layout, keys, blocks(layout, keys))
    released = []
    server = DataPlaneServer(store, "127.0.0.1", 0, TOKEN, 1 << 30, release_hold=released.append).start()
    client = DataPlaneClient(server.address, TOKEN, timeout_s=20)
    try:
        got = {}
        assert client.get(layout, keys, lambda k, d, s, offset: got.__setitem__(k, d), release="abc123") == set(keys)
        assert released == ["abc123"]
        assert client.get(layout, [os.urandom(16)], lambda k, d, s, offset: None, release="def456") == set()
        assert released == ["abc123", "def456"]  # given back even when nothing was there to send
    finally:
        client.close()
        server.shutdown()


@pytest.mark.parametrize("verify", [True, False], ids=["checked-whole", "pieces"])
def test_a_get_by_layer_sends_every_blocks_layer_before_the_next_layer(served, verify):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(9)]
    data = blocks(layout, keys)
    store.put(layout, keys, data)
    arrivals, got = [], {k: bytearray(layout.block_nbytes) for k in keys}

    def sink(key, piece, block_sum, offset):
        arrivals.append((key, offset, len(piece)))
        got[key][offset:offset + len(piece)] = piece

    assert client.get(layout, keys + [os.urandom(16)], sink, verify=verify, by_layer=True) == set(keys)
    assert all(bytes(got[k]) == data[i].numpy().tobytes() for i, k in enumerate(keys))
    if verify:  # the client hands over each block whole, once it is checked
        assert [offset for _, offset, _ in arrivals] == [0] * len(keys)
        return
    per = -(-dataplane.MIN_LAYER_PIECE // layout.layer_nbytes)  # small layers travel a few at a time
    groups = [offset // (per * layout.layer_nbytes) for _, offset, _ in arrivals]
    assert groups == sorted(groups) and set(groups) == set(range(-(-layout.num_layers // per)))  # layer-major
    assert all(n <= per * layout.layer_nbytes for _, _, n in arrivals)
    assert [k for k, offset, _ in arrivals if offset == 0] == keys  # each layer in the order asked
    assert all(store._index[k].pins == 0 for k in keys)


def test_a_get_by_layer_of_a_damaged_block_leaves_it_out(served):
    layout, store, client = served
    keys = [os.urandom(16) for _ in range(3)]
    store.put(layout, keys, blocks(layout, keys))
    store.tiers[0].arena[store._index[keys[1]].slot, layout.block_nbytes - 1] ^= 0xFF  # in its last layer
    got = {}
    assert client.get(layout, keys, lambda k, d, s, offset: got.__setitem__(k, bytes(d)), by_layer=True) == \
        {keys[0], keys[2]}
    assert client.corrupt_received == 1 and set(got) == {keys[0], keys[2]}
