"""A node's block events over ZMQ (cluster/kvevents.py): vLLM's wire format, live and replayed."""
from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
import zmq

from kvstore.cluster.kvevents import END_SEQ, EventPublisher
from kvstore.events import BlockStored
from kvstore.store import TieredStore
from kvstore.tiers.host import HostTier

from kvtest_support import LAYOUT, NBYTES, shm_name


@pytest.fixture
def publisher():
    pub = EventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", buffer_steps=4, topic="kv", period_s=0.01)
    yield pub
    pub.close()


def subscriber(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(endpoint)
    return sub


def test_a_store_s_events_arrive_in_batches_with_sequence_numbers(publisher):
    sub = subscriber(publisher.endpoint)
    store = TieredStore([HostTier(shm_name(), NBYTES, 4 * NBYTES)], listener=publisher.publish)
    try:
        received = []
        keys = [os.urandom(16) for _ in range(6)]
        for i in range(3):  # until the subscription is up, PUB drops what it sends (ZMQ's slow joiner)
            store.put(LAYOUT, keys[2 * i:2 * i + 2], torch.zeros((2, NBYTES), dtype=torch.uint8))
            received.append(sub.recv_multipart())
            if len(received) > 1:
                break
        topic, seq, payload = received[-1]
        assert topic == b"kv" and int.from_bytes(seq, "big") >= 1
        _, events, _ = msgpack.unpackb(payload)
        assert any(e["type"] == "BlockStored" and e["medium"] == "CPU" for e in events)
        store.put(LAYOUT, [os.urandom(16) for _ in range(4)], torch.zeros((4, NBYTES), dtype=torch.uint8))
        _, seq2, payload = sub.recv_multipart()
        assert int.from_bytes(seq2, "big") == int.from_bytes(seq, "big") + 1
        assert any(e["type"] == "BlockRemoved" for e in msgpack.unpackb(payload)[1])  # 4 slots: some were evicted
    finally:
        sub.close(linger=0)
        store.close()


def test_a_replay_sends_the_buffered_batches_from_a_sequence_number_then_the_end(publisher):
    for i in range(6):  # only the last 4 stay buffered
        publisher.publish([BlockStored([bytes([i]) * 16], None, "CPU")])
        time.sleep(0.05)  # a batch each
    req = zmq.Context.instance().socket(zmq.DEALER)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    req.connect(publisher.replay_endpoint)
    try:
        req.send_multipart((b"", (1).to_bytes(8, "big")))
        replies = []
        while True:
            _, topic, seq, payload = req.recv_multipart()
            if seq == END_SEQ:
                assert topic == b"" and payload == b""
                break
            replies.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)[1][0]["block_hashes"][0][0]))
        assert replies == [(2, 2), (3, 3), (4, 4), (5, 5)]  # from 1 on, of what is still buffered
        req.send_multipart((b"", b"bad"))  # a malformed request is ignored, the socket goes on
        req.send_multipart((b"", (5).to_bytes(8, "big")))
        assert int.from_bytes(req.recv_multipart()[2], "big") == 5
    finally:
        req.close(linger=0)
