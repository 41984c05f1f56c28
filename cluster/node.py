"""The node actor: one per Ray node, pinned there, owning that node's store and data plane.

It owns the node's host (shared memory) and NVMe tiers, serves them over Arrow Flight, lets
processes on the same node read and write the host arena in place (holds with a TTL, so a
client that dies cannot pin blocks forever), and feeds the store's block events to the index
shards in bounded, numbered chunks (cluster/shardfeed.py): a chunk that fails is sent again, and
only a shard that lost this node's stream (it restarted) gets a snapshot, of its share only.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time

import ray

from kvstore.cluster.dataplane import DataPlaneServer
from kvstore.cluster.identity import claim_nvme_dir
from kvstore.cluster.kvevents import EventPublisher
from kvstore.cluster.shardfeed import RayShards, ShardFeed
from kvstore.config import load_config
from kvstore.errors import LeaseError
from kvstore.events import Event
from kvstore.layout import Layout
from kvstore.store import BlockHandle, TieredStore
from kvstore.tenants import Tenants
from kvstore.tls import TLS
from kvstore.tiers.host import remove_stale_arenas

log = logging.getLogger(__name__)

CONTROLLER_NAME = "kvstore-controller"


def node_actor_name(node_id: str) -> str:
    return f"kvstore-node-{node_id}"


@dataclasses.dataclass
class _Hold:
    handles: list[BlockHandle | None]
    expires: float
    writing: bool


@dataclasses.dataclass
class _Grant:
    layout: Layout
    slots: dict[int, int]  # granted slot -> its generation, until bound
    ttl_s: float
    expires: float


class NodeService:
    def __init__(self, node_id: str, namespace: str, token: str, overrides: dict) -> None:
        config = load_config(os.environ.get("KVSTORE_CONFIG") or None, **overrides)
        short = node_id[:12]
        # The NVMe file is found again by the node's stable name, never by Ray's node id (new at
        # every start); the directory is locked for this process's life (see cluster/identity.py).
        self._nvme_claim = claim_nvme_dir(config, {"ray_node_id": node_id}) if config.nvme_tier_bytes else None
        if self._nvme_claim is not None:
            config = dataclasses.replace(config, nvme_path=self._nvme_claim.directory)
        self.config = config
        self.node_id = node_id
        self._namespace = namespace
        remove_stale_arenas(f"{config.shm_prefix}-*-*")  # any node's: node ids change when nodes restart
        # Before the store: its listener feeds these from the start (NVMe blocks found at open).
        self._feed = ShardFeed(node_id, RayShards(namespace), snapshot=lambda: self.store.resync())
        self._publisher = EventPublisher(config.kv_events_endpoint, config.kv_events_replay_endpoint,
                                         config.kv_events_buffer_steps, topic=config.kv_events_topic) \
            if config.kv_events_endpoint else None
        try:
            tenants = Tenants(token, config.tenants_file)  # their quotas bound the store (kvstore/quotas.py)
            self.store = TieredStore.from_config(config, shm_name=f"{config.shm_prefix}-{short}-{os.getpid()}",
                                                 listener=self._on_events, quota_of=tenants.quota)
        except BaseException:
            if self._nvme_claim is not None:
                self._nvme_claim.release()
            raise
        self._holds: dict[str, _Hold] = {}
        self._grants: dict[str, _Grant] = {}  # under _holds_lock, as holds
        self._expired: dict[str, None] = {}  # ids of holds that expired, oldest first
        self._holds_lock = threading.Lock()
        host = config.flight_host or ray.util.get_node_ip_address()
        self.server = DataPlaneServer(self.store, host, config.flight_port, tenants,
                                      config.max_request_bytes,
                                      config.transfer_timeout_s, release_hold=self._release_after_get,
                                      tls=TLS.from_config(config)).start()
        self._feed.resync()  # this node's content, to every shard, as new streams
        self._stopping = threading.Event()
        self._pump = threading.Thread(target=self._pump_events, name="kvstore-events", daemon=True)
        self._pump.start()

    # -- for the controller and clients ------------------------------------------------------

    def info(self) -> dict:
        """The controller (at registration) and clients (to map the arena): where this node serves."""
        host_tier = next((t for t in self.store.tiers if t.name == "host"), None)
        return {"node_id": self.node_id, "address": self.server.address, "tls": self.server.tls, "pid": os.getpid(),
                "shm_name": getattr(host_tier, "shm_name", None), "slot_bytes": self.store.slot_nbytes,
                "size_classes": self.store.classes.describe(),
                "tiers": [t.name for t in self.store.tiers],
                "kv_events": {"endpoint": self._publisher.endpoint, "replay_endpoint": self._publisher.replay_endpoint}
                if self._publisher else None}

    def acquire(self, layout: dict, keys: list[bytes], ttl_s: float | None = None) -> tuple[str, list, list]:
        """Pins blocks in the host arena for a reader on this node:
        (hold id, [slot | None], [the block's checksum | None])."""
        handles = self.store.acquire(Layout.from_dict(layout), keys)
        return (self._hold(handles, ttl_s, writing=False), [None if h is None else h.slot for h in handles],
                [None if h is None else h.checksum for h in handles])

    def reserve(self, layout: dict, keys: list[bytes], parents: list | None = None,
                ttl_s: float | None = None) -> tuple[str, list, list[bool], list]:
        """Reserves arena slots for a writer on this node, then `commit`.

        Returns (hold id, [slot | None], [present already], [slot generation | None]); a None
        slot that is not present found no room. The writer checks that each slot's generation in
        the arena still equals the one returned before every copy into it: if the hold expires
        (see `renew`) its slots are fenced, and a changed generation means "stop writing".
        """
        handles = self.store.reserve(Layout.from_dict(layout), keys, parents)
        present = [h is None and here for h, here in zip(handles, self.store.contains(keys))]
        return (self._hold(handles, ttl_s, writing=True), [None if h is None else h.slot for h in handles], present,
                [None if h is None else h.generation for h in handles])

    def renew(self, hold_id: str, ttl_s: float | None = None) -> float:
        """A long writer (or reader) extends its hold by `ttl_s` from now; returns the new TTL.
        Raises LeaseError if the hold has expired already (its slots may be fenced)."""
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        with self._holds_lock:
            hold = self._holds.get(hold_id)
            if hold is None:
                raise LeaseError(self._unknown_hold(hold_id))
            hold.expires = time.monotonic() + ttl
        return ttl

    def commit(self, hold_id: str, filled: list[bytes] | None = None, checksums: list[int] | None = None,
               wait_index: bool = False) -> int:
        """Makes the hold's blocks visible: all of them, or only `filled` (the rest are aborted),
        with `checksums[i]` for filled[i] where the writer has them (else they are taken here).

        Returns once every process on this node can read them. The controller's index learns
        them with the next event batch (within event_batch_ms), or before this returns with
        `wait_index` (a handoff, whose reader on another node looks them up at once).
        """
        handles = [h for h in self._take(hold_id, writing=True).handles if h is not None]
        sums = None
        if filled is not None:
            done = set(filled)
            self.store.abort([h for h in handles if h.key not in done])
            handles = [h for h in handles if h.key in done]
            if checksums is not None:
                sum_of = dict(zip(filled, checksums))
                sums = [sum_of[h.key] for h in handles]
        committed = self.store.commit(handles, sums)
        if wait_index:
            self._send_events()
        return committed

    def grant(self, layout: dict, n: int, ahead: int = 0,
              ttl_s: float | None = None) -> tuple[str, list[tuple[int, int]], float]:
        """Slots for a writer on this node to fill before naming their keys (`bind`), so its puts
        make no call until the grant runs out: (grant id, [(slot, generation)], ttl). Up to n made
        room for, up to `ahead` more from free slots, never more ahead than a sixteenth of the
        tier. The grant lives ttl_s (default lease_ttl_s) from its last bind; then its unbound slots are fenced:
        a writer checks the slot's generation in the arena before each copy, as for `reserve`."""
        parsed = Layout.from_dict(layout)
        top = self.store.tiers[0]
        ahead = max(0, min(ahead, top.geometry.data_bytes // 16 // self.store.check_layout(parsed)))
        slots = self.store.grant(parsed, n, ahead)
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        grant_id = secrets.token_hex(8)
        with self._holds_lock:
            self._grants[grant_id] = _Grant(parsed, dict(slots), ttl, time.monotonic() + ttl)
        return grant_id, slots, ttl

    def bind(self, grant_id: str, writes: list[tuple[int, bytes, bytes | None]], wait_index: bool = False) -> list[str]:
        """Commits blocks written into a grant's slots: `writes[i]` is (slot, key, parent). Per
        write, as TieredStore.bind says ("stored", "present", "fenced", "rejected"); a slot
        not of this grant (or bound already) is "fenced". Renews the grant. Raises LeaseError if
        the grant expired (its slots were fenced: nothing of these writes becomes visible)."""
        with self._holds_lock:
            grant = self._grants.get(grant_id)
            if grant is None:
                raise LeaseError(self._unknown_hold(grant_id))
            mine = [(slot, grant.slots.pop(slot), key, parent) for slot, key, parent in writes
                    if slot in grant.slots]
            grant.expires = time.monotonic() + grant.ttl_s
            if not grant.slots:
                del self._grants[grant_id]
        outcome = dict(zip((w[0] for w in mine), self.store.bind(grant.layout, mine)))
        if wait_index:
            self._send_events()
        return [outcome.get(slot, "fenced") for slot, _, _ in writes]

    def bind_many(self, binds: list[tuple[str, list[tuple[int, bytes, bytes | None]]]]) -> list[list[str]]:
        """Several `bind`s in one call (a client's queued puts): per bind its outcomes, all
        "fenced" for a grant that expired."""
        out = []
        for grant_id, writes in binds:
            try:
                out.append(self.bind(grant_id, writes))
            except LeaseError as e:
                log.info("%s", e)
                out.append(["fenced"] * len(writes))
        return out

    def ungrant(self, grant_id: str) -> None:
        """A writer that is done (its client closing) gives its unbound slots back."""
        with self._holds_lock:
            grant = self._grants.pop(grant_id, None)
        if grant is not None:
            self.store.ungrant(list(grant.slots.items()))

    def commit_leased(self, hold_id: str, layout: dict, ttl_s: float | None = None) -> tuple[int, str, list[bytes]]:
        """A handoff's end, in one call: commits a write hold (waiting for the index, as its
        reader on another node looks the blocks up at once) and pins the committed blocks for
        ttl_s. Returns (committed, the lease's hold id, the keys it pins)."""
        handles = [h for h in self._take(hold_id, writing=True).handles if h is not None]
        committed = self.store.commit(handles)
        self._send_events()
        pinned = [h for h in self.store.acquire(Layout.from_dict(layout), [h.key for h in handles]) if h is not None]
        return committed, self._hold(pinned, ttl_s, writing=False), [h.key for h in pinned]

    def sync(self) -> None:
        """Returns once the controller has applied every event of this node so far."""
        self._send_events()

    def abort(self, hold_id: str) -> None:
        """A writer that gives up: the hold's reserved slots go back, nothing becomes visible."""
        self.store.abort(self._take(hold_id, writing=True).handles)

    def release(self, hold_id: str) -> None:
        """A reader that is done (or the controller ending a lease): the hold's pins go."""
        self.store.release(self._take(hold_id, writing=False).handles)

    def _release_after_get(self, hold_id: str) -> None:
        """A pull that ends a lease (a handoff's) names its hold: given back once streamed."""
        try:
            self.release(hold_id)
        except LeaseError as e:  # it expired, or was released already: nothing is pinned
            log.info("%s", e)

    def count_directory_reads(self, hits: int, misses: int) -> None:
        """A client on this node reports the gets its arena's directory served (or missed): they
        never reached the store, and its counters (so /metrics) would not know them."""
        self.store.count_reads(hits, misses)

    def drop_corrupt(self, keys: list[bytes]) -> int:
        """A reader on this node found these blocks failing their checksums: they are dropped
        (and counted as corrupt) so no one is served them again."""
        return self.store.drop_corrupt(keys)

    def contains(self, keys: list[bytes]) -> list[bool]:
        """Per key: present on this node."""
        return self.store.contains(keys)

    def delete(self, keys: list[bytes]) -> int:
        """The controller fanning out a delete: removes the blocks here; returns how many."""
        return self.store.delete(keys)

    def clear(self) -> None:
        """Deletes everything on this node (announced as AllBlocksCleared)."""
        self.store.clear()

    def resync(self) -> None:
        """Sends every index shard a snapshot of its share of this node's content."""
        self._feed.resync()

    def resync_shard(self, shard: int) -> None:
        """An index shard that restarted asks for its share again."""
        self._feed.resync({shard})

    def stats(self) -> dict:
        """The controller's stats call: info, the store's counters, the data plane's, open holds."""
        with self._holds_lock:
            holds, grants = len(self._holds), len(self._grants)
        return {**self.info(), "store": self.store.stats(), "dataplane": dict(self.server.counters), "holds": holds,
                "grants": grants,
                "nvme": self._nvme_claim.stats() if self._nvme_claim is not None else None,
                "index_feed": self._feed.stats()}

    def shutdown(self) -> None:
        """The controller stopping the cluster: stops the pump and the server, unlinks the arena."""
        self._stopping.set()
        self._pump.join(timeout=5)
        self.server.shutdown()
        self.store.close()
        if self._publisher is not None:
            self._publisher.close()

    # -- internals ---------------------------------------------------------------------------

    def _hold(self, handles: list, ttl_s: float | None, writing: bool) -> str:
        hold_id = secrets.token_hex(8)
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        with self._holds_lock:
            self._holds[hold_id] = _Hold(handles, time.monotonic() + ttl, writing)
        return hold_id

    def _take(self, hold_id: str, writing: bool) -> _Hold:
        with self._holds_lock:
            hold = self._holds.get(hold_id)
            if hold is None or hold.writing != writing:
                raise LeaseError(self._unknown_hold(hold_id))
            del self._holds[hold_id]
        return hold

    def _unknown_hold(self, hold_id: str) -> str:
        if hold_id in self._expired:
            return (f"hold {hold_id!r} expired (lease_ttl_s={self.config.lease_ttl_s}) before it was given back; "
                    "its slots were fenced and nothing it wrote becomes visible (renew long holds)")
        return f"hold {hold_id!r} is unknown or already given back"

    def _expire_holds(self) -> None:
        now = time.monotonic()
        with self._holds_lock:
            expired = [(k, h) for k, h in self._holds.items() if h.expires < now]
            for k, _ in expired:
                del self._holds[k]
                self._expired[k] = None
            ended = [(k, g) for k, g in self._grants.items() if g.expires < now]
            for k, _ in ended:
                del self._grants[k]
                self._expired[k] = None
            while len(self._expired) > 4096:  # remembered only to say "expired" rather than "unknown"
                del self._expired[next(iter(self._expired))]
        for grant_id, grant in ended:  # a writer that went idle (or died): routine
            log.info("grant %s expired; fencing its %d unbound slots", grant_id, len(grant.slots))
            self.store.fence_granted(list(grant.slots.items()))
        for hold_id, hold in expired:
            log.warning("hold %s expired; giving back %d blocks", hold_id, sum(h is not None for h in hold.handles))
            # A writer may still be copying into its slots: fence them rather than free them.
            (self.store.fence if hold.writing else self.store.release)(hold.handles)
        self.store.reap_fenced()

    def _on_events(self, events: list[Event]) -> None:
        self._feed.enqueue(events)
        if self._publisher is not None:  # routers' feed (cluster/kvevents.py)
            self._publisher.publish(events)

    def _pump_events(self) -> None:
        period = max(self.config.event_batch_ms, 1) / 1000
        while not self._stopping.wait(period):
            self._expire_holds()
            try:
                self._feed.flush()
            except Exception:  # the feed keeps its backlog: the next round tries again
                log.exception("feeding the index shards failed")

    def _send_events(self) -> None:
        """Returns once the index shards have applied every event queued so far (or after the
        feed's timeout, with the rest still queued and retried by the pump)."""
        if not self._feed.drain():
            log.warning("index shards did not take this node's events in time; the pump keeps trying")


NodeActor = ray.remote(num_cpus=0, max_concurrency=16)(NodeService)
