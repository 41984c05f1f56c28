"""The controller actor: one per cluster, named, restartable.

It places the index shards (cluster/shards.py: the cluster index, key -> holders, split by key
hash; they outlive a controller restart, as node actors do), tracks membership from Ray (a dead
node's entries go as soon as Ray declares it dead; a new node gets a node actor), answers
cluster-wide lookups (where, longest prefix, the node holding most of a prompt for KV-aware
routing) by asking every shard at once and combining (cluster/lookups.py; clients ask the shards
directly the same way), and aggregates stats. Leases are not its business: they are holds on the
blocks' owner (cluster/node.py). It holds no index itself:
after a restart it finds the shards again, and a node is ready once every shard has its share.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvstore.cluster import residency, shardmap
from kvstore.cluster.lookups import IndexReader
from kvstore.cluster.node import CONTROLLER_NAME, NodeActor, node_actor_name
from kvstore.cluster.shardfeed import split_by_shard
from kvstore.cluster.shards import IndexShardActor
from kvstore.config import load_config
from kvstore.events import decode_batch, encode_batch

log = logging.getLogger(__name__)

MEMBERSHIP_PERIOD_S = 0.5
LOOKUP_TIMEOUT_S = 5.0  # a shard slower than this counts as knowing nothing (answers get shorter)
# Node actors' liveness: each membership round sends every registered node actor a cheap call
# (one at a time per actor, never waited on). Only Ray saying the actor is dead (its process is
# gone), twice in a row, counts as a crash; a call unanswered for PING_SLOW_S only makes the node
# "slow" (logged, in stats): a slow node actor is never dropped nor killed.
PING_SLOW_S = 10.0
DEATH_CONFIRMATIONS = 2


class ControllerService:
    def __init__(self, namespace: str, token: str, node_overrides: dict) -> None:
        self._namespace = namespace
        self._token = token
        self._node_overrides = node_overrides
        self._lock = threading.RLock()
        self._shards = self._place_shards(load_config(os.environ.get("KVSTORE_CONFIG") or None,
                                                      **node_overrides).index_shards)
        self._index = IndexReader(
            lambda shard, requests: ray.get(self._shards[shard].batch.remote(requests), timeout=LOOKUP_TIMEOUT_S),
            len(self._shards), LOOKUP_TIMEOUT_S)
        self._nodes: dict[str, dict] = {}  # node id -> info (address, shm_name, ...) of a registered node
        self._synced: set[str] = set()  # nodes whose full content every shard has (see _refresh_synced)
        self._actors: dict[str, object] = {}
        self._starting: dict[str, object] = {}  # node id -> ObjectRef of its info()
        self._dropped_nodes = 0
        self._dropped_in_shards: set[str] = set()  # dead nodes every shard has been told to drop
        # Crashed node actors on live Ray nodes (see _check_actors): node id -> the shards' acks of
        # "drop its entries"; a new node actor is made there once every shard has acknowledged.
        self._clearing: dict[str, list] = {}
        self._pings: dict[str, tuple] = {}  # node id -> (ObjectRef of a liveness call, when sent)
        self._ping_failures: dict[str, int] = {}  # node id -> consecutive "actor died" answers
        self._slow: set[str] = set()  # nodes whose liveness call has gone unanswered for PING_SLOW_S
        self._respawning: set[str] = set()  # nodes whose crashed actor is being replaced
        self._resyncing: dict[str, object] = {}  # such a node's new actor -> its sync(): not synced before
        self._restarted_actors = 0
        # Verified restores (connectors/verify.py): per (node id, medium) checks and mismatches,
        # and the sources some connector quarantined. Counters only: lost on a restart.
        self._verify_counts: dict[tuple[str, str], dict[str, int]] = {}
        self._quarantined: dict[tuple[str, str], dict] = {}
        self._engines = residency.Engines()  # engines reporting their HBM residency
        self._resend_residency: set[str] = set()  # engines some shard lacks the reports of (see _check_residency)
        self._stopping = threading.Event()
        self._membership = threading.Thread(target=self._watch_membership, name="kvstore-membership", daemon=True)
        self._membership.start()

    # -- the index shards ---------------------------------------------------------------------

    def _place_shards(self, configured: int) -> list:
        """The shards of a previous controller, or `configured` new ones (0: by cluster size),
        spread over the live nodes (soft affinity: Ray restarts one elsewhere if its node dies)."""
        count = self._existing_shard_count() or configured or \
            shardmap.default_shard_count(sum(n["Alive"] for n in ray.nodes()))
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        shards = []
        for shard in range(count):
            shards.append(IndexShardActor.options(
                name=shardmap.shard_actor_name(shard), namespace=self._namespace, get_if_exists=True,
                lifetime="detached",
                scheduling_strategy=NodeAffinitySchedulingStrategy(alive[shard % len(alive)], soft=True),
            ).remote(shard, count, self._namespace))
        log.info("index: %d shards", count)
        return shards

    def _existing_shard_count(self) -> int | None:
        """The count the shards of an earlier controller were made with (asking shard 0, or
        shard 1 if 0 is gone for good); None if there are none."""
        for shard in (0, 1):
            try:
                actor = ray.get_actor(shardmap.shard_actor_name(shard), namespace=self._namespace)
            except ValueError:
                continue
            return int(ray.get(actor.describe.remote(), timeout=60)["count"])
        return None

    def index_shards(self) -> int:
        return len(self._shards)

    def report_events(self, node_id: str, payload: bytes) -> None:
        """Applies a batch of a node's events outside the nodes' own streams to the shards
        (nodes feed the shards directly: cluster/shardfeed.py). Events of a node already
        declared dead are ignored."""
        _, events = decode_batch(payload)
        with self._lock:
            if node_id not in self._nodes and node_id not in self._starting and node_id not in self._actors:
                return  # a node already declared dead
        routed: dict[int, list] = {}
        for shard, event in split_by_shard(events, len(self._shards)):
            routed.setdefault(shard, []).append(event)
        ray.get([self._shards[shard].apply_events.remote(node_id, encode_batch(shard_events))
                 for shard, shard_events in routed.items()], timeout=30)

    # -- lookups -------------------------------------------------------------------------------

    def locate(self, keys: list[bytes]) -> list[list[tuple[str, str]]]:
        """Per key, the (node id, medium) pairs holding it, the fastest medium first."""
        return self._index.locate(keys)

    def longest_prefix(self, keys: list[bytes]) -> int:
        """Leading keys present somewhere in the cluster."""
        return self._index.longest_prefix(keys)

    def prefix_by_node(self, keys: list[bytes]) -> dict[str, int]:
        """Per registered node, how many leading keys of the prompt it holds itself."""
        with self._lock:
            nodes = list(self._nodes)
        return self._index.prefix_by_node(keys, nodes)

    def best_node(self, keys: list[bytes]) -> dict:
        """The node holding the longest prefix of the prompt, in its store or in the HBM of an
        engine on it (cluster/residency.py: an HBM prefix wins a tie; then the lowest node id)."""
        with self._lock:
            node_of = self._engines.node_of()
        per_node = self.prefix_by_node(keys)
        per_engine = self._index.hbm_prefix_by_engine(keys, list(node_of)) if node_of and keys else {}
        return residency.best_node(per_node, per_engine, node_of)

    def report_residency(self, engine_id: str, node_id: str, stored: list[bytes], removed: list[bytes],
                         cleared: bool = False) -> dict:
        """An engine's connector: these prompt blocks entered (left) the engine's HBM; with
        `cleared`, forget its earlier ones first (the report holds all it has). Also its
        heartbeat (every HEARTBEAT_S, maybe with no blocks). Returns {"known_node": False} if
        `node_id` is not a node of the cluster (ignored); "resend": True when some shard lacks
        the engine's earlier reports (it restarted): the engine then reports all it holds, cleared."""
        with self._lock:
            if node_id not in self._nodes:
                return {"known_node": False, "resend": False}
            self._engines.heard(engine_id, node_id)
            resend = engine_id in self._resend_residency and not cleared
            if cleared:
                self._resend_residency.discard(engine_id)
        stored_parts = {p.shard: p.keys for p in shardmap.split(stored, len(self._shards))} if stored else {}
        removed_parts = {p.shard: p.keys for p in shardmap.split(removed, len(self._shards))} if removed else {}
        shards = set(range(len(self._shards))) if cleared else stored_parts.keys() | removed_parts.keys()
        ray.get([self._shards[s].report_residency.remote(engine_id, stored_parts.get(s, b""), removed_parts.get(s, b""),
                                                         cleared) for s in shards], timeout=30)
        return {"known_node": True, "resend": resend}

    def delete(self, keys: list[bytes]) -> int:
        targets: dict[str, list[bytes]] = {}
        for key, holders in zip(keys, self.locate(keys)):
            for node_id, _ in holders:
                targets.setdefault(node_id, []).append(key)
        with self._lock:
            actors = {n: self._actors[n] for n in targets if n in self._actors}
        refs = [actors[n].delete.remote(targets[n]) for n in actors]
        deleted = sum(ray.get(refs, timeout=30)) if refs else 0
        # Out of the index now, not when the nodes' BlockRemoved events arrive.
        forgets = []
        for node_id, node_keys in targets.items():
            for part in shardmap.split(node_keys, len(self._shards)):
                forgets.append(self._shards[part.shard].forget.remote(node_id, part.keys))
        ray.get(forgets, timeout=30)
        return deleted

    # -- membership ----------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        with self._lock:
            return [dict(info) for info in self._nodes.values()]

    def wait_ready(self, min_nodes: int = 1, timeout_s: float = 60.0) -> list[dict]:
        """Blocks until at least min_nodes nodes are registered and every shard has their
        content (lookups are whole only from then on)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._refresh_synced()
            with self._lock:
                ready = [dict(info) for node_id, info in self._nodes.items() if node_id in self._synced]
            if len(ready) >= min_nodes:
                return ready
            time.sleep(0.05)
        raise TimeoutError(f"only {len(ready)} of {min_nodes} kvstore nodes were ready in {timeout_s} s")

    def token(self) -> str:
        return self._token

    def _refresh_synced(self) -> None:
        """Nodes every shard has had a whole snapshot from (the shards keep this across a
        controller restart)."""
        try:
            per_shard = ray.get([shard.synced_nodes.remote() for shard in self._shards], timeout=LOOKUP_TIMEOUT_S)
        except Exception as e:  # a shard is restarting: its nodes are not synced there yet anyway
            log.info("index shards' sync state unavailable (%s)", type(e).__name__)
            return
        synced = set.intersection(*(set(nodes) for nodes in per_shard)) if per_shard else set()
        with self._lock:
            self._synced = (synced & self._nodes.keys()) - self._resyncing.keys()

    def _watch_membership(self) -> None:
        while not self._stopping.wait(MEMBERSHIP_PERIOD_S):
            try:
                self._sync_membership()
            except Exception:
                log.exception("membership check failed; retrying")

    def _check_residency(self) -> None:
        """Finds the engines whose residency some shard lacks (it restarted, or forgot an engine
        gone silent that reports again): their next report is answered "resend". An engine whose
        resend lands while this runs may be asked once more: a resend replaces, never adds."""
        with self._lock:
            heard = set(self._engines.node_of())
        if not heard:
            return
        try:
            per_shard = ray.get([shard.whole_engines.remote() for shard in self._shards], timeout=LOOKUP_TIMEOUT_S)
        except Exception as e:  # a shard is restarting: asked again next round
            log.info("index shards' residency state unavailable (%s)", type(e).__name__)
            return
        whole = set.intersection(*(set(engines) for engines in per_shard))
        with self._lock:
            self._resend_residency = heard - whole

    def _forget_node(self, node_id: str) -> None:
        """This controller's state of a node whose actor is gone (its Ray node died, or the actor
        crashed). The caller holds the lock and tells the shards."""
        self._nodes.pop(node_id, None)
        self._synced.discard(node_id)
        self._actors.pop(node_id, None)
        self._starting.pop(node_id, None)
        self._pings.pop(node_id, None)
        self._ping_failures.pop(node_id, None)
        self._slow.discard(node_id)
        self._resyncing.pop(node_id, None)
        self._dropped_nodes += 1

    def _sync_membership(self) -> None:
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        # Every node Ray has declared dead, not only those this controller knew: one that died
        # with the previous controller (the same crash) still has entries in the shards.
        dead = {n["NodeID"] for n in nodes if not n["Alive"]}
        with self._lock:
            for node_id in [n for n in {*self._nodes, *self._actors, *self._starting, *self._clearing}
                            if n not in alive]:
                log.warning("node %s is dead; dropping its blocks from the index", node_id[:12])
                dead.add(node_id)
                if self._clearing.pop(node_id, None) is None:  # else forgotten already, when its actor died
                    self._forget_node(node_id)
                self._respawning.discard(node_id)
        with self._lock:
            silent = self._engines.expired() + self._engines.on_nodes(dead)
        if silent:
            log.info("forgetting the HBM residency of %d engines not heard from: %s", len(silent), silent[:4])
            ray.wait([shard.forget_engines.remote(silent) for shard in self._shards], num_returns=len(self._shards),
                     timeout=10)
        self._check_residency()
        if dead - self._dropped_in_shards:  # every shard at once; one restarting rebuilds from live nodes only
            refs = [shard.drop_nodes.remote(sorted(dead)) for shard in self._shards]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            if len(done) == len(refs):  # else told again next round
                self._dropped_in_shards |= dead
        self._check_actors()
        with self._lock:
            for node_id in alive - self._actors.keys() - self._clearing.keys():
                actor = NodeActor.options(
                    name=node_actor_name(node_id), namespace=self._namespace, get_if_exists=True,
                    lifetime="detached", max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(node_id, self._namespace, self._token, self._node_overrides)
                self._actors[node_id] = actor
                self._starting[node_id] = actor.info.remote()
            starting = dict(self._starting)
        if not starting:
            return
        ready, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)
        for node_id, ref in starting.items():
            if ref not in ready:
                continue
            try:
                info = ray.get(ref)
            except Exception as e:
                log.error("node actor on %s failed to start: %s", node_id[:12], e)
                with self._lock:
                    self._starting.pop(node_id, None)
                    self._actors.pop(node_id, None)  # tried again next round
                continue
            with self._lock:  # its content reaches the shards on its own (its feed starts with a snapshot)
                self._starting.pop(node_id, None)
                self._nodes[node_id] = info
                if node_id in self._respawning:
                    self._respawning.discard(node_id)
                    # The shards may still count the dead actor's stream as synced until the new
                    # one's snapshot reaches them: not ready before its sync() returns.
                    self._resyncing[node_id] = self._actors[node_id].sync.remote()

    def _check_actors(self) -> None:
        """Finds node actors that crashed while their Ray node lives (killed, out of memory, a
        segfault): their entries leave every shard at once, and a new node actor is made on that
        node once every shard has acknowledged (it adopts the NVMe file by the node's stable
        name: the dead process's lock went with it). Never blocks on a slow actor."""
        now = time.monotonic()
        with self._lock:
            registered = {n: self._actors[n] for n in self._nodes if n in self._actors}
            for node_id, actor in registered.items():
                if node_id not in self._pings:
                    self._pings[node_id] = (actor.info.remote(), now)
            pings = dict(self._pings)
            resyncing = dict(self._resyncing)
        refs = [ref for ref, _ in pings.values()] + list(resyncing.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        crashed = []
        for node_id, (ref, sent) in pings.items():
            if ref not in ready:
                if now - sent >= PING_SLOW_S and node_id not in self._slow:
                    log.warning("node actor on %s has not answered for %.0f s; it is slow, not dropped",
                                node_id[:12], now - sent)
                    self._slow.add(node_id)
                continue
            with self._lock:
                if self._pings.get(node_id, (None,))[0] is ref:
                    del self._pings[node_id]
            self._slow.discard(node_id)
            try:
                ray.get(ref)
                self._ping_failures.pop(node_id, None)
            except ray.exceptions.ActorUnavailableError:  # restarting or unreachable for now: not dead
                self._ping_failures.pop(node_id, None)
            except ray.exceptions.RayActorError as e:
                failures = self._ping_failures[node_id] = self._ping_failures.get(node_id, 0) + 1
                if failures >= DEATH_CONFIRMATIONS:
                    log.warning("node actor on %s died (%s); dropping its blocks from the index and starting "
                                "another", node_id[:12], type(e).__name__)
                    crashed.append(node_id)
            except Exception as e:  # anything else: an answer of some kind, so alive
                log.info("node actor on %s: liveness call failed: %s", node_id[:12], e)
                self._ping_failures.pop(node_id, None)
        with self._lock:
            for node_id in crashed:
                self._forget_node(node_id)
                self._clearing[node_id] = []
                self._respawning.add(node_id)
                self._restarted_actors += 1
            for node_id, ref in resyncing.items():
                if ref in ready and self._resyncing.get(node_id) is ref:
                    del self._resyncing[node_id]
            clearing = dict(self._clearing)
        if not clearing:
            return
        # Each shard drops the node's entries and its actor's stream (late chunks of it would
        # bring entries back), without drop_nodes' "dead for good": the Ray node id lives on, and
        # the new actor's stream must count.
        for node_id, refs in clearing.items():
            if not refs:
                refs = [shard.clear_node.remote(node_id) for shard in self._shards]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(done) < len(refs):
                with self._lock:
                    if node_id in self._clearing:
                        self._clearing[node_id] = refs
                continue
            try:
                ray.get(refs)
            except Exception as e:  # a shard restarting: told again next round
                log.info("index shards not yet told that %s's actor died: %s", node_id[:12], e)
                with self._lock:
                    if node_id in self._clearing:
                        self._clearing[node_id] = []
                continue
            with self._lock:
                self._clearing.pop(node_id, None)  # the next round makes its new node actor

    # -- verified restores ---------------------------------------------------------------------

    def report_verification(self, reporter: str, sources: list[dict]) -> None:
        """A connector checked a load against a recompute (connectors/verify.py). Per source it
        read from: {"node_id", "medium", "checks", "mismatches", "blocks", "keys" (hex of the
        blocks that did not match), "detail"}. A source with a mismatch joins the quarantine
        list (the reporter already quarantined it for its own loads). Returns nothing."""
        now = time.time()
        with self._lock:
            for entry in sources:
                source = (str(entry.get("node_id", "?")), str(entry.get("medium", "?")))
                counts = self._verify_counts.setdefault(source, {"checks": 0, "mismatches": 0, "checked_blocks": 0,
                                                                 "mismatched_blocks": 0})
                keys = [str(k) for k in entry.get("keys", [])]
                counts["checks"] += int(entry.get("checks", 1))
                counts["mismatches"] += int(entry.get("mismatches", 0))
                counts["checked_blocks"] += int(entry.get("blocks", 0))
                counts["mismatched_blocks"] += len(keys)
                if entry.get("mismatches"):
                    q = self._quarantined.setdefault(source, {"node_id": source[0], "medium": source[1], "since": now,
                                                              "reporters": [], "mismatched_blocks": 0, "keys": []})
                    q["last"] = now
                    q["mismatched_blocks"] += len(keys)
                    q["keys"] = (q["keys"] + keys)[-16:]  # the latest few, for the log search
                    q["detail"] = str(entry.get("detail", ""))[:300]
                    if reporter not in q["reporters"] and len(q["reporters"]) < 16:
                        q["reporters"].append(reporter)
                    log.error("verification: %d blocks from node %s medium %s did not match a recompute (reported "
                              "by %s): %s", len(keys), source[0][:12], source[1], reporter[:12], ", ".join(keys[:4]))

    def _verification_stats(self) -> dict:
        counts = self._verify_counts.values()
        return {"checks": sum(c["checks"] for c in counts), "mismatches": sum(c["mismatches"] for c in counts),
                "sources": [{"node_id": n, "medium": m, **c} for (n, m), c in sorted(self._verify_counts.items())],
                "quarantined": [dict(q) for _, q in sorted(self._quarantined.items())]}

    # -- stats ---------------------------------------------------------------------------------

    def stats(self, timeout_s: float = 10.0) -> dict:
        with self._lock:
            actors = dict(self._actors)
            summary = {"nodes_registered": len(self._nodes), "nodes_dropped": self._dropped_nodes,
                       "node_actors_restarted": self._restarted_actors, "nodes_slow": sorted(self._slow),
                       "verification": self._verification_stats()}
        refs = {node_id: actor.stats.remote() for node_id, actor in actors.items()}
        shard_refs = [shard.stats.remote() for shard in self._shards]
        shards = []
        for shard, ref in enumerate(shard_refs):
            try:
                shards.append(ray.get(ref, timeout=timeout_s))
            except Exception as e:
                shards.append({"shard": shard, "error": f"{type(e).__name__}: {e}"[:300]})
        summary["index_keys"] = sum(s.get("keys", 0) for s in shards)
        summary["index"] = {"shards": shards, "bytes": sum(s.get("bytes", 0) for s in shards)}
        nodes = {}
        for node_id, ref in refs.items():
            try:
                nodes[node_id] = ray.get(ref, timeout=timeout_s)
            except Exception as e:
                nodes[node_id] = {"node_id": node_id, "error": f"{type(e).__name__}: {e}"[:300]}
        return {**summary, "nodes": nodes}

    def shutdown_nodes(self) -> None:
        """Stops every node actor and index shard (they are detached: they outlive a controller
        restart)."""
        self._stopping.set()
        self._index.stop()
        with self._lock:
            actors = list(self._actors.values())
        for shard in self._shards:
            ray.kill(shard, no_restart=True)
        # All at once, so one dead node costs one timeout, not one each.
        ray.wait([actor.shutdown.remote() for actor in actors], num_returns=len(actors), timeout=15)
        for actor in actors:
            ray.kill(actor)


# Calls in flight during a restart are retried (they are idempotent).
ControllerActor = ray.remote(num_cpus=0, max_concurrency=16, max_restarts=-1, max_task_retries=-1)(ControllerService)
__all__ = ["ControllerActor", "ControllerService", "CONTROLLER_NAME"]
