"""An index shard: one share of the cluster index (cluster/index.py), fed by the nodes.

Each node keeps one stream of event chunks to each shard (cluster/shardfeed.py). A stream has
an id and numbered chunks; it starts with a snapshot of the node's share (AllBlocksCleared, then
its blocks; the chunk that ends it is marked `synced`) and goes on with live events. The shard
applies chunk n only after chunk n-1: a chunk sent again after a lost reply is acknowledged, not
applied twice, and a chunk of a stream the shard does not know (it restarted since) is answered
"resync", so that node starts a new stream from a snapshot of this shard's share only.

After a (re)start the shard is empty and asks every registered node for its share. Lookups
answer from what has arrived: fewer holders and shorter prefixes while it rebuilds, never a node
that does not hold a key. The controller places the shards (named, detached, restarted by Ray),
tells them when a node dies, and fans lookups out to them (cluster/shardmap.py).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import ray

from kvstore.cluster.index import CompactIndex, keys_array
from kvstore.cluster.node import CONTROLLER_NAME, node_actor_name
from kvstore.cluster.shardfeed import DROPPED, OK, RESYNC
from kvstore.errors import KVStoreError
from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, Event, decode_batch

log = logging.getLogger(__name__)

LOOKUPS = ("first_missing", "prefix_by_node", "locate", "hbm_prefix_by_engine")  # what `batch` answers
ENDED_STREAMS_KEPT = 8  # per node: the streams of its last crashed actors


class IndexShard:
    def __init__(self, shard: int, count: int, namespace: str | None = None) -> None:
        """Shard `shard` of `count`. With a Ray `namespace` (the actor), it asks the nodes
        registered there for its share; without (in-process use), it waits to be fed."""
        self.shard, self.count = shard, count
        self._index = CompactIndex()
        self._hbm = CompactIndex()  # engines' HBM residency (cluster/residency.py): holders are engine ids
        self._hbm_whole: set[str] = set()  # engines whose whole residency this shard has (a cleared report since it started)
        self._lock = threading.Lock()
        self._streams: dict[str, list] = {}  # node id -> [stream id, number of the next chunk]
        self._synced: set[str] = set()  # nodes whose current stream's snapshot has been applied
        self._dropped: set[str] = set()  # nodes the controller declared dead: late chunks are ignored
        self._ended: dict[str, list[str]] = {}  # node id -> streams of its crashed actors: late chunks are ignored
        self._counters = {"chunks": 0, "duplicates": 0, "resyncs_asked": 0, "streams": 0, "key_events": 0}
        if namespace is not None:
            threading.Thread(target=self._ask_for_share, args=(namespace,), name="kvstore-shard-rebuild",
                             daemon=True).start()

    # -- from the nodes ----------------------------------------------------------------------

    def apply(self, node_id: str, stream: str, seq: int, payload: bytes, synced: bool = False) -> str:
        """Chunk `seq` of a node's stream: OK (applied, now or before), RESYNC (the shard does not
        know that stream, or missed a chunk: start a new one) or DROPPED (the node is dead)."""
        _, events = decode_batch(payload)
        with self._lock:
            if node_id in self._dropped or stream in self._ended.get(node_id, ()):
                return DROPPED
            state = self._streams.get(node_id)
            if state is None or state[0] != stream:
                if seq != 0:
                    self._counters["resyncs_asked"] += 1
                    return RESYNC
                state = self._streams[node_id] = [stream, 0]
                self._synced.discard(node_id)
                self._counters["streams"] += 1
            if seq < state[1]:
                self._counters["duplicates"] += 1
                return OK
            if seq > state[1]:
                del self._streams[node_id]
                self._counters["resyncs_asked"] += 1
                return RESYNC
            self._apply(node_id, events)
            state[1] += 1
            if synced:
                self._synced.add(node_id)
            return OK

    def apply_events(self, node_id: str, payload: bytes) -> None:
        """Events outside any stream (the controller's report_events, for older senders)."""
        _, events = decode_batch(payload)
        with self._lock:
            if node_id not in self._dropped:
                self._apply(node_id, events)

    def _apply(self, node_id: str, events: list[Event]) -> None:
        self._counters["chunks"] += 1
        for kind, medium, keys in _runs(events):
            self._counters["key_events"] += len(keys)
            if kind is BlockStored:
                self._index.add(node_id, keys, medium)
            elif kind is BlockRemoved:
                self._index.remove(node_id, keys, medium)
            else:  # AllBlocksCleared: a snapshot starts (or the node was cleared)
                self._index.drop_node(node_id)

    # -- from the controller -----------------------------------------------------------------

    def forget(self, node_id: str, keys: bytes) -> None:
        """node_id deleted these keys (before its own BlockRemoved events arrive)."""
        with self._lock:
            self._index.remove(node_id, keys_array(keys))

    def clear_node(self, node_id: str) -> int:
        """The node's actor crashed (its Ray node lives on): its entries go, and so does its
        stream, whose chunks still in flight are ignored from now on (they would bring back
        entries of blocks that died with that actor); the new actor's stream counts. Returns how
        many entries went."""
        with self._lock:
            state = self._streams.pop(node_id, None)
            if state is not None:
                ended = self._ended.setdefault(node_id, [])
                ended.append(state[0])
                del ended[:-ENDED_STREAMS_KEPT]
            self._synced.discard(node_id)
            return self._index.drop_node(node_id)

    def drop_nodes(self, node_ids: list[str]) -> int:
        """These nodes are dead: their entries go, and anything they still send is ignored.
        Returns how many entries went."""
        with self._lock:
            dropped = 0
            for node_id in node_ids:
                self._dropped.add(node_id)
                self._streams.pop(node_id, None)
                self._synced.discard(node_id)
                dropped += self._index.drop_node(node_id)
            return dropped

    # -- from engines, through the controller (cluster/residency.py) ---------------------------

    def report_residency(self, engine_id: str, stored: bytes, removed: bytes, cleared: bool = False) -> None:
        """An engine's blocks now in its HBM (`stored`) and gone from it (`removed`), after
        forgetting all of its earlier ones if `cleared` (a report of all it holds)."""
        with self._lock:
            if cleared:
                self._hbm.drop_node(engine_id)
                self._hbm_whole.add(engine_id)
            if removed:
                self._hbm.remove(engine_id, keys_array(removed))
            if stored:
                self._hbm.add(engine_id, keys_array(stored), "GPU")

    def forget_engines(self, engine_ids: list[str]) -> None:
        with self._lock:
            for engine_id in engine_ids:
                self._hbm.drop_node(engine_id)
                self._hbm_whole.discard(engine_id)

    def whole_engines(self) -> list[str]:
        """Engines whose whole residency this shard has: any other must send all of it again
        (this shard restarted, or forgot it while it was silent)."""
        with self._lock:
            return sorted(self._hbm_whole)

    def synced_nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._synced)

    def describe(self) -> dict:
        return {"shard": self.shard, "count": self.count}

    def stats(self) -> dict:
        with self._lock:
            return {"shard": self.shard, "keys": len(self._index), "bytes": self._index.nbytes(),
                    "hbm_keys": len(self._hbm),
                    "streams_open": len(self._streams), "synced_nodes": len(self._synced), **self._counters}

    # -- lookups: keys are one buffer of concatenated 16-byte keys, in prompt order ------------

    def first_missing(self, keys: bytes) -> int:
        with self._lock:
            return self._index.first_missing(keys_array(keys))

    def prefix_by_node(self, keys: bytes) -> dict[str, int]:
        with self._lock:
            return self._index.prefix_by_node(keys_array(keys))

    def locate(self, keys: bytes) -> list[list[tuple[str, str]]]:
        with self._lock:
            return self._index.locate(keys_array(keys))

    def hbm_prefix_by_engine(self, keys: bytes) -> dict[str, int]:
        with self._lock:
            return self._hbm.prefix_by_node(keys_array(keys))

    def batch(self, requests: list[tuple[str, bytes]]) -> list:
        """Several lookups (method, keys) in one call (cluster/lookups.py), answered in order."""
        for method, _ in requests:
            if method not in LOOKUPS:
                raise KVStoreError(f"lookup {method!r} is not one of {LOOKUPS}")
        rows = [keys_array(keys) for _, keys in requests]
        with self._lock:
            return [self._hbm.prefix_by_node(keys) if method == "hbm_prefix_by_engine"
                    else getattr(self._index, method)(keys) for (method, _), keys in zip(requests, rows)]

    # -- rebuild -----------------------------------------------------------------------------

    def _ask_for_share(self, namespace: str) -> None:
        """Asks every registered node to send this shard its share again (after a restart the
        shard is empty; at the first start there is usually no node yet)."""
        delay = 0.1
        while True:
            try:
                controller = ray.get_actor(CONTROLLER_NAME, namespace=namespace)
                nodes = ray.get(controller.nodes.remote(), timeout=30)
                break
            except Exception as e:  # the controller is (re)starting: it will be back
                log.info("shard %d: controller not reachable yet (%s)", self.shard, type(e).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        for info in nodes:
            try:
                ray.get_actor(node_actor_name(info["node_id"]), namespace=namespace).resync_shard.remote(self.shard)
            except ValueError:  # that node actor is gone: its entries are not wanted anyway
                pass


def _runs(events: list[Event]):
    """(kind, medium, keys) for each run of consecutive events of one kind and medium: one
    vectorized update per run, however many small events the store emitted."""
    kind = medium = None
    keys: list[bytes] = []
    for event in events:
        if isinstance(event, AllBlocksCleared):
            if keys:
                yield kind, medium, keys_array(keys)
                keys = []
            yield AllBlocksCleared, None, _NO_KEYS
            continue
        if keys and (type(event), event.medium) != (kind, medium):
            yield kind, medium, keys_array(keys)
            keys = []
        kind, medium = type(event), event.medium
        keys.extend(event.block_hashes)
    if keys:
        yield kind, medium, keys_array(keys)


_NO_KEYS = np.empty((0, 2), np.uint64)


IndexShardActor = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1, max_task_retries=0)(IndexShard)
