"""TieredStore: one node's KV blocks across its tiers (e.g. HBM -> host -> NVMe).

The store keeps the index (key -> BlockEntry: tier, slot, state, pins) and moves bytes between
callers and tiers. Puts land in the top tier; making room demotes the policy's victims one tier
down, and only the bottom tier drops blocks. A hit in a lower tier is promoted to the top when
`promote_on_hit` is set. Moves are exclusive: a block lives in exactly one tier.

Concurrency: one lock guards the index, the policies and the slot allocators. Bytes are never
copied under it: a put copies into slots it reserved as WRITING, a get copies out of blocks it
pinned, and a move copies while the block is MOVING (see kvstore.block for the states), so
readers, writers and movers run in parallel and eviction can never free memory under a reader.

Integrity: every block gets its checksum when it is committed (taken while its bytes are copied
in, or from the writer of a reserved slot), kept in its entry and in every tier it moves to. NVMe
reads always check it; memory reads as the ReadVerifier says (kvstore.integrity). A block that
fails is dropped and counted in `corrupt_dropped`: a miss, never data.

Size classes (tiers/geometry.py): every tier has the same classes (slot sizes); a layout's
blocks go to the smallest class that fits them (or, with `auto` classes, to one of their own
size), in every tier, and each class of each tier has its own eviction policy: a victim is always
of the class that needs the slot. Chunks of a tier go to classes on demand; a class that holds
fewer chunks than its share (its part of the bytes recently allocated in that tier, decayed)
takes a whole chunk from the class most over its share, demoting that chunk's blocks, rather
than evict its own. Shares by bytes allocated keep every class's blocks about equally long, as
one LRU over all classes would.

Writers outside the store (`reserve`) are fenced: each slot of a memory tier has a generation,
and `fence` (a writer's hold expired) bumps it and keeps the slot out of use for `fence_grace_s`,
so a late writer that checks its generation before each copy can never land in a reused slot.
Writers may also hold *granted* slots (`grant`): top-tier slots handed out before any key is
known, so a writer on the node fills one and names its key when it `bind`s it, with no call in
between. A granted slot is allocated but no block's; fenced the same way when its grant expires.

Events (vLLM KV-event shapes) go to `listener`, called with the lock held and in order: it must
only enqueue.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch

from kvstore.block import BlockEntry, BlockState
from kvstore.config import Config
from kvstore.errors import (CorruptBlockError, InvalidKeyError, InvalidLayoutError, LayoutMismatchError, LeaseError,
                            TierIOError)
from kvstore.events import AllBlocksCleared, BlockRemoved, Event, stored_events
from kvstore.integrity import ReadVerifier, checksum
from kvstore.keys import check_keys, check_parents
from kvstore.layout import Layout
from kvstore.payload import Blocks, block_rows
from kvstore.policy import EvictionPolicy, make_policy
from kvstore.quotas import OwnerUsage, QuotaOf
from kvstore.tiers.base import SlotMeta, Tier
from kvstore.tiers.geometry import SizeClasses, rounding_loss

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PutResult:
    stored: int = 0
    present: int = 0
    rejected: list[bytes] = dataclasses.field(default_factory=list)  # no slot could be freed for these


@dataclasses.dataclass
class GetResult:
    tiers: list[str | None]  # per key: the tier it was served from, None for a miss

    @property
    def found(self) -> list[bool]:
        return [t is not None for t in self.tiers]

    @property
    def hits(self) -> int:
        return sum(t is not None for t in self.tiers)


@dataclasses.dataclass(frozen=True)
class BlockHandle:
    """A block held for a reader or writer outside the store's own put/get (another process
    mapping the host arena, or the data-plane server): `view` aliases its bytes in a memory tier.
    Give it back with `commit`/`abort` (from `reserve`) or `release` (from `acquire`)."""

    key: bytes
    tier: str
    slot: int
    nbytes: int
    view: torch.Tensor = dataclasses.field(repr=False)
    entry: BlockEntry = dataclasses.field(repr=False, compare=False)
    checksum: int | None = None  # a READY block's (acquire); None while being written
    generation: int = 0  # the slot's generation when reserved: a fenced writer sees it change


@dataclasses.dataclass
class _TierCounters:
    hits: int = 0
    evictions: int = 0  # dropped from the store out of this tier
    demotions: int = 0  # moved out of this tier to the one below
    promotions: int = 0  # moved into this tier from below


class TieredStore:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        policy: str = "lru",
        prefix_aware: bool = True,
        promote_on_hit: bool = True,
        listener: Callable[[list[Event]], None] | None = None,
        verifier: ReadVerifier | None = None,
        fence_grace_s: float = 10.0,
        quota_of: QuotaOf | None = None,
    ) -> None:
        if not tiers:
            raise InvalidLayoutError("a store needs at least one tier")
        if all(t.classes.single for t in tiers):
            sizes = {t.slot_nbytes for t in tiers}
            if len(sizes) != 1:
                raise InvalidLayoutError(f"tiers have different slot sizes {sorted(sizes)}; they must be equal")
        elif len({t.classes for t in tiers}) != 1:
            raise InvalidLayoutError("tiers have different size classes: "
                                     + "; ".join(f"{t.name}: {t.classes.describe()}" for t in tiers))
        self.tiers = list(tiers)
        self.classes: SizeClasses = tiers[0].classes
        self.slot_nbytes = self.classes.slot_nbytes  # one class: its slot size; several: 0
        self._several = not self.classes.single
        self._largest = min(t.max_stride for t in tiers)  # the largest slot every tier holds
        self._strides: set[int] = set(self.classes.declared)  # the classes in use
        self._layout_class: dict[bytes, int] = {}  # layout id -> the class its blocks go to
        self.promote_on_hit = promote_on_hit
        self.verifier = verifier or ReadVerifier()
        self.fence_grace_s = fence_grace_s
        self._fenced: list[tuple[float, int, int]] = []  # (free after, tier, slot) of fenced writers
        self._granted: dict[int, int] = {}  # top-tier slot granted to a writer, unbound -> its class
        self._listener = listener
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)
        self._index: dict[bytes, BlockEntry] = {}
        self._visible: set[bytes] = set()  # keys of committed, undeleted blocks (READY or MOVING)
        self._children: dict[bytes, int] = {}
        has_children = self._children.__contains__ if prefix_aware else None
        self._policy_name, self._has_children = policy, has_children
        self._policies: list[dict[int, EvictionPolicy]] = [{} for _ in self.tiers]  # per tier, per class
        # Per tier and slot: the length of the block in it (for the classes' rounding loss), and
        # with several classes the block itself (to empty a chunk that goes to another class).
        self._nbytes = [np.zeros(t.num_slots, dtype=np.uint32) for t in self.tiers]
        self._occupants: list[dict[int, BlockEntry]] = [{} for _ in self.tiers]
        self._usage = OwnerUsage([t.name for t in self.tiers], [t.num_slots for t in self.tiers], quota_of)
        self._demand: list[dict[int, float]] = [{} for _ in self.tiers]  # per tier: class -> bytes asked, decayed
        self._chunks_taken = [0] * len(self.tiers)
        self._tier_counters = [_TierCounters() for _ in self.tiers]
        self._counters = dict.fromkeys(
            ("puts", "put_present", "put_rejected", "gets", "hits", "misses", "deletes", "corrupt_dropped",
             "io_errors", "verified_reads", "fenced_writes"), 0)
        with self._lock:
            self._recover()

    @classmethod
    def from_config(cls, config: Config, *, shm_name: str | None = None,
                    listener: Callable[[list[Event]], None] | None = None,
                    quota_of: QuotaOf | None = None) -> "TieredStore":
        """The tiers the configuration asks for, top to bottom: hbm (if sized), host, nvme (if sized)."""
        from kvstore.tiers.hbm import HBMTier
        from kvstore.tiers.host import HostTier
        from kvstore.tiers.nvme import NVMeTier

        tiers: list[Tier] = []
        try:
            classes = config.size_classes()
            if config.hbm_tier_bytes:
                tiers.append(HBMTier(classes, config.hbm_tier_bytes))
            if config.host_tier_bytes:
                name = shm_name or f"{config.shm_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
                tiers.append(HostTier(name, classes, config.host_tier_bytes))
            if config.nvme_tier_bytes:
                tiers.append(NVMeTier(config.nvme_path, classes, config.nvme_tier_bytes,
                                      io_threads=config.io_threads, direct_io=config.nvme_direct_io))
            return cls(tiers, policy=config.eviction_policy, prefix_aware=config.prefix_aware_eviction,
                       promote_on_hit=config.promote_on_hit, listener=listener,
                       verifier=ReadVerifier(config.verify_reads, config.verify_sample_fraction),
                       fence_grace_s=config.fence_grace_s, quota_of=quota_of)
        except BaseException:
            for tier in tiers:
                tier.close()
            raise

    # -- public API ----------------------------------------------------------------------

    def put(self, layout: Layout, keys: Sequence[bytes], blocks: Blocks,
            parents: Sequence[bytes | None] | None = None, owner: str | None = None) -> PutResult:
        """Stores blocks under keys in the top tier. Keys already present are skipped.

        `parents[i]` is the key of block i's predecessor in its prompt (see keys.chain_parents);
        it orders prefix-aware eviction and goes into the BlockStored events. A batch larger
        than a quarter of the top tier goes in chunks, so earlier chunks can be demoted to make
        room for later ones. Blocks that find no room (everything pinned) are in `rejected`.
        `owner`: the tenant whose quotas the blocks count against (kvstore/quotas.py).
        """
        stride = self.check_layout(layout)
        keys = check_keys(keys)
        rows = block_rows(layout, blocks, len(keys))
        parents = check_parents(parents, len(keys))
        result = PutResult()
        chunk = max(1, self.tiers[0].geometry.num_chunks * self.tiers[0].geometry.slots_per_chunk(stride) // 4)
        for start in range(0, len(keys), chunk):
            end = start + chunk
            self._put_chunk(layout, keys[start:end], rows[start:end], parents[start:end], result, owner)
        if result.rejected:
            log.debug("put: no room for %d blocks (everything else is pinned or being written)",
                      len(result.rejected))
        return result

    def _put_chunk(self, layout: Layout, keys: list[bytes], rows: list[torch.Tensor],
                   parents: list[bytes | None], result: PutResult, owner: str | None) -> None:
        row_of = dict(zip(keys, rows))
        with self._lock:
            entries, present, rejected = self._begin_writes(layout, keys, parents, owner)
        sums: list[int | None] = []
        try:
            errors = self.tiers[0].write_many([(e.slot, row_of[e.key], self._meta(e)) for e in entries], sums) \
                if entries else []
        except BaseException:
            with self._lock:
                for entry in entries:
                    self._settle_unwritten(entry)
            raise
        for entry, block_sum in zip(entries, sums):
            entry.checksum = block_sum
        with self._lock:
            result.stored += self._commit_writes(entries, errors)
        result.present += present
        result.rejected += rejected

    def get(self, layout: Layout, keys: Sequence[bytes], out: Blocks) -> GetResult:
        """Copies the blocks present into `out` (same forms as put's blocks); reports misses."""
        self.check_layout(layout)
        keys = check_keys(keys)
        rows = block_rows(layout, out, len(keys), "out")
        served: list[str | None] = [None] * len(keys)
        with self._lock:
            self._counters["gets"] += len(keys)
            pinned = self._pin(layout, keys)
        by_tier: dict[int, list[int]] = {}
        for i, entry in enumerate(pinned):
            if entry is not None:
                by_tier.setdefault(entry.tier, []).append(i)
        errors: dict[int, Exception | None] = {}
        try:
            for t, idx in by_tier.items():
                verify = [self.verifier.wanted() for _ in idx]
                self._counters["verified_reads"] += sum(verify)  # a benign race: a statistic only
                errs = self.tiers[t].read_many([(pinned[i].slot, rows[i], self._meta(pinned[i])) for i in idx],
                                               verify)
                errors.update(zip(idx, errs))
        finally:
            with self._lock:
                promote: list[tuple[BlockEntry, torch.Tensor]] = []
                for i in reversed(range(len(keys))):
                    entry = pinned[i]
                    if entry is None:
                        continue
                    tier = entry.tier
                    self._unpin(entry)
                    err = errors.get(i)
                    if err is not None or i not in errors:
                        if isinstance(err, CorruptBlockError):
                            self._counters["corrupt_dropped"] += 1
                            log.warning("dropping a corrupt block: %s", err)
                            self._discard(entry)
                        elif err is not None:
                            self._counters["io_errors"] += 1
                        pinned[i] = None
                        continue
                    served[i] = self.tiers[tier].name
                    self._tier_counters[tier].hits += 1
                    if entry.state is BlockState.READY:
                        self._touch(entry)
                        if tier > 0 and self.promote_on_hit and entry.pins == 0:
                            promote.append((entry, rows[i]))
                hits = sum(s is not None for s in served)
                self._counters["hits"] += hits
                self._counters["misses"] += len(keys) - hits
                if promote:
                    self._promote(promote)
        return GetResult(served)

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are present (a MOVING block counts: it is readable once moved)."""
        with self._lock:
            flags = self._present(keys)
        try:
            return flags.index(False)
        except ValueError:
            return len(flags)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return self._present(keys)

    def where(self, keys: Sequence[bytes]) -> list[str | None]:
        """The tier each key lives in now, or None."""
        with self._lock:
            flags = self._present(keys)
            return [self.tiers[self._index[bytes(k)].tier].name if present else None
                    for k, present in zip(keys, flags)]

    def delete(self, keys: Sequence[bytes]) -> int:
        """Removes the blocks; a block being read is removed once its readers let go."""
        keys = check_keys(keys)
        deleted = 0
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is None:
                    continue
                self._discard(entry)
                deleted += 1
            self._counters["deletes"] += deleted
        return deleted

    def count_reads(self, hits: int, misses: int) -> None:
        """Adds reads served outside the store (the host arena's directory) to its counters."""
        host = next((t for t, tier in enumerate(self.tiers) if tier.name == "host"), None)
        with self._lock:
            self._counters["gets"] += hits + misses
            self._counters["hits"] += hits
            self._counters["misses"] += misses
            if host is not None:
                self._tier_counters[host].hits += hits

    def drop_corrupt(self, keys: Sequence[bytes]) -> int:
        """Removes blocks a reader outside the store found failing their checksums."""
        keys = check_keys(keys)
        with self._lock:
            dropped = 0
            for key in keys:
                entry = self._index.get(key)
                if entry is not None and entry.visible:
                    log.warning("dropping block %s: a reader found it failing its checksum", key.hex())
                    self._discard(entry)
                    dropped += 1
            self._counters["corrupt_dropped"] += dropped
        return dropped

    def clear(self) -> None:
        """Deletes every block and announces AllBlocksCleared."""
        with self._lock:
            for entry in list(self._index.values()):
                self._discard(entry, announce=False)
            self._emit([AllBlocksCleared()])

    def reserve(self, layout: Layout, keys: Sequence[bytes], parents: Sequence[bytes | None] | None = None,
                owner: str | None = None) -> list[BlockHandle | None]:
        """Reserves top-tier slots for blocks another party will write in place.

        Returns a WRITING handle per key, or None where the key is present already (or repeats
        an earlier key of the call) or no room could be made (within `owner`'s quota, as in
        `put`). The writer fills `handle.view[:nbytes]`, then calls `commit` (or `abort`).
        """
        self.check_layout(layout)
        keys = check_keys(keys)
        parents = check_parents(parents, len(keys))
        top = self.tiers[0]
        if top.durable:
            raise InvalidLayoutError(f"the top tier {top.name!r} cannot be written in place")
        with self._lock:
            entries, _, _ = self._begin_writes(layout, keys, parents, owner)
            generations = {e.key: int(top.generations[e.slot]) for e in entries}
        mine = {e.key: e for e in entries}
        handles: list[BlockHandle | None] = []
        for key in keys:
            e = mine.pop(key, None)  # a repeated key gets None: one writer per block
            handles.append(None if e is None else BlockHandle(e.key, top.name, e.slot, e.nbytes,
                                                              top.view(e.slot)[:e.nbytes], e,
                                                              generation=generations[e.key]))
        return handles

    def commit(self, handles: Sequence[BlockHandle | None], checksums: Sequence[int] | None = None) -> int:
        """Makes reserved blocks visible (their bytes must be in place). Returns how many.

        `checksums[i]` is handle i's checksum where its writer took it while copying (the data
        plane does); otherwise the store hashes the bytes in place, once, here. A handle that was
        fenced meanwhile is not committed (its writer's hold expired; the slot may hold anything).
        """
        handles = list(handles)
        sums = list(checksums) if checksums is not None else [None if h is None else checksum(h.view)
                                                              for h in handles]
        with self._lock:
            live = []
            for handle, block_sum in zip(handles, sums):
                if handle is None:
                    continue
                if self.fenced(handle):
                    self._counters["fenced_writes"] += 1
                    continue
                handle.entry.checksum = block_sum
                live.append(handle.entry)
            return self._commit_writes(live)

    def fence(self, handles: Sequence[BlockHandle | None]) -> None:
        """Ends reserved writes whose writer may still be writing (its hold expired): their slots'
        generations change, nothing becomes visible, and the slots stay unused for
        `fence_grace_s`, longer than any one copy a writer starts after checking `fenced`."""
        top = self.tiers[0]
        with self._lock:
            for handle in handles:
                if handle is None or self.fenced(handle) or not self._uncommitted(handle.entry):
                    continue  # fenced already, or its writer committed or aborted first
                top.generations[handle.slot] += 1
                self._settle_unwritten(handle.entry, hold_slot=True)
                self._counters["fenced_writes"] += 1

    @staticmethod
    def _uncommitted(entry: BlockEntry) -> bool:
        """Still being written: WRITING, or deleted while WRITING (a committed block has its checksum)."""
        return entry.state is BlockState.WRITING or (entry.state is BlockState.DOOMED and entry.checksum is None)

    def fenced(self, handle: BlockHandle) -> bool:
        """Whether a reserved handle's slot was fenced since it was reserved."""
        return int(self.tiers[0].generations[handle.slot]) != handle.generation

    def abort(self, handles: Sequence[BlockHandle | None]) -> None:
        """Gives reserved slots back without making their blocks visible."""
        with self._lock:
            for handle in handles:
                if handle is not None:
                    self._settle_unwritten(handle.entry)

    def grant(self, layout: Layout, n: int, ahead: int = 0) -> list[tuple[int, int]]:
        """Top-tier slots for blocks of `layout` whose keys the writer will name later (`bind`),
        as (slot, generation): up to n made room for as `reserve` does (fewer when no room is),
        then up to `ahead` more only from free slots (a writer's next puts evict nothing now)."""
        self.check_layout(layout)
        top = self.tiers[0]
        if top.durable:
            raise InvalidLayoutError(f"the top tier {top.name!r} cannot be written in place")
        with self._lock:
            stride = self._layout_class[layout.id]
            slots = self._reserve(0, stride, n)
            while len(slots) < n + ahead and (slot := top.allocator.alloc(stride)) is not None:
                top.begin_write(slot)
                slots.append(slot)
            for slot in slots:
                self._granted[slot] = stride
            return [(slot, int(top.generations[slot])) for slot in slots]

    def bind(self, layout: Layout, writes: Sequence[tuple[int, int, bytes, bytes | None]],
             checksums: Sequence[int] | None = None, owner: str | None = None) -> list[str]:
        """Commits blocks written into granted slots: `writes[i]` is (slot, generation, key,
        parent). Per write: "stored"; "present" (the key was stored meanwhile: its slot is freed);
        "fenced" (the slot's grant expired, or it was never granted: nothing of it is read);
        "rejected" (over `owner`'s quota). `checksums` as in `commit`."""
        self.check_layout(layout)
        keys = check_keys([w[2] for w in writes])
        parents = check_parents([w[3] for w in writes], len(writes))
        top = self.tiers[0]
        for slot, *_ in writes:
            if not isinstance(slot, int) or not 0 <= slot < top.num_slots:
                raise LeaseError(f"slot {slot!r} is not a slot of the {top.name} tier (0..{top.num_slots - 1})")
        sums = list(checksums) if checksums is not None else [checksum(top.view(w[0])[:layout.block_nbytes])
                                                              for w in writes]
        outcome = ["fenced"] * len(writes)
        with self._lock:
            stride = self._layout_class[layout.id]
            self._counters["puts"] += len(writes)
            owner_id = self._usage.owner_id(owner)
            fresh: list[tuple[int, BlockEntry]] = []
            for i, ((slot, generation, _, _), key, parent) in enumerate(zip(writes, keys, parents)):
                if self._granted.get(slot) != stride or int(top.generations[slot]) != generation:
                    self._counters["fenced_writes"] += 1
                    continue
                del self._granted[slot]
                if key in self._index:
                    outcome[i] = "present"
                    self._counters["put_present"] += 1
                    self._release_slot(0, slot, erase=True)
                    continue
                entry = BlockEntry(key, layout.id, layout.block_nbytes, 0, slot, parent, owner=owner_id)
                entry.checksum = sums[i]
                self._index[key] = entry
                fresh.append((i, entry))
            allowed = {id(e) for e in self._within_quota(0, [e for _, e in fresh])}
            live = []
            for i, entry in fresh:
                if id(entry) in allowed:
                    self._occupy(0, entry.slot, entry)
                    live.append(entry)
                    outcome[i] = "stored"
                else:
                    outcome[i] = "rejected"
                    self._counters["put_rejected"] += 1
                    self._settle_unwritten(entry)
            self._commit_writes(live)
        return outcome

    def fence_granted(self, slots: Sequence[tuple[int, int]]) -> None:
        """Ends granted (slot, generation)s whose writer may still be writing (their grant
        expired): as `fence` does for reserved slots."""
        top = self.tiers[0]
        with self._lock:
            for slot, generation in slots:
                if slot in self._granted and int(top.generations[slot]) == generation:
                    del self._granted[slot]
                    top.generations[slot] += 1
                    self._fenced.append((time.monotonic() + self.fence_grace_s, 0, slot))
                    self._counters["fenced_writes"] += 1

    def reap_fenced(self) -> None:
        """Frees fenced slots whose grace is over (an allocation does it too; an owner calls this
        now and then so that an idle store's slots and stats do not wait for the next one)."""
        if self._fenced:
            with self._lock:
                self._reap_fenced()

    def ungrant(self, slots: Sequence[tuple[int, int]]) -> None:
        """Gives back granted (slot, generation)s their writer will not use."""
        top = self.tiers[0]
        with self._lock:
            for slot, generation in slots:
                if slot in self._granted and int(top.generations[slot]) == generation:
                    del self._granted[slot]
                    self._release_slot(0, slot, erase=True)

    def acquire(self, layout: Layout, keys: Sequence[bytes]) -> list[BlockHandle | None]:
        """Pins blocks for an outside reader, in a memory tier (a block on a durable tier is
        promoted first). None for a miss, or for a block that could not be brought into memory.
        Every handle must be given back with `release`."""
        self.check_layout(layout)
        keys = check_keys(keys)
        with self._lock:
            self._counters["gets"] += len(keys)
            pinned = self._pin(layout, keys)
            durable = [e for e in pinned if e is not None and self.tiers[e.tier].durable]
            if durable:
                for entry in durable:
                    self._unpin(entry)
                # Once per block: a key asked for twice is pinned twice but moved once.
                self._promote([(e, None) for e in dict.fromkeys(durable)])
                again = self._pin(layout, [e.key for e in durable])
                by_key = {e.key: e for e in again if e is not None}
                for entry in again:
                    if entry is not None and self.tiers[entry.tier].durable:
                        self._unpin(entry)
                        by_key.pop(entry.key, None)
                pinned = [by_key.get(e.key) if e in durable else e for e in pinned]
            handles: list[BlockHandle | None] = []
            for entry in pinned:
                if entry is None:
                    handles.append(None)
                    continue
                tier = self.tiers[entry.tier]
                self._tier_counters[entry.tier].hits += 1
                self._touch(entry)
                handles.append(BlockHandle(entry.key, tier.name, entry.slot, entry.nbytes,
                                           tier.view(entry.slot)[:entry.nbytes], entry, entry.checksum))
            hits = sum(h is not None for h in handles)
            self._counters["hits"] += hits
            self._counters["misses"] += len(keys) - hits
            return handles

    def release(self, handles: Sequence[BlockHandle | None]) -> None:
        """Unpins blocks from `acquire`."""
        with self._lock:
            for handle in handles:
                if handle is not None:
                    self._unpin(handle.entry)

    def resync(self) -> None:
        """Announces the whole content through the listener: AllBlocksCleared, then BlockStored
        for every block, in order with other events (for a controller rebuilding its index)."""
        with self._lock:
            events: list[Event] = [AllBlocksCleared()]
            for t, tier in enumerate(self.tiers):
                entries = [e for e in self._index.values() if e.visible and e.tier == t]
                events += stored_events([e.key for e in entries], [e.parent for e in entries], tier.medium)
            self._emit(events)

    def stats(self) -> dict:
        with self._lock:
            tiers = []
            for tier, counters in zip(self.tiers, self._tier_counters):
                tiers.append({**tier.stats(), **dataclasses.asdict(counters)})
            return {"blocks": len(self._index), "slot_bytes": self.slot_nbytes, **self._counters, "tiers": tiers,
                    "granted_slots": len(self._granted),
                    **self._class_stats(), "tenants": self._usage.stats()}

    def _class_stats(self) -> dict:
        """Per size class: its slots and blocks in every tier, and what rounding loses (the part
        of its used slots' bytes that no block fills). Vectorized over slots: no walk of the index."""
        classes: dict[int, dict] = {}
        granted: dict[int, int] = {}  # class -> its granted slots: used, but no block's yet
        for stride in self._granted.values():
            granted[stride] = granted.get(stride, 0) + 1
        for t, tier in enumerate(self.tiers):
            g = tier.geometry
            used = self._nbytes[t]
            per_chunk = np.bincount(np.arange(g.num_slots) // g.ids_per_chunk, weights=used,
                                    minlength=g.num_chunks) if g.num_slots else np.zeros(0)
            for stride, row in tier.class_stats().items():
                out = classes.setdefault(stride, {"slot_bytes": stride, "blocks": 0, "block_bytes": 0, "tiers": {}})
                mine = g.strides == stride
                held = np.array([tier.allocator.chunk_class(c) == stride for c in range(g.num_chunks)]) \
                    if not g.single else mine
                out["tiers"][tier.name] = row
                out["blocks"] += row["used_slots"] - (granted.get(stride, 0) if t == 0 else 0)
                out["block_bytes"] += int(per_chunk[held].sum())
        total_slots = total_blocks = 0
        for out in classes.values():
            slot_bytes = out["blocks"] * out["slot_bytes"]
            out["rounding_loss"] = 1 - out["block_bytes"] / slot_bytes if slot_bytes else 0.0
            total_slots += slot_bytes
            total_blocks += out["block_bytes"]
        return {"size_classes": self.classes.describe(),
                "classes": [classes[s] for s in sorted(classes)],
                "rounding_loss": 1 - total_blocks / total_slots if total_slots else 0.0}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (all called with the lock held) -----------------------------------------

    def _present(self, keys: Sequence[bytes]) -> list[bool]:
        """Per key: committed and not deleted. Runs at C speed; keys are checked only on a miss
        (a malformed key can never be present, so a batch without misses is well-formed)."""
        if not isinstance(keys, (list, tuple)):
            raise InvalidKeyError(f"keys must be a list or tuple of bytes, got {type(keys).__name__}")
        try:
            flags = list(map(self._visible.__contains__, keys))
        except TypeError:  # an unhashable key: a bytearray passes (as its bytes), anything else raises
            flags = list(map(self._visible.__contains__, check_keys(keys)))
        if not all(flags):
            check_keys(keys)
        return flags

    def check_layout(self, layout: Layout) -> int:
        """The size class (slot stride) blocks of `layout` go to; InvalidLayoutError if none fits.

        A layout keeps the class it first got, so its blocks never change class as others appear."""
        if not isinstance(layout, Layout):
            raise InvalidLayoutError(f"layout must be a Layout, got {type(layout).__name__}")
        stride = self._layout_class.get(layout.id)
        if stride is not None:
            return stride
        with self._lock:
            stride = self._layout_class.get(layout.id)
            if stride is None:
                stride = self.classes.class_for(layout.block_nbytes, sorted(self._strides), self._largest)
                if stride is None:
                    raise InvalidLayoutError(self._refusal(layout))
                self._strides.add(stride)
                self._layout_class[layout.id] = stride
                loss = rounding_loss(layout.block_nbytes, stride)
                log.log(logging.WARNING if loss > 0.25 and layout.block_nbytes >= 3 * 4096 else logging.INFO,
                        "layout %s: blocks of %d bytes go to the size class of %d-byte slots (%.1f%% lost to "
                        "rounding)", layout.model_id, layout.block_nbytes, stride, 100 * loss)
            return stride

    def _refusal(self, layout: Layout) -> str:
        """Why no class takes a layout's blocks, and what to change."""
        nbytes, c = layout.block_nbytes, self.classes
        head = f"layout {layout.model_id} has blocks of {nbytes} bytes; "
        if c.single:
            return (head + f"this store's slots hold {c.slot_nbytes} (raise slot_bytes, or unset it so that "
                    "block sizes are derived from the layouts seen)")
        if nbytes > self._largest:
            return (head + f"the largest slot this store's tiers hold is {self._largest} bytes (a chunk; "
                    "raise chunk_bytes, or the tier sizes: a tier smaller than 8 chunks has smaller chunks)")
        return (head + f"no size class fits them: {c.describe()} (add a size of at least {nbytes} "
                "to block_sizes, or add auto)")

    @staticmethod
    def _meta(entry: BlockEntry) -> SlotMeta:
        return SlotMeta(entry.key, entry.layout_id, entry.nbytes, entry.parent, entry.checksum)

    def _pin(self, layout: Layout, keys: list[bytes]) -> list[BlockEntry | None]:
        pinned: list[BlockEntry | None] = []
        try:
            for key in keys:
                entry = self._index.get(key)
                while entry is not None and entry.state is BlockState.MOVING:
                    self._moved.wait()
                    entry = self._index.get(key)
                if entry is None or entry.state is not BlockState.READY:
                    pinned.append(None)
                    continue
                if entry.layout_id != layout.id:
                    raise LayoutMismatchError(
                        f"block {key.hex()} was stored under layout {entry.layout_id.hex()}, "
                        f"not {layout.model_id}'s {layout.id.hex()}")
                entry.pin()
                pinned.append(entry)
        except BaseException:
            for entry in pinned:
                if entry is not None:
                    self._unpin(entry)
            raise
        return pinned

    def _unpin(self, entry: BlockEntry) -> None:
        entry.unpin()
        if entry.state is BlockState.DOOMED and entry.pins == 0:
            entry.transition("release")
            self._release_slot(entry.tier, entry.slot, erase=True)

    def _reserve(self, t: int, stride: int, n: int) -> list[int]:
        """Up to n free slots of class `stride` in tier t, taking a chunk from another class or
        evicting (demoting) as needed. May release the lock."""
        allocator = self.tiers[t].allocator
        if self._fenced:
            self._reap_fenced()
        if self._several:
            self._note_demand(t, stride, n)
        slots: list[int] = []
        takes = 0
        while len(slots) < n:
            slot = allocator.alloc(stride)
            if slot is not None:
                slots.append(slot)
                continue
            if self._several and takes <= n and self._take_chunk(t, stride, starving=False):
                takes += 1
                continue
            freed = self._evict(t, stride, n - len(slots))
            if not freed:
                if self._several and takes <= n and self._take_chunk(t, stride, starving=True):
                    takes += 1
                    continue
                break
            slots.extend(freed)
        for slot in slots:
            self.tiers[t].begin_write(slot)  # readers of the slot's old bytes must see a change
        return slots

    def _class_policy(self, t: int, stride: int) -> EvictionPolicy:
        policy = self._policies[t].get(stride)
        if policy is None:
            g = self.tiers[t].geometry
            capacity = max(1, g.num_chunks * g.slots_per_chunk(stride))
            policy = self._policies[t][stride] = make_policy(self._policy_name, capacity, self._has_children)
        return policy

    def _policy_of(self, entry: BlockEntry) -> EvictionPolicy:
        """The policy of the block's tier and class (its slot's)."""
        return self._class_policy(entry.tier, self.tiers[entry.tier].stride_of(entry.slot))

    def _touch(self, entry: BlockEntry) -> None:
        """A READY block was read: its policy, and its owner's order of blocks, hear of it."""
        self._policy_of(entry).touch(entry.key)
        if entry.owner:
            self._usage.touched(entry.tier, entry.slot)

    def _occupy(self, t: int, slot: int, entry: BlockEntry) -> None:
        self._nbytes[t][slot] = entry.nbytes
        self._usage.occupied(t, slot, entry.key, entry.owner, entry.nbytes)
        if self._several:
            self._occupants[t][slot] = entry

    def _vacate(self, t: int, slot: int) -> None:
        self._usage.vacated(t, slot, int(self._nbytes[t][slot]))
        self._nbytes[t][slot] = 0
        if self._several:
            self._occupants[t].pop(slot, None)

    def _note_demand(self, t: int, stride: int, n: int) -> None:
        """Counts bytes asked of a class in tier t; halves every count once they pass 4x the tier."""
        demand = self._demand[t]
        demand[stride] = demand.get(stride, 0.0) + n * stride
        if sum(demand.values()) > 4 * self.tiers[t].geometry.data_bytes:
            for s in demand:
                demand[s] /= 2

    def _take_chunk(self, t: int, stride: int, starving: bool) -> bool:
        """Empties a chunk of another class of tier t (demoting its blocks) and gives it back to
        the pool, where class `stride` finds it. Only when `stride` holds less than its share of
        the tier's chunks and the donor more than its own (the share: a class's part of the
        bytes recently asked of the tier), or when `stride` has nothing it could evict itself
        (`starving`: it holds no chunk, or only pinned blocks). Returns whether a chunk was freed."""
        tier = self.tiers[t]
        alloc, g = tier.allocator, tier.geometry
        if stride > g.chunk_bytes:
            return False
        held = alloc.classes()
        demand = self._demand[t]
        total = sum(demand.values()) or 1.0

        def share(s: int) -> float:
            return g.num_chunks * demand.get(s, 0.0) / total

        mine = held.get(stride, 0)
        if not starving and (mine + 1 > share(stride)):
            return False
        donors = sorted(((n - share(s), s) for s, n in held.items()
                         if s != stride and (starving or n - 1 >= share(s))), reverse=True)
        occupants = self._occupants[t]
        for _, donor in donors:
            for chunk in alloc.chunks_held(donor)[:8]:  # the emptiest first; a few tries per donor
                victims = []
                for slot in alloc.used_in(chunk):
                    entry = occupants.get(slot)
                    if (entry is None or entry.tier != t or entry.slot != slot or not entry.evictable
                            or self._index.get(entry.key) is not entry):
                        break  # pinned, being written or moved, or a fenced writer's slot
                    victims.append(entry)
                else:
                    for entry in victims:
                        self._policy_of(entry).remove(entry.key)
                    for slot in self._evict_entries(t, donor, victims):
                        self._release_slot(t, slot)
                    self._chunks_taken[t] += 1
                    return True
        return False

    def _evict(self, t: int, stride: int, n: int) -> list[int]:
        """Frees up to n slots of class `stride` in tier t by demoting victims (dropping them
        from the bottom tier)."""
        tier = self.tiers[t]
        for slot, key in tier.take_touched():  # read without the store: a second chance
            entry = self._index.get(key)
            if entry is not None and entry.tier == t and entry.slot == slot and entry.state is BlockState.READY:
                self._touch(entry)
        policy = self._policies[t].get(stride)
        if policy is None:
            return []
        victims: list[BlockEntry] = []
        for key in policy.candidates():
            entry = self._index[key]
            if entry.evictable:
                victims.append(entry)
                if len(victims) == n:
                    break
        if not victims:
            return []
        for entry in victims:
            policy.remove(entry.key)
        return self._evict_entries(t, stride, victims)

    def _evict_entries(self, t: int, stride: int, victims: list[BlockEntry]) -> list[int]:
        """Demotes victims of class `stride` out of tier t (drops them from the bottom tier),
        already out of their policy. Returns their old slots, for the caller."""
        freed = [entry.slot for entry in victims]
        for slot in freed:
            self._vacate(t, slot)
        if t + 1 < len(self.tiers):
            for entry in victims:
                entry.transition("start_move")
            movable = self._within_quota(t + 1, victims)  # the rest: their owners are over quota below
            dst_slots = self._reserve(t + 1, stride, len(movable))
            self._move(movable[:len(dst_slots)], t + 1, dst_slots)
            moving = set(map(id, movable[:len(dst_slots)]))
            unmoved = [e for e in victims if id(e) not in moving]
            for entry in unmoved:
                if entry.state is BlockState.DOOMED:
                    entry.transition("release")
                else:
                    entry.transition("finish_move")
                    self._drop(entry)
        else:
            for entry in victims:
                self._drop(entry)
        self._moved.notify_all()
        return freed

    def _within_quota(self, t: int, entries: list[BlockEntry]) -> list[BlockEntry]:
        """Of blocks about to go into tier t, those within their owners' quotas there (in order),
        after demoting the owners' own least recently used blocks of tier t to make room. May
        release the lock."""
        need: dict[int, int] = {}
        for entry in entries:
            if entry.owner:
                need[entry.owner] = need.get(entry.owner, 0) + entry.nbytes
        room: dict[int, int] = {}
        for owner, nbytes in need.items():
            left = self._usage.room(t, owner)
            if left is not None and nbytes > left:
                self._evict_own(t, owner, nbytes - left)
                left = self._usage.room(t, owner)
            if left is not None:
                room[owner] = left
        if not room:
            return entries
        fits = []
        for entry in entries:
            left = room.get(entry.owner)
            if left is not None:
                if entry.nbytes > left:
                    continue
                room[entry.owner] = left - entry.nbytes
            fits.append(entry)
        return fits

    def _evict_own(self, t: int, owner: int, nbytes: int) -> None:
        """Demotes (drops, from the bottom tier) at least `nbytes` of owner's blocks in tier t,
        least recently used first, as far as its unpinned blocks go."""
        victims: list[BlockEntry] = []
        freed = 0
        for key in self._usage.oldest(t, owner):
            entry = self._index.get(key)
            if entry is not None and entry.tier == t and entry.evictable:
                victims.append(entry)
                freed += entry.nbytes
                if freed >= nbytes:
                    break
        by_class: dict[int, list[BlockEntry]] = {}
        for entry in victims:
            self._policy_of(entry).remove(entry.key)
            by_class.setdefault(self.tiers[t].stride_of(entry.slot), []).append(entry)
        for stride, group in by_class.items():
            for slot in self._evict_entries(t, stride, group):
                self._release_slot(t, slot)

    def _move(self, entries: list[BlockEntry], dst: int, dst_slots: list[int],
              sources: list[torch.Tensor] | None = None) -> None:
        """Copies MOVING entries into dst's slots with the lock released, then settles them.

        The entries' old slots are left to the caller. `sources` (optional) are buffers already
        holding the blocks' bytes, used instead of reading the old tier.
        """
        if not entries:
            return
        src = entries[0].tier
        dst_tier, src_tier = self.tiers[dst], self.tiers[src]
        metas = [self._meta(e) for e in entries]
        self._lock.release()
        try:
            if sources is not None:
                errors = dst_tier.write_many(list(zip(dst_slots, sources, metas)))
            elif dst_tier.view(dst_slots[0]) is not None:
                errors = src_tier.read_many([(e.slot, dst_tier.view(s), m) for e, s, m in zip(entries, dst_slots, metas)])
            else:
                errors = dst_tier.write_many([(s, src_tier.view(e.slot), m) for e, s, m in zip(entries, dst_slots, metas)])
        except BaseException as e:
            errors = [e] * len(entries)
        finally:
            self._lock.acquire()
        moved: list[BlockEntry] = []
        for entry, slot, err in zip(entries, dst_slots, errors):
            if entry.state is BlockState.DOOMED:
                entry.transition("release")
                self._release_slot(dst, slot, erase=True)
                continue
            entry.transition("finish_move")
            if err is not None:
                log.warning("moving block %s from %s to %s failed: %s", entry.key.hex(), src_tier.name,
                            dst_tier.name, err)
                self._counters["corrupt_dropped" if isinstance(err, CorruptBlockError) else "io_errors"] += 1
                self._release_slot(dst, slot)
                self._drop(entry)
                continue
            src_tier.withdraw(entry.key)
            entry.tier, entry.slot = dst, slot
            self._occupy(dst, slot, entry)
            dst_tier.publish(slot, self._meta(entry))
            self._policy_of(entry).insert(entry.key)
            moved.append(entry)
        if dst > src:
            self._tier_counters[src].demotions += len(moved)
        else:
            self._tier_counters[dst].promotions += len(moved)
        self._emit([BlockRemoved([e.key for e in moved], src_tier.medium)] if moved else [])
        self._emit(stored_events([e.key for e in moved], [e.parent for e in moved], dst_tier.medium))
        self._moved.notify_all()

    def _promote(self, hits: list[tuple[BlockEntry, torch.Tensor | None]]) -> None:
        """Moves blocks from lower tiers into the top tier: from the buffers they were just read
        into where given (no second read), else from the tier they are in."""
        hits = [(e, row) for e, row in hits if e.evictable]
        for entry, _ in hits:
            entry.transition("start_move")
            self._policy_of(entry).remove(entry.key)
        by_class: dict[int, list[tuple[BlockEntry, torch.Tensor | None]]] = {}
        for hit in hits:  # a block keeps its class in every tier
            by_class.setdefault(self.tiers[hit[0].tier].stride_of(hit[0].slot), []).append(hit)
        for stride, group in by_class.items():
            self._promote_class(stride, group)

    def _promote_class(self, stride: int, hits: list[tuple[BlockEntry, torch.Tensor | None]]) -> None:
        slots = self._reserve(0, stride, len(hits))
        for entry, _ in hits[len(slots):]:  # no room up there: stay where they are
            if entry.state is BlockState.DOOMED:
                entry.transition("release")
                self._release_slot(entry.tier, entry.slot, erase=True)
            else:
                entry.transition("finish_move")
                self._policy_of(entry).insert(entry.key)
        hits = hits[:len(slots)]
        by_tier: dict[int, list[int]] = {}
        for i, (entry, _) in enumerate(hits):
            by_tier.setdefault(entry.tier, []).append(i)
        for t, idx in by_tier.items():
            group = [hits[i][0] for i in idx]
            old_slots = [e.slot for e in group]
            sources = [hits[i][1] for i in idx]
            self._move(group, 0, [slots[i] for i in idx], sources=None if sources[0] is None else sources)
            for slot in old_slots:
                # Erased, so a block deleted later up there cannot come back from here at restart.
                self._release_slot(t, slot, erase=True)

    def _begin_writes(self, layout: Layout, keys: list[bytes], parents: list[bytes | None],
                      owner: str | None = None) -> tuple[list[BlockEntry], int, list[bytes]]:
        """WRITING entries with top-tier slots for the keys not present, in order.

        Returns (the entries, how many keys were present, the keys that found no room, or no
        room within the owner's quota). May release the lock while making room; the entries
        are in the index all along, so a concurrent writer of the same key sees them.
        """
        self._counters["puts"] += len(keys)
        stride = self._layout_class[layout.id]  # check_layout found it
        owner_id = self._usage.owner_id(owner)
        present = 0
        fresh: list[BlockEntry] = []
        for key, parent in zip(keys, parents):
            if key in self._index:
                present += 1
                continue
            entry = BlockEntry(key, layout.id, layout.block_nbytes, 0, -1, parent, owner=owner_id)
            self._index[key] = entry
            fresh.append(entry)
        allowed = len(self._within_quota(0, fresh))  # the owner's own blocks make room first
        slots = self._reserve(0, stride, allowed)
        for entry, slot in zip(fresh, slots):
            entry.slot = slot
            self._occupy(0, slot, entry)
        rejected = fresh[len(slots):]
        for entry in rejected:
            self._settle_unwritten(entry)
        self._counters["put_present"] += present
        self._counters["put_rejected"] += len(rejected)
        return fresh[:len(slots)], present, [e.key for e in rejected]

    def _commit_writes(self, entries: list[BlockEntry], errors: Sequence[Exception | None] | None = None) -> int:
        """Makes written entries visible; one deleted meanwhile, or whose write failed, is released."""
        committed: list[BlockEntry] = []
        for entry, err in zip(entries, errors or [None] * len(entries)):
            if err is not None or entry.state is BlockState.DOOMED:
                self._counters["io_errors"] += err is not None
                self._settle_unwritten(entry)
                continue
            entry.transition("commit")
            committed.append(entry)
        # Reverse order: a chain's leaf is inserted first, so its root is the most recent.
        for entry in reversed(committed):
            self._policy_of(entry).insert(entry.key)
            self._visible.add(entry.key)
            self._link(entry)
            self.tiers[0].publish(entry.slot, self._meta(entry))
        self._emit(stored_events([e.key for e in committed], [e.parent for e in committed], self.tiers[0].medium))
        return len(committed)

    def _settle_unwritten(self, entry: BlockEntry, hold_slot: bool = False) -> None:
        """Ends a WRITING (or, if deleted meanwhile, DOOMED) entry that will not commit. With
        `hold_slot` (a fenced writer) the slot is freed only after the fence's grace period."""
        entry.transition("release" if entry.state is BlockState.DOOMED else "abort")
        if self._index.get(entry.key) is entry:
            del self._index[entry.key]
        if hold_slot:
            self._fenced.append((time.monotonic() + self.fence_grace_s, 0, entry.slot))
        else:
            self._release_slot(0, entry.slot, erase=True)

    def _reap_fenced(self) -> None:
        """Frees fenced slots whose grace period is over."""
        now = time.monotonic()
        due = [f for f in self._fenced if f[0] <= now]
        if due:
            self._fenced = [f for f in self._fenced if f[0] > now]
            for _, t, slot in due:
                self._release_slot(t, slot, erase=True)

    def _drop(self, entry: BlockEntry) -> None:
        """Evicts a READY, unpinned block out of the store (its slot is the caller's)."""
        self.tiers[entry.tier].withdraw(entry.key)
        entry.transition("drop")
        self._forget(entry)
        self._tier_counters[entry.tier].evictions += 1
        self._emit([BlockRemoved([entry.key], self.tiers[entry.tier].medium)])

    def _discard(self, entry: BlockEntry, announce: bool = True) -> None:
        """Deletes a block now if nobody holds it, else dooms it for its last holder to release."""
        if entry.state in (BlockState.DOOMED, BlockState.FREED):
            return
        was_visible = entry.visible  # committed: linked to its parent and announced
        if was_visible:
            self.tiers[entry.tier].withdraw(entry.key)
        if entry.state is BlockState.READY:
            self._policy_of(entry).remove(entry.key)
        if entry.evictable:
            entry.transition("drop")
            self._release_slot(entry.tier, entry.slot, erase=True)
        else:
            entry.transition("doom")
        self._forget(entry, linked=was_visible)
        if announce and was_visible:
            self._emit([BlockRemoved([entry.key], self.tiers[entry.tier].medium)])

    def _forget(self, entry: BlockEntry, linked: bool = True) -> None:
        if self._index.get(entry.key) is entry:
            del self._index[entry.key]
            if linked:
                self._visible.discard(entry.key)
                self._unlink(entry)

    def _link(self, entry: BlockEntry) -> None:
        if entry.parent is not None:
            count = self._children.get(entry.parent, 0) + 1
            self._children[entry.parent] = count
            if count == 1:
                self._children_changed(entry.parent, True)

    def _unlink(self, entry: BlockEntry) -> None:
        if entry.parent is not None:
            left = self._children.get(entry.parent, 0) - 1
            if left > 0:
                self._children[entry.parent] = left
            elif self._children.pop(entry.parent, None) is not None:
                self._children_changed(entry.parent, False)

    def _children_changed(self, parent: bytes, has_children: bool) -> None:
        """Tells the policy of the parent's tier, if the parent is stored: its eviction order
        depends on it. A parent in no policy now (being written or moved) is asked on insert."""
        entry = self._index.get(parent)
        if entry is not None and entry.slot >= 0:
            self._policy_of(entry).set_has_children(parent, has_children)

    def _release_slot(self, t: int, slot: int, erase: bool = False) -> None:
        if slot < 0:
            return
        self._vacate(t, slot)
        if erase:
            try:
                self.tiers[t].erase(slot)
            except (OSError, TierIOError) as e:  # the slot is free all the same; its header may linger
                self._counters["io_errors"] += 1
                log.warning("erasing slot %d of the %s tier failed: %s", slot, self.tiers[t].name, e)
        self.tiers[t].allocator.free(slot)

    def _emit(self, events: list[Event]) -> None:
        if events and self._listener is not None:
            self._listener(events)

    def _recover(self) -> None:
        """Indexes the blocks durable tiers found at open."""
        for t, tier in enumerate(self.tiers):
            indexed = []
            for slot, meta in tier.recovered():
                if meta.key in self._index:  # the same block in two tiers: keep the upper copy
                    self._release_slot(t, slot)
                    continue
                entry = BlockEntry(meta.key, meta.layout_id, meta.nbytes, t, slot, meta.parent, BlockState.READY,
                                   meta.checksum)
                self._index[meta.key] = entry
                self._visible.add(meta.key)
                self._strides.add(tier.stride_of(slot))  # a class found on disk stays a class
                self._occupy(t, slot, entry)
                self._policy_of(entry).insert(meta.key)
                self._link(entry)
                indexed.append(meta)
            if indexed:
                self._emit(stored_events([m.key for m in indexed], [m.parent for m in indexed], tier.medium))
