"""A node's block events for KV-aware routers, over ZMQ in vLLM's KV-event wire format.

Routers that follow vLLM engines (llm-d's indexer, Ray Serve's KV-aware router) subscribe to
each engine's ZMQ PUB socket: multipart messages (topic, sequence number as 8 bytes big-endian,
msgpack `EventBatch`), and ask its ROUTER socket for what they missed (a request carries the
first sequence number wanted, 8 bytes big-endian; the answer is every batch still buffered from
there, each as (topic, sequence, batch), then an end marker whose sequence is -1). A kvstore
node publishes its store's events the same way, encoded as vLLM's own classes encode them
(`vllm_batch`: `[ts, [event, ...], data_parallel_rank]`, each event a map tagged by "type":
BlockStored, BlockRemoved, AllBlocksCleared), with vLLM's medium names ("GPU" for HBM, "CPU" for
the host tier, "STORAGE" for NVMe), so a consumer of vLLM's events follows kvstore's tiers too.

The store calls `publish` under its lock, so it only queues; a thread gathers what was queued
every `period_s`, coalesces it (kvstore/events.py) and sends one batch. The feed is meant for
the cluster's own network: ZMQ has no authentication here, and the keys it carries are as
stored (a tenant's are scoped, so they do not let anyone address that tenant's blocks).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import msgpack
import zmq

from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, Event, coalesce

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM = {"GPU": "GPU", "CPU": "CPU", "DISK": "STORAGE"}  # a tier's medium -> vLLM's name for it


def vllm_batch(events: list[Event], ts: float | None = None) -> bytes:
    """msgpack of events as vLLM's KVEventBatch (vllm.distributed.kv_events) encodes them."""
    return msgpack.packb([time.time() if ts is None else ts, [_vllm_event(e) for e in events], None],
                         use_bin_type=True)


def _vllm_event(event: Event) -> dict:
    if isinstance(event, BlockStored):
        return {"type": "BlockStored", "block_hashes": event.block_hashes, "parent_block_hash": event.parent_block_hash,
                "token_ids": event.token_ids, "block_size": event.block_size, "lora_id": event.lora_id,
                "medium": MEDIUM.get(event.medium, event.medium), "lora_name": None}
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": event.block_hashes,
                "medium": MEDIUM.get(event.medium, event.medium)}
    assert isinstance(event, AllBlocksCleared), event
    return {"type": "AllBlocksCleared"}


class EventPublisher:
    """Publishes batches of block events on `endpoint` (bound; "tcp://host:*" picks a port) and
    answers replays on `replay_endpoint`; `endpoint` and `replay_endpoint` then say where."""

    def __init__(self, endpoint: str, replay_endpoint: str = "", buffer_steps: int = 10_000, topic: str = "",
                 period_s: float = 0.02) -> None:
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = None
        self.replay_endpoint = ""
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._topic = topic.encode()
        self._period_s = period_s
        self._queued: list[Event] = []
        self._queued_lock = threading.Lock()
        self._sent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: list[Event]) -> None:
        """Queues events (the store's listener: called under the store's lock, so it only queues)."""
        with self._queued_lock:
            self._queued.extend(events)

    def close(self) -> None:
        """Sends what is queued, then closes the sockets."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            stopping = self._stop.is_set()
            # The poll is the period's wait: a replay request is answered at once.
            if self._replay is not None and dict(poller.poll(0 if stopping else self._period_s * 1000)):
                self._answer_replay()
            elif self._replay is None and not stopping:
                self._stop.wait(self._period_s)
            try:
                self._send_queued()
            except zmq.ZMQError as e:  # the socket is closing, or the peer's buffer is full (PUB drops)
                log.warning("publishing block events failed: %s", e)
            if stopping:
                return

    def _send_queued(self) -> None:
        with self._queued_lock:
            events, self._queued = self._queued, []
        if not events:
            return
        payload = vllm_batch(coalesce(events))
        seq = self._next_seq
        self._next_seq += 1
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._sent.append((seq, payload))

    def _answer_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("a replay request of %d frames is not (identity, empty, 8-byte sequence): ignored", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._sent):
            if seq >= first:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
