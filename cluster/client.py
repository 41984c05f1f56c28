"""`kvstore.connect()`: the cluster's client, the same API as the single-node store plus where-is
and leases.

With no address it starts an embedded local Ray with one node (a laptop, a test, the demo);
with one it joins that cluster. Either way it starts (or finds) the controller, which puts a
node actor on every Ray node. The client then works through its own node: it maps that node's
host arena. A get reads the blocks in it through the arena's directory with no call to anyone
(tiers/directory.py); blocks on the node's NVMe tier take one call to the node actor, which
brings them into the arena. A block held only by other nodes is pulled over Arrow Flight, one
stream per owner, straight into the caller's buffer (and, if `cache_pulled_blocks`, into the
local arena). Owners are remembered (cluster/locations.py); the index shards are asked
(directly, not through the controller) only about keys the client has not seen. A put copies
into slots the node granted this client ahead (cluster/grants.py; a call only when they run
out) and sends the bind that commits them without waiting for it: this client reads its own
writes at once, other processes once the node has run the bind (cluster/commits.py), the index
with the node's next event batch (at once with `wait_index`).

Integrity: a block read from the arena is checked against its checksum as `verify_reads` says,
a pulled block always (kvstore.integrity); a block that fails is a miss. A writer of reserved
slots checks that its hold was not fenced before each copy (`check_hold`), and renews a long
hold (`renew`).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvstore.cluster.commits import PendingCommits
from kvstore.cluster.controller import CONTROLLER_NAME, ControllerActor
from kvstore.cluster.dataplane import Peers
from kvstore.cluster.grants import SlotPool
from kvstore.cluster.leases import Lease, lease_parts
from kvstore.cluster.locations import LocationCache, PeerBreaker
from kvstore.cluster.lookups import IndexReader
from kvstore.cluster.shardmap import shard_actor_name
from kvstore.cluster.pulled import ClusterGetResult, Landing, PulledBlocks
from kvstore.cluster.residency import check_engine_id
from kvstore.cluster.node import node_actor_name
from kvstore.config import Config, load_config
from kvstore.errors import ConfigError, KVStoreError, LeaseError, TransferError
from kvstore.integrity import ReadVerifier, copy_with_checksum
from kvstore.keys import check_keys, check_parents
from kvstore.layout import Layout
from kvstore.payload import Blocks, block_rows
from kvstore.store import PutResult
from kvstore.tiers.host import HostArena
from kvstore.tls import TLS

if TYPE_CHECKING:
    from kvstore.cluster.remote import RemoteClient

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 60.0
LOOKUP_TIMEOUT_S = 5.0  # an index shard slower than this counts as knowing nothing (a shorter answer)
_STREAM_MIN_BYTES = 32 * 1024 * 1024  # a pull is split into streams of at least this much


@dataclasses.dataclass(frozen=True)
class WriteHold:
    hold_id: str
    keys: list[bytes]
    views: list  # per key: a uint8 tensor aliasing its reserved slot, or None
    present: list[bool]  # per key: present already (so not reserved)
    slots: list  # per key: its arena slot, or None
    generations: list  # per key: its slot's generation when reserved (a fence changes it), or None


@dataclasses.dataclass(frozen=True)
class ReadHold:
    hold_id: str
    keys: list[bytes]
    views: list  # per key: a uint8 tensor aliasing its slot, or None (not on this node)
    checksums: list  # per key: the block's checksum, or None


class Client:
    """A process's handle on the cluster (from `connect`); thread-safe for concurrent calls.

    A put is readable by every process on its node when it returns; the cluster's index (so
    lookups and gets on other nodes) has it within `event_batch_ms` plus one controller call, or
    when the put returns with `wait_index=True` (or after `sync()`). Blocks are
    content-addressed: putting a key that exists is a no-op, and bytes under a key never change.
    """

    def __init__(self, controller, config: Config, embedded: bool) -> None:
        self.config = config
        self.embedded = embedded
        self._controller = controller
        self.node_id = ray.get_runtime_context().get_node_id()
        info = self._local_node_info()
        self._node = ray.get_actor(node_actor_name(self.node_id), namespace=config.ray_namespace)
        self._node_actors = {self.node_id: self._node}  # by node id: where leases are taken
        self._arena = HostArena.open(info["shm_name"])
        self._retired_arenas: list[HostArena] = []  # of node actors that died (see _attach_to_node)
        # Without a durable tier, the arena's directory knows every block of this node: a block
        # it does not have is not here, and no call to the node is needed to say so.
        self._node_has_durable_tier = any(t != "host" for t in info["tiers"])
        self._token = ray.get(controller.token.remote(), timeout=RPC_TIMEOUT_S)
        self._tls = TLS.from_config(config)
        if bool(info.get("tls")) != (self._tls is not None):
            raise ConfigError(f"this node's data plane {'serves' if info.get('tls') else 'does not serve'} TLS but this "
                              f"client's settings {'do not' if self._tls is None else 'do'} (tls_cert_file, "
                              "tls_key_file, tls_ca_file): give clients the nodes' TLS settings")
        self._peers = Peers(self._token, config.transfer_timeout_s, self._tls)
        self._addresses: dict[str, str] = {}  # node id -> data-plane address, refreshed when one is unknown
        self._locations = LocationCache()
        self._index = self._index_reader()  # lookups go to the index shards, not through the controller
        self._breaker = PeerBreaker()
        self._streams = ThreadPoolExecutor(4, thread_name_prefix="kvstore-pull")  # one per owner pulled from
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvstore-copy")
        self._verifier = ReadVerifier(config.verify_reads, config.verify_sample_fraction)
        self.corrupt_received = 0  # pulled blocks that arrived failing their checksums
        # Reads served by the arena's directory never reach the node: counted here, reported to
        # it at most once a second (a call per get would cost more than the get).
        self._directory_reads = [0, 0]  # hits, misses
        self._reported_at = time.monotonic()
        self._background: list = []  # commits of blocks cached by earlier gets (see flush)
        # Of puts, not waited for; binds of granted slots queued and sent in batches (cluster/commits.py).
        self._commits = PendingCommits(RPC_TIMEOUT_S, lambda binds: self._node.bind_many.remote(binds))
        self._slots = self._slot_pool()

    def _local_node_info(self) -> dict:
        """Waits until the controller has a node actor running on this Ray node."""
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while time.monotonic() < deadline:
            nodes = ray.get(self._controller.wait_ready.remote(1, RPC_TIMEOUT_S), timeout=RPC_TIMEOUT_S)
            for info in nodes:
                if info["node_id"] == self.node_id:
                    return info
            time.sleep(0.1)
        raise KVStoreError(f"no kvstore node actor came up on this Ray node ({self.node_id[:12]}) "
                           f"in {RPC_TIMEOUT_S} s")

    def _call_node(self, method: str, *args, node_id: str | None = None):
        """A call to a node's actor (this node's by default). If that actor died and the
        controller started another in its place (it restarts a crashed node actor), the client
        finds the new one (for this node, also its arena) and makes the call there once. Holds
        of the dead actor died with it: a call naming one fails as unknown (LeaseError), never
        lands on another's slots."""
        node_id = node_id or self.node_id
        local = node_id == self.node_id
        try:
            return ray.get(getattr(self._node if local else self._node_actor(node_id), method).remote(*args),
                           timeout=RPC_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:
            if local:
                self._attach_to_node()
            else:
                self._node_actors.pop(node_id, None)
            return ray.get(getattr(self._node if local else self._node_actor(node_id), method).remote(*args),
                           timeout=RPC_TIMEOUT_S)

    def _slot_pool(self) -> SlotPool | None:
        """This node's slots granted to this client's puts (cluster/grants.py); None: puts reserve."""
        if not self.config.put_grant_bytes:
            return None
        return SlotPool(lambda layout, n, ahead: self._call_node("grant", layout, n, ahead, self.config.lease_ttl_s),
                        self._arena.generations, self.config.put_grant_bytes)

    def _attach_to_node(self) -> None:
        """Finds this node's (new) node actor by name and maps its arena. The old mapping is
        kept until close: another thread may be reading through it (its bytes stay right: a key's
        bytes never change), and unmapping under it would crash that read."""
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while True:
            try:
                node = ray.get_actor(node_actor_name(self.node_id), namespace=self.config.ray_namespace)
                info = ray.get(node.info.remote(), timeout=10)
                break
            except (ValueError, ray.exceptions.RayError):
                if time.monotonic() > deadline:
                    raise KVStoreError(f"this node's kvstore node actor died and no new one answered within "
                                       f"{RPC_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        log.warning("this node's kvstore node actor was restarted (now pid %s); attaching to it", info["pid"])
        self._retired_arenas.append(self._arena)
        self._arena = HostArena.open(info["shm_name"])
        self._node = self._node_actors[self.node_id] = node
        self._slots = self._slot_pool()  # the dead actor's grants died with it
        self._node_has_durable_tier = any(t != "host" for t in info["tiers"])

    # -- the store's API ---------------------------------------------------------------------

    def reserve(self, layout: Layout, keys: Sequence[bytes], parents: Sequence[bytes | None] | None = None,
                ttl_s: float | None = None) -> "WriteHold":
        """Reserves slots in this node's arena for blocks the caller will write in place.

        `hold.views[i]` is block i's bytes (uint8, block_nbytes) to fill, layer by layer if it
        likes, or None where the block is present already or found no room. Then `commit(hold)`
        (or `abort`); a hold never committed is aborted by the node after `ttl_s`.
        """
        keys = check_keys(keys)
        hold_id, slots, present, generations = self._call_node(
            "reserve", layout.to_dict(), keys, None if parents is None else list(parents), ttl_s)
        arena = self._arena.tensor
        views = [None if slot is None else arena[slot, :layout.block_nbytes] for slot in slots]
        return WriteHold(hold_id, keys, views, present, slots, generations)

    def check_hold(self, hold: "WriteHold") -> None:
        """Raises LeaseError if the hold expired and its slots were fenced. A writer calls it
        before each copy into the hold's views: a fenced slot may already hold another block,
        and the fence's grace period (fence_grace_s) covers one copy started after the check."""
        generations = self._arena.generations
        for key, slot, generation in zip(hold.keys, hold.slots, hold.generations):
            if slot is not None and int(generations[slot]) != generation:
                raise LeaseError(f"hold {hold.hold_id} expired and was fenced (block {key.hex()}, slot {slot}): "
                                 "stop writing; nothing of it becomes visible")

    def renew(self, hold: "WriteHold | ReadHold", ttl_s: float | None = None) -> float:
        """Extends a hold by ttl_s (default lease_ttl_s) from now; LeaseError if it expired."""
        return self._call_node("renew", hold.hold_id, ttl_s)

    def commit(self, hold: "WriteHold", wait_index: bool = False) -> int:
        """Makes a reserved hold's blocks visible (on this node at once; in the cluster's index
        with the node's next event batch, or before returning with `wait_index`); returns how
        many. Raises LeaseError if the hold expired first (nothing of it becomes visible)."""
        return self._call_node("commit", hold.hold_id, None, None, wait_index)

    def commit_leased(self, layout: Layout, hold: "WriteHold", ttl_s: float | None = None) -> tuple[int, Lease]:
        """A handoff's end, in one call to this node: commits the hold (waiting for the index,
        as the reader on another node looks the blocks up at once) and leases the committed
        blocks for ttl_s (default lease_ttl_s). Returns (committed, lease)."""
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        committed, hold_id, pinned = self._call_node("commit_leased", hold.hold_id, layout.to_dict(), ttl)
        return committed, Lease(f"{hold_id}@{self.node_id}", self.node_id, pinned, ttl)

    def sync(self) -> None:
        """Returns once the cluster's index has everything this node stored so far."""
        self._commits.settle()
        self._call_node("sync")

    def abort(self, hold: "WriteHold") -> None:
        self._call_node("abort", hold.hold_id)

    def acquire(self, layout: Layout, keys: Sequence[bytes], ttl_s: float | None = None) -> "ReadHold":
        """Pins blocks held by this node for reading in place: `hold.views[i]` or None (not here).
        Give them back with `release(hold)`; the node does so itself after `ttl_s`."""
        keys = check_keys(keys)
        self._commits.settle(keys)
        hold_id, slots, sums = self._call_node("acquire", layout.to_dict(), keys, ttl_s)
        arena = self._arena.tensor
        return ReadHold(hold_id, keys, [None if slot is None else arena[slot, :layout.block_nbytes] for slot in slots],
                        sums)

    def release(self, hold: "ReadHold") -> None:
        self._node.release.remote(hold.hold_id)

    def put(self, layout: Layout, keys: Sequence[bytes], blocks: Blocks,
            parents: Sequence[bytes | None] | None = None, wait_index: bool = False) -> PutResult:
        """Writes blocks into this node's host arena in place; keys present here are skipped.
        Returns once the bytes are in the arena, with no call to the node actor while this
        client's granted slots last (cluster/grants.py; else one, for more, and when the node has
        no room, this client's queued binds are sent first and it asks again); the bind that makes
        them visible is queued and sent by a thread, batched with other puts' (cluster/commits.py
        says who sees them when: this client at once). With `wait_index`, it returns once the cluster's index has them, and
        its counts are the node's (a block another writer stored first counts as present)."""
        keys = check_keys(keys)
        rows = block_rows(layout, blocks, len(keys))
        if self._slots is None:
            return self._put_reserved(layout, keys, rows, parents, wait_index)
        parent_of = dict(zip(keys, check_parents(parents, len(keys))))  # checked here: the bind is not waited for
        todo: dict[bytes, int] = {}  # key -> its first row, for keys not in this node's arena
        holds = self._arena.directory.holds
        for i, key in enumerate(keys):
            if key not in todo and not holds(key):
                todo[key] = i
        slots = self._slots.take(layout, len(todo))  # generations checked: the copies run within the fence's grace
        if len(slots) < len(todo) and self._commits.settle():
            # The node found no room, maybe because this client's own queued binds hold the
            # arena's slots (an unbound slot is never demoted): once they land, it has room.
            slots += self._slots.take(layout, len(todo) - len(slots))
        arena = self._arena.tensor
        by_grant: dict[str, list[tuple[int, bytes, bytes | None]]] = {}
        try:
            for (key, i), granted in zip(todo.items(), slots):
                arena[granted.slot, :layout.block_nbytes].copy_(rows[i])
                by_grant.setdefault(granted.grant_id, []).append((granted.slot, key, parent_of.get(key)))
        except BaseException:
            self._slots.put_back(layout, slots)  # nothing was bound: a later put rewrites them whole
            raise
        self._slots.binding(set(by_grant))
        rejected = list(todo)[len(slots):]
        if not wait_index:
            for grant_id, writes in by_grant.items():
                self._commits.defer([key for _, key, _ in writes], grant_id, writes)
            return PutResult(stored=len(slots), present=len(keys) - len(todo), rejected=rejected)
        binds = {grant_id: self._node.bind.remote(grant_id, writes, True) for grant_id, writes in by_grant.items()}
        outcome: dict[bytes, str] = {}
        for grant_id, ref in binds.items():
            outcome.update(zip((key for _, key, _ in by_grant[grant_id]), ray.get(ref, timeout=RPC_TIMEOUT_S)))
        counts = collections.Counter(outcome.values())
        rejected += [key for key, result in outcome.items() if result in ("fenced", "rejected")]
        return PutResult(stored=counts["stored"], present=len(keys) - len(todo) + counts["present"], rejected=rejected)

    def _put_reserved(self, layout: Layout, keys: list[bytes], rows, parents: Sequence[bytes | None] | None,
                      wait_index: bool) -> PutResult:
        """A put without granted slots (put_grant_bytes=0): one call to reserve them."""
        hold = self.reserve(layout, keys, parents)
        try:
            self.check_hold(hold)  # one check covers the whole batch: it copies within the grace
            for row, view in zip(rows, hold.views):
                if view is not None:
                    view.copy_(row)
        except BaseException:
            self._node.abort.remote(hold.hold_id)
            raise
        written = [k for k, view in zip(keys, hold.views) if view is not None]
        if wait_index:
            stored = self.commit(hold, wait_index=True)
        elif written:
            self._commits.add(written, self._node.commit.remote(hold.hold_id, None, None, False))
            stored = len(written)
        else:
            self._node.abort.remote(hold.hold_id)
            stored = 0
        rejected = [k for k, view, here in zip(keys, hold.views, hold.present) if view is None and not here]
        return PutResult(stored=stored, present=sum(hold.present), rejected=rejected)

    def get(self, layout: Layout, keys: Sequence[bytes], out: Blocks, cache: bool | None = None,
            owner: str | None = None, lease: "Lease | str | None" = None,
            landing: Landing | None = None) -> ClusterGetResult:
        """Fills `out` with every block found anywhere in the cluster.

        Blocks on this node are copied straight from the arena. Others are pulled from their
        owners over Arrow Flight by this process, one stream per owner, straight into `out`;
        with `cache` (default: the `cache_pulled_blocks` setting) each is also copied into this
        node's arena, so the next get is local. `owner`: a node known to hold the blocks (a
        handoff handle's), tried without asking the controller. `lease`: one this get ends (a
        handoff's): released by the owner as part of the pull, or else right after it.
        `landing`: told how far each block has landed in `out` (cluster/pulled.py), while blocks
        from other nodes come layer-major, so another thread can use `out` layer by layer before
        this returns; which blocks are right is only known once it has.
        """
        keys = check_keys(keys)
        self._commits.settle(keys)  # this client's own puts of them are visible first
        try:
            return self._get(layout, keys, out, cache, owner, lease, landing)
        finally:
            if landing is not None:
                landing.end()

    def _get(self, layout: Layout, keys: list[bytes], out: Blocks, cache: bool | None, owner: str | None,
             lease: "Lease | str | None", landing: Landing | None) -> ClusterGetResult:
        rows = block_rows(layout, out, len(keys), "out")
        sources: list[tuple[str, str] | None] = [None] * len(keys)
        corrupt = self._read_directory(keys, rows, sources)
        rest = [i for i, source in enumerate(sources) if source is None and i not in corrupt]
        self._count_directory_reads(len(keys) - len(rest) - len(corrupt), 0 if self._node_has_durable_tier else len(rest))
        if rest and self._node_has_durable_tier:
            self._read_through_node(layout, keys, rows, rest, sources)  # the node counts these itself
        missing = [i for i, source in enumerate(sources) if source is None]
        if landing is not None:
            for i, source in enumerate(sources):
                if source is not None:
                    landing.landed(keys[i], layout.block_nbytes)
        if owner is not None and owner != self.node_id:
            for i in missing:
                self._locations.learn(keys[i], owner)
        release = lease_parts(lease) if lease is not None else None
        if missing:
            if self._pull(layout, keys, rows, missing, sources,
                          self.config.cache_pulled_blocks if cache is None else cache, release, landing):
                release = None
        if release is not None:
            try:
                self.release_lease(lease)
            except (LeaseError, ray.exceptions.RayError) as e:  # expired already, or its node is gone
                log.info("lease %s: %s", lease, e)
        return ClusterGetResult(sources)

    def _read_directory(self, keys: list[bytes], rows, sources) -> set[int]:
        """Copies the blocks in this node's host tier straight out of the shared arena, with no
        call to anyone (tiers/directory.py); returns the positions of blocks that failed their
        checksum (they are misses, and the node is told to drop them)."""
        directory, slots = self._arena.directory, self._arena.tensor
        corrupt = set()
        for i, key in enumerate(keys):
            status = directory.read(key, slots, rows[i], self._verifier.wanted())
            if status == "hit":
                sources[i] = (self.node_id, "local")
            elif status == "corrupt":
                corrupt.add(i)
        if corrupt:
            self._drop_corrupt([keys[i] for i in corrupt])
        return corrupt

    def _drop_corrupt(self, keys: list[bytes]) -> None:
        """Blocks of this node's arena that failed their checksums: misses here, dropped by the node."""
        log.warning("%d blocks in this node's arena fail their checksums (%s...); they are misses and are dropped",
                    len(keys), keys[0].hex())
        self._node.drop_corrupt.remote(keys)

    def _count_directory_reads(self, hits: int, misses: int) -> None:
        self._directory_reads[0] += hits
        self._directory_reads[1] += misses
        if time.monotonic() - self._reported_at > 1.0:
            self._report_directory_reads()

    def _report_directory_reads(self) -> None:
        """Hands the node the directory's hits and misses since the last report (for its stats)."""
        (hits, misses), self._directory_reads = self._directory_reads, [0, 0]
        self._reported_at = time.monotonic()
        if hits or misses:
            self._node.count_directory_reads.remote(hits, misses)

    def _read_through_node(self, layout: Layout, keys: list[bytes], rows, idx: list[int], sources) -> None:
        """keys[idx], which the directory did not have, from the node itself: a block on its NVMe
        tier is brought into the arena first (one call to the node actor, and one to release)."""
        wanted = [keys[i] for i in idx]
        hold = self.acquire(layout, wanted)
        try:
            for i, view, block_sum in zip(idx, hold.views, hold.checksums):
                if view is None:
                    continue
                if not self._verifier.wanted():
                    rows[i].copy_(view)
                elif copy_with_checksum(rows[i], view) != block_sum:
                    self._drop_corrupt([keys[i]])
                    continue
                sources[i] = (self.node_id, "local")
        finally:
            self.release(hold)

    def _pull(self, layout: Layout, keys: list[bytes], rows, missing: list[int], sources, cache: bool,
              release: tuple[str, str] | None = None, landing: Landing | None = None) -> bool:
        """Pulls keys[missing] from the nodes holding them into `rows`: one Flight stream per
        owner, the owners in parallel. Returns whether the lease `release` (hold id, node id)
        was given back by its node as part of the pull.

        Owners come from the location cache; the controller is asked once, for the keys it does
        not know, and once more for blocks whose cached owner no longer had them. Each block is
        checked and copied into `rows` as it arrives (cluster/pulled.py), and its receive buffer
        is let go at once (fresh pages cost ~10x a copy here). With `cache`, it is also copied
        into a slot reserved in this node's arena, so the next get is local; the commit that
        makes those copies visible is not waited for (`flush` waits). With `landing`, the owners
        send layer-major and each landed piece is reported to it.
        """
        wanted = [keys[i] for i in missing]
        reserved: dict[bytes, tuple[int, int]] = {}  # key -> (slot, generation) of its local copy
        hold = None
        if cache:
            hold, slots, _, generations = self._call_node("reserve", layout.to_dict(), wanted)
            reserved = {k: (s, g) for k, s, g in zip(wanted, slots, generations) if s is not None}
        sink = PulledBlocks({keys[i]: rows[i] for i in missing}, layout.block_nbytes, self._copier,
                            self._arena.tensor.numpy(), self._arena.generations, reserved, landing)
        delivered: dict[bytes, str] = {}  # key -> the node it came from
        released = False
        try:
            todo = list(missing)
            for refresh in (False, True):
                by_owner, looked_up = self._owners(keys, todo, refresh)
                got, done = self._stream(layout, keys, by_owner, sink, None if released else release,
                                         landing is not None)
                delivered.update(got)
                released |= done
                # A cached owner that no longer had a block: forget it and ask once more.
                todo = [i for i in todo if keys[i] not in delivered and i not in looked_up]
                self._locations.forget(keys[i] for i in todo)
                if not todo:
                    break
        finally:
            sink.wait()
            self.corrupt_received += len(sink.damaged)
            if hold is not None:
                # Slots whose block never came are aborted with the hold; the rest become
                # visible, under the checksums they travelled with (not hashed again).
                self._background.append(self._node.commit.remote(hold, list(sink.cached), list(sink.cached.values())))
        position = {keys[i]: i for i in missing}
        for key, owner in delivered.items():
            if key not in sink.damaged:
                sources[position[key]] = (owner, "remote")
        return released

    def _owners(self, keys: list[bytes], idx: list[int], refresh: bool) -> tuple[dict[str, list[int]], set[int]]:
        """keys[idx] grouped by the node to pull each from (self excluded), and which of them the
        controller was asked about (those not in the location cache, or all with `refresh`)."""
        by_owner: dict[str, list[int]] = {}
        unknown = []
        for i in idx:
            owner = None if refresh else self._locations.owner(keys[i])
            if owner is None or not self._breaker.allows(owner):  # another holder may answer
                unknown.append(i)
            else:
                by_owner.setdefault(owner, []).append(i)
        holders = self._index.locate([keys[i] for i in unknown]) if unknown else []
        named = set(by_owner) | {n for hs in holders for n, _ in hs if n != self.node_id}
        if not named <= self._addresses.keys():  # a node this client has not talked to yet
            self._addresses = {n["node_id"]: n["address"] for n in self.nodes()}
        if unknown:
            for i, hs in zip(unknown, holders):
                owner = next((n for n, _ in hs if n != self.node_id and n in self._addresses
                              and self._breaker.allows(n)), None)
                if owner is not None:
                    self._locations.learn(keys[i], owner)
                    by_owner.setdefault(owner, []).append(i)
        return by_owner, set(unknown)

    def _stream(self, layout: Layout, keys: list[bytes], by_owner: dict[str, list[int]], sink,
                release: tuple[str, str] | None, by_layer: bool) -> tuple[dict[bytes, str], bool]:
        """Flight streams to every owner at once (a large pull from one owner split over up to
        `pull_streams` of them); returns key -> owner of the blocks received, and whether the
        lease `release` was given back (it rides on the pull from its node, if that is one
        stream). An owner that fails or times out (transfer_timeout_s) contributes misses, is
        forgotten until the controller names it again, and is left alone for a while (its
        breaker opens)."""
        def pull(owner: str, idx: list[int], hold_id: str | None) -> tuple[str, set[bytes], bool]:
            address = self._addresses.get(owner)
            if address is None:
                return owner, set(), False
            try:
                got = self._peers.get(address).get(layout, [keys[i] for i in idx], sink, verify=False, release=hold_id,
                                              by_layer=by_layer)
                self._breaker.succeeded(owner)
                return owner, got, hold_id is not None
            except TransferError as e:  # the owner died, stalled or refused: those blocks are misses
                log.warning("%s; leaving node %s alone for %.0f s", e, owner[:12], self._breaker.failed(owner))
                self._peers.drop(address)
                self._addresses.pop(owner, None)
                self._locations.forget_node(owner)
                return owner, set(), False

        jobs = []
        for owner, idx in by_owner.items():
            # Several streams only where each still moves a lot: small pulls pay per stream.
            n = max(1, min(self.config.pull_streams, len(idx) * layout.block_nbytes // _STREAM_MIN_BYTES))
            hold_id = release[0] if release is not None and release[1] == owner and n == 1 else None
            jobs += [(owner, part, hold_id) for part in (idx[j::n] for j in range(n))]
        results = [pull(*jobs[0])] if len(jobs) == 1 else list(self._streams.map(lambda job: pull(*job), jobs))
        return {key: owner for owner, got, _ in results for key in got}, any(done for _, _, done in results)

    def flush(self) -> None:
        """Waits until blocks put, and blocks pulled by earlier gets, are visible in this node's cache."""
        self._commits.settle()
        refs, self._background = self._background, []
        ray.get(refs, timeout=RPC_TIMEOUT_S)

    def _index_reader(self) -> IndexReader:
        count = ray.get(self._controller.index_shards.remote(), timeout=RPC_TIMEOUT_S)
        shards = [ray.get_actor(shard_actor_name(i), namespace=self.config.ray_namespace) for i in range(count)]
        return IndexReader(lambda shard, requests: ray.get(shards[shard].batch.remote(requests), timeout=LOOKUP_TIMEOUT_S),
                           count, LOOKUP_TIMEOUT_S)

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        return self._index.longest_prefix(check_keys(keys))

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [bool(h) for h in self.where(keys)]

    def where(self, keys: Sequence[bytes]) -> list[list[tuple[str, str]]]:
        """Per key, the (node id, medium) pairs that hold it, fastest medium first."""
        return self._index.locate(check_keys(keys))

    def best_node(self, keys: Sequence[bytes]) -> dict:
        return ray.get(self._controller.best_node.remote(check_keys(keys)), timeout=RPC_TIMEOUT_S)

    def report_residency(self, engine_id: str, stored: Sequence[bytes] = (), removed: Sequence[bytes] = (),
                         cleared: bool = False, node_id: str | None = None) -> dict:
        """An inference engine's blocks entering (`stored`) or leaving (`removed`) its own HBM,
        for best_node (cluster/residency.py); with `cleared`, its earlier ones are forgotten
        first. Also the engine's heartbeat: one silent for 30 s is forgotten. `node_id`: the
        engine's node (default this client's). Returns {"known_node": whether that is a node of
        the cluster (else the report is ignored), "resend": whether the engine must report all
        it holds again, with `cleared` (an index shard restarted and lost its reports)}."""
        return ray.get(self._controller.report_residency.remote(
            check_engine_id(engine_id), node_id or self.node_id, check_keys(stored), check_keys(removed), cleared),
            timeout=RPC_TIMEOUT_S)

    def delete(self, keys: Sequence[bytes]) -> int:
        keys = check_keys(keys)
        # The controller deletes where the index says the keys are: this client's own recent puts
        # must be committed (a commit coming later would bring them back) and indexed first.
        if self._commits.settle(keys):
            self._call_node("sync")
        return ray.get(self._controller.delete.remote(keys), timeout=RPC_TIMEOUT_S)

    def lease(self, layout: Layout, keys: Sequence[bytes], ttl_s: float | None = None,
              node_id: str | None = None) -> Lease:
        """Pins keys on their node (this one by default) until `release_lease`, a get that ends
        the lease, or the TTL: one call to that node's actor."""
        ttl = self.config.lease_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise LeaseError(f"ttl_s={ttl!r} must be positive")
        node_id = node_id or self.node_id
        keys = check_keys(keys)
        self._commits.settle(keys)
        hold_id, slots, _ = self._call_node("acquire", layout.to_dict(), keys, ttl, node_id=node_id)
        return Lease(f"{hold_id}@{node_id}", node_id, [k for k, s in zip(keys, slots) if s is not None], ttl)

    def release_lease(self, lease: Lease | str) -> None:
        """Unpins a lease's blocks; LeaseError if it expired or was released already."""
        hold_id, node_id = lease_parts(lease)
        self._call_node("release", hold_id, node_id=node_id)

    def _node_actor(self, node_id: str):
        actor = self._node_actors.get(node_id)
        if actor is None:
            try:
                actor = ray.get_actor(node_actor_name(node_id), namespace=self.config.ray_namespace)
            except ValueError:
                raise LeaseError(f"node {node_id!r} is not a live kvstore node") from None
            self._node_actors[node_id] = actor
        return actor

    def wait_ready(self, min_nodes: int = 1, timeout_s: float = RPC_TIMEOUT_S) -> list[dict]:
        """Waits until at least min_nodes nodes are registered with their content indexed."""
        return ray.get(self._controller.wait_ready.remote(min_nodes, timeout_s), timeout=timeout_s + 10)

    def nodes(self) -> list[dict]:
        return ray.get(self._controller.nodes.remote(), timeout=RPC_TIMEOUT_S)

    def stats(self) -> dict:
        return ray.get(self._controller.stats.remote(), timeout=RPC_TIMEOUT_S)

    def close(self, shutdown_cluster: bool | None = None) -> None:
        """Gives back unused granted slots and unmaps the arena; an embedded cluster (or
        shutdown_cluster=True) is stopped too."""
        self._report_directory_reads()
        self.flush()
        if self._slots is not None:  # after flush: a grant given back takes its unbound slots with it
            for grant_id in self._slots.drain():
                self._node.ungrant.remote(grant_id)
        self._index.stop()
        self._peers.close()
        self._copier.shutdown()
        self._streams.shutdown()
        self._arena.close()
        for arena in self._retired_arenas:
            arena.close()
        if shutdown_cluster if shutdown_cluster is not None else self.embedded:
            try:
                ray.get(self._controller.shutdown_nodes.remote(), timeout=60)
                ray.kill(self._controller)
            finally:
                if self.embedded:
                    ray.shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _node_settings(overrides: dict, config: Config, embedded: bool) -> dict:
    """What the node actors are told: an embedded cluster's data plane stays on loopback unless
    flight_host says otherwise (Ray would give its node's outward IP)."""
    if embedded and not (overrides.get("flight_host") or config.flight_host):
        return {**overrides, "flight_host": "127.0.0.1"}
    return overrides


def _private_ray_auth() -> None:
    """Keeps Ray's token authentication on for an embedded Ray: a token of its own, in this
    process's environment (Ray's processes inherit it), unless the caller chose a token or
    turned auth off (RAY_AUTH_MODE=disabled). Never a token file in ~/.ray: Ray would then switch
    every other Ray head started on this machine to token mode."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] != "token" or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:  # Ray read its auth settings when it was imported: have it read them again
        from ray._raylet import AuthenticationTokenLoader, Config as RayConfig

        RayConfig.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: run without rather than fail
        log.warning("Ray's token authentication could not be turned on for the embedded cluster (%s); "
                    "it runs without", e)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_AUTH_TOKEN")


def connect(address: str | None = None, *, config: Config | None = None, node_overrides: dict | None = None,
            **overrides) -> "Client | RemoteClient":
    """Connects to the kvstore cluster at the Ray `address`, or starts an embedded one.

    Settings come from `config`, else from the file named by KVSTORE_CONFIG and KVSTORE_*
    variables, with `overrides` on top (see docs/configuration.md). Node actors read their own
    node's file and variables (so worker groups can size their tiers differently); only
    `node_overrides` (default: `overrides`) are passed on to them, and only when this call
    starts the controller.

    `connect("kvstore://HOST:PORT", token=...)` (`kvstores://`: TLS, checked against
    `tls_ca_file`) is for engines outside Ray: a `RemoteClient` (cluster/remote.py) that reaches
    the cluster through its HTTP service (HOST:PORT, `kvstore serve`'s) and the nodes' Flight
    data planes with one credential, a tenant's or the admin's, and offers what an engine uses:
    get, put, longest_prefix, contains, where, best_node, close. It needs no Ray in the caller's
    process (`kvstore.connect` dispatches before importing this module).
    """
    from kvstore.cluster.remote import connect_remote, is_remote_url

    if is_remote_url(address):
        if node_overrides is not None:
            raise ConfigError(f"node_overrides is for a client that starts the cluster, not {address!r}")
        return connect_remote(address, config=config, **overrides)
    config = config or load_config(os.environ.get("KVSTORE_CONFIG") or None, **overrides)
    address = address or config.ray_address or None
    embedded = address is None and not ray.is_initialized()
    if ray.is_initialized() and address not in (None, "auto"):
        current = ray.get_runtime_context().gcs_address
        if current != address:
            raise KVStoreError(f"this process is already in the Ray cluster at {current}; it cannot also "
                               f"join {address!r} (run the caller inside kvstore's cluster, or call "
                               "connect() without an address there)")
    if not ray.is_initialized():
        if embedded:
            _private_ray_auth()
            # On loopback: the node's IP is where its data plane binds too (flight_host empty).
            ray.init(namespace=config.ray_namespace, include_dashboard=False, num_cpus=max(2, os.cpu_count() or 2),
                     object_store_memory=128 * 1024**2, log_to_driver=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, namespace=config.ray_namespace, log_to_driver=False)
    token = config.token()
    try:
        controller = ray.get_actor(CONTROLLER_NAME, namespace=config.ray_namespace)
    except ValueError:
        token = token or secrets.token_urlsafe(24)
        controller = ControllerActor.options(
            name=CONTROLLER_NAME, namespace=config.ray_namespace, get_if_exists=True,
            lifetime=None if embedded else "detached",
            # On the starter's node (the KubeRay head for `kvstore serve`), free to restart
            # elsewhere if that node dies.
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        ).remote(config.ray_namespace, token, _node_settings(overrides if node_overrides is None else node_overrides,
                                                             config, embedded))
    return Client(controller, config, embedded)
