"""kvstore's block events, live over ZMQ, decoded by a subscriber written against vLLM's own
event classes (vllm.distributed.kv_events), as a KV-aware router consumes them."""
from __future__ import annotations

import os

import pytest
import torch

from vllm_support import needs_vllm

pytestmark = [pytest.mark.vllm, needs_vllm]


def test_a_vllm_subscriber_decodes_a_node_s_events_with_vllm_s_classes(tmp_path):
    import msgspec
    import zmq
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

    from kvstore.cluster.kvevents import EventPublisher
    from kvstore.layout import Layout
    from kvstore.store import TieredStore
    from kvstore.tiers.host import HostTier

    layout = Layout("test/kv-events", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
    publisher = EventPublisher("tcp://127.0.0.1:*", topic="kvstore", period_s=0.01)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kvstore")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(publisher.endpoint)
    store = TieredStore([HostTier(f"kvev-{os.getpid()}", layout.block_nbytes, 3 * layout.block_nbytes)],
                        listener=publisher.publish)
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    seen: list = []
    try:
        keys = [os.urandom(16) for _ in range(5)]
        for key, parent in zip(keys, [None] + keys[:-1]):  # a chain, in a tier of 3 slots
            store.put(layout, [key], torch.zeros((1, layout.block_nbytes), dtype=torch.uint8), parents=[parent])
            try:
                seen += decoder.decode(sub.recv_multipart()[2]).events
            except zmq.Again:  # sent before the subscription was up (ZMQ's slow joiner)
                pass
        stored = [h for e in seen if isinstance(e, BlockStored) for h in e.block_hashes]
        removed = [h for e in seen if isinstance(e, BlockRemoved) for h in e.block_hashes]
        assert stored and set(stored) <= set(keys) and all(e.medium == "CPU" for e in seen)
        assert removed and set(removed) <= set(keys) and stored[-1] == keys[-1]  # 5 blocks, 3 slots: some evicted
        last = [e for e in seen if isinstance(e, BlockStored)][-1]
        assert last.parent_block_hash == keys[-2]  # the chain, as vLLM's prefix events carry it
    finally:
        sub.close(linger=0)
        publisher.close()
        store.close()
