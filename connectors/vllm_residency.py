"""The engine's HBM residency, told to kvstore: which prompt blocks vLLM's prefix cache holds.

With KV events on (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq"}'`)
vLLM publishes its prefix cache's changes over ZMQ: BlockStored / BlockRemoved under vLLM's own
block hashes, and AllBlocksCleared. The connector's scheduler side runs in the process that
publishes them and knows, for every prompt it has seen, both vLLM's block hashes
(`request.block_hashes`) and kvstore's keys. `HBMResidency` subscribes to the engine's feed,
maps the hashes of GPU blocks to TP rank 0's keys (the keys a router looks a prompt up by), and
reports them to the kvstore cluster in batches (`report_residency`), with a heartbeat every
HEARTBEAT_S, so `best_node` can name this engine for a prompt whose prefix is in its HBM
(cluster/residency.py). It keeps what the engine holds, to report it all again when the cluster
answers "resend" (an index shard restarted and lost the reports). Blocks of prompts the
connector never saw (decode tokens, requests that came before it) are not reported: the report
is a routing hint, never a claim of data.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import msgpack
import zmq

from kvstore.cluster.residency import HEARTBEAT_S

log = logging.getLogger("kvstore.connectors.vllm")

MAX_MAPPED = 1 << 18  # vLLM block hashes remembered (the oldest forgotten first)
REPORT_PERIOD_S = 0.2


def events_endpoint(vllm_config) -> str | None:
    """Where to subscribe to this engine's KV events, or None if it publishes none this side
    can follow. vLLM binds its PUB socket to a wildcard (its default, tcp://*:5557), [::] or
    ipc:// endpoint, and connects it to any other (a router's subscriber, which binds): only a
    bound one can have a second subscriber."""
    config = getattr(vllm_config, "kv_events_config", None)
    if config is None or not config.enable_kv_cache_events or config.publisher != "zmq":
        return None
    endpoint = config.endpoint
    rank = vllm_config.parallel_config.data_parallel_rank
    if rank and endpoint.startswith("tcp://"):  # vLLM offsets a data-parallel rank's port by its rank
        from vllm.distributed.kv_events import ZmqEventPublisher

        endpoint = ZmqEventPublisher.offset_endpoint_port(endpoint, rank)
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("tcp://") and ("*" in endpoint or "::" in endpoint):
        return endpoint.replace("*", "127.0.0.1").replace("[::]", "[::1]")
    log.warning("kvstore connector: the engine's KV events go to %s (vLLM connects to it, as to a router's "
                "subscriber): its HBM residency is not reported; publish on a bound endpoint (tcp://*:PORT, "
                "ipc://PATH) to have both", endpoint)
    return None


def _external(block_hash):
    """vLLM's block hash as its events carry it (bytes, or an int with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)."""
    try:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    except ImportError:  # an older vLLM: events carry the hash as it is
        return block_hash
    return maybe_convert_block_hash(block_hash)


class HBMResidency:
    def __init__(self, client, engine_id: str, endpoint: str, topic: str = "") -> None:
        self._client = client
        self.engine_id = engine_id
        self._key_of: collections.OrderedDict = collections.OrderedDict()  # vLLM hash -> kvstore key
        self._resident: dict[bytes, None] = {}  # the keys the engine's HBM holds now (the reader thread's)
        self._lock = threading.Lock()
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.IPV6, 1)  # [::1] as well as 127.0.0.1
        self._sub.connect(endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._stop = threading.Event()
        self.reports = 0  # sent to the cluster (tests and stats)
        self.resends = 0  # of them, everything the engine holds, the cluster having lost it
        self._thread = threading.Thread(target=self._run, name="kvstore-hbm-residency", daemon=True)
        self._thread.start()
        log.info("kvstore connector: reporting engine %s's HBM residency from its KV events at %s", engine_id, endpoint)

    def learn(self, block_hashes, keys: list[bytes]) -> None:
        """A prompt the scheduler saw: vLLM's hash of block i is kvstore's keys[i]."""
        with self._lock:
            for block_hash, key in zip(block_hashes, keys):
                external = _external(block_hash)
                self._key_of[external] = key
                self._key_of.move_to_end(external)
            while len(self._key_of) > MAX_MAPPED:
                self._key_of.popitem(last=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close()

    def _run(self) -> None:
        stored: dict[bytes, None] = {}
        removed: dict[bytes, None] = {}
        cleared = True  # the first report starts afresh (an engine restarted under the same id)
        reported_at = 0.0
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(int(REPORT_PERIOD_S * 1000)):
                while self._sub.poll(0):
                    frames = self._sub.recv_multipart()
                    for event in self._events(frames[-1]):
                        cleared |= self._fold(event, stored, removed)
            now = time.monotonic()
            if (stored or removed or cleared) and now - reported_at >= REPORT_PERIOD_S or now - reported_at >= HEARTBEAT_S:
                try:
                    answer = self._client.report_residency(self.engine_id, list(stored), list(removed), cleared)
                except Exception as e:  # noqa: BLE001 - kept and sent again with the next report
                    log.warning("kvstore connector: reporting HBM residency failed (sent again later): %s", e)
                    reported_at = now
                    continue
                self.reports += 1
                stored.clear()
                removed.clear()
                cleared = False
                reported_at = now
                if answer["resend"]:  # the next report: everything the engine holds, in place of the lost
                    log.info("kvstore connector: the cluster lost engine %s's residency; reporting its %d blocks "
                             "again", self.engine_id, len(self._resident))
                    stored.update(self._resident)
                    cleared = True
                    self.resends += 1
                    reported_at = 0.0

    @staticmethod
    def _events(payload: bytes) -> list:
        """The events of one of vLLM's EventBatch messages ([ts, [event, ...], dp rank]), each a
        map tagged by "type"; an undecodable message is logged and skipped."""
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            return [e for e in batch[1] if isinstance(e, dict)]
        except Exception as e:  # noqa: BLE001
            log.warning("kvstore connector: a KV event message did not decode (%s); skipped", e)
            return []

    def _fold(self, event: dict, stored: dict, removed: dict) -> bool:
        """Folds one event into the pending report; True for AllBlocksCleared (start afresh)."""
        kind = event.get("type")
        if kind == "AllBlocksCleared":
            stored.clear()
            removed.clear()
            self._resident.clear()
            return True
        if event.get("medium") not in (None, "GPU"):
            return False
        with self._lock:
            keys = [self._key_of.get(_hashable(h)) for h in event.get("block_hashes") or ()]
        for key in filter(None, keys):
            if kind == "BlockStored":
                removed.pop(key, None)
                stored[key] = None
                self._resident[key] = None
                if len(self._resident) > MAX_MAPPED:  # one whose removal could not be mapped, likely
                    del self._resident[next(iter(self._resident))]
            elif kind == "BlockRemoved":
                stored.pop(key, None)
                removed[key] = None
                self._resident.pop(key, None)
        return False


def _hashable(block_hash):
    return bytes(block_hash) if isinstance(block_hash, (bytes, bytearray, memoryview)) else block_hash
