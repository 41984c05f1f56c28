"""The vLLM connector's scheduler side: what to load, save and check, request by request.

It runs in vLLM's engine core, beside its scheduler, and never touches KV bytes. It looks up how
much of a waiting request's prompt the store holds, decides (with the verified-restore sampler)
whether to load it, plans each step's loads, saves and checks for the workers
(`KVStoreConnectorMetadata`), tracks handoff leases and held blocks, and returns the producer's
handoff when a request finishes. `KVStoreConnector` (kvstore.connectors.vllm) delegates here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import kvstore
from kvstore.connectors.verify import Source, Verifier
from kvstore.connectors.vllm_keys import cache_extras
from kvstore.connectors.vllm_metadata import (HANDOFF_VERSION, Check, KVStoreConnectorMetadata, KVStoreWorkerMetadata,
                                              Transfer)
from kvstore.connectors.vllm_residency import HBMResidency, events_endpoint
from kvstore.connectors.vllm_settings import Settings
from kvstore.connectors.vllm_stats import Counters
from kvstore.layout import Layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.connectors.vllm")  # the connector's one logger, whichever module logs


@dataclasses.dataclass
class _Req:
    """The scheduler's state of one request."""

    keys: list[list[bytes]]            # [tp_rank][block]: every full prompt block
    prompt_len: int
    block_ids: list[int] = dataclasses.field(default_factory=list)
    saved: int = 0                     # leading blocks saved, or known to be in the store
    lookup: tuple[int, int] = (0, 0)   # (first block, end block) the last lookup could load
    pending_load: Transfer | None = None
    loading: bool = False              # an async load is in flight
    async_saves: bool = False          # async saves were sent: hold vLLM's blocks at finish
    handle_leases: list[str] = dataclasses.field(default_factory=list)
    handle_node: str | None = None     # the producer's node, while its handle is this request's
    admitted: tuple | None = None      # (first, present) -> the verifier's (usable, sources, check)
    check: tuple[int, int, list[Source]] | None = None  # (first, end block, sources): compute, then compare
    checked: int = 0                   # blocks of `check` sent to the workers so far


class KVStoreScheduler:
    """The scheduler side of one engine's connector (made by `KVStoreConnector` with role SCHEDULER)."""

    def __init__(self, vllm_config: "VllmConfig", settings: Settings, layouts: list[Layout], client) -> None:
        self.settings = settings
        self.layouts = layouts  # [tp_rank]: every rank's blocks are planned here
        tc = vllm_config.kv_transfer_config
        self._produces = tc.is_kv_producer
        self._consumes = tc.is_kv_consumer
        self._block_size = vllm_config.cache_config.block_size
        self._client = client
        self.namespace = settings.namespace or client.config.namespace
        self.counters = Counters()
        # Verified restores: this one samples the loads and keeps the quarantine.
        self.verifier = Verifier(settings.verify)
        self._reqs: dict[str, _Req] = {}
        self._told_embeds = False  # the refusal of prompt embeddings was logged
        self._sync_loaded: list[str] = []  # sync loads sent last step: release their leases
        self._held: set[str] = set()       # finished requests whose blocks wait for async saves
        # With vLLM's KV events on: which prompts' blocks this engine holds in HBM, told to kvstore.
        endpoint = events_endpoint(vllm_config)
        self.residency = HBMResidency(client, tc.engine_id, endpoint, vllm_config.kv_events_config.topic) \
            if endpoint else None

    def _req_state(self, request: "Request") -> _Req:
        """The request's state, made the first time the scheduler shows it (in
        get_num_new_matched_tokens or update_state_after_alloc, both before it is scheduled)."""
        st = self._reqs.get(request.request_id)
        if st is None:
            prompt = list(request.prompt_token_ids or [])
            if request.prompt_embeds is not None:
                # Its KV comes from the embeddings, not the ids: no key names it (vLLM hashes the
                # embeddings; kvstore does not), so it is neither loaded nor saved.
                if not self._told_embeds:
                    log.warning("kvstore connector: requests with prompt embeddings are neither loaded from nor "
                                "saved to kvstore (first: %s)", request.request_id)
                    self._told_embeds = True
                keys: list[list[bytes]] = [[] for _ in self.layouts]
            else:
                extra, block_extra = cache_extras(request, self._block_size)
                keys = [kvstore.block_keys(prompt, layout, self.namespace, extra=extra, block_extra=block_extra)
                        for layout in self.layouts]
            st = self._reqs[request.request_id] = _Req(keys=keys, prompt_len=len(prompt))
            if self.residency is not None and keys[0]:
                self.residency.learn(request.block_hashes, keys[0])
        return st

    # -- lookups ----------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """For `KVStoreConnector.get_num_new_matched_tokens`: the tokens beyond
        `num_computed_tokens` the store can supply, and whether they load asynchronously.

        Returns `(0, False)` for a producer, for no hit, when the store cannot be asked, or when the
        verified-restore sampler picks the load for a check. Otherwise `(n, load_async)` with n a
        multiple of the block size: the leading full prompt blocks present in the store, for every
        TP rank. A sync load leaves at least the last prompt token to compute; an async load may
        cover the whole prompt (vLLM recomputes the last token)."""
        if not self._consumes:
            return 0, False
        st = self._req_state(request)
        B = self._block_size
        limit = len(st.keys[0]) if self.settings.load_async else min(len(st.keys[0]), (request.num_tokens - 1) // B)
        first = num_computed_tokens // B
        if limit <= first:
            return 0, False
        self._check_handle(request, st)
        t0 = time.perf_counter()
        try:
            present = self._present(st, limit)
        except Exception as e:  # the store is unreachable: compute instead
            log.warning("kvstore lookup for request %s failed, computing it instead: %s", request.request_id, e)
            return 0, False
        self.counters.add(lookups=1, lookup_hit_blocks=present, lookup_s=time.perf_counter() - t0)
        if present <= first:
            return 0, False
        present = self._admit(request, st, first, present)
        if present <= first:
            return 0, False
        st.lookup = (first, present)
        return present * B - num_computed_tokens, self.settings.load_async

    def _present(self, st: _Req, limit: int) -> int:
        """The leading blocks (of the first `limit`) the store holds for every TP rank: one index
        call per request, whatever the TP size (every rank's keys in one batch)."""
        if len(st.keys) == 1:
            return self._client.longest_prefix(st.keys[0][:limit])
        found = self._client.contains([k for keys in st.keys for k in keys[:limit]])
        ranks = [found[r * limit:(r + 1) * limit] for r in range(len(st.keys))]
        return min(next((i for i, here in enumerate(flags) if not here), limit) for flags in ranks)

    def _admit(self, request: "Request", st: _Req, first: int, present: int) -> int:
        """Verified restores: the end block of what may be loaded of blocks first..present. The
        verifier cuts the load before the first block from a quarantined source, and when it picks
        the load for a check nothing is loaded (returns `first`): the engine computes the blocks
        and the workers compare them with the store's (`Check` in the metadata). Decided once per
        lookup result (vLLM may ask again while the request waits for room)."""
        if st.admitted is None or st.admitted[0] != (first, present):
            keys = st.keys[0][first:present]
            try:
                decision = self.verifier.admit_blocks(present - first, lambda: self._sources(keys))
            except Exception as e:  # the index cannot say where the blocks are: compute them
                log.warning("kvstore: cannot locate the blocks of request %s (%s); computing them", request.request_id,
                            e)
                return first
            st.admitted = ((first, present), decision)
            usable, sources, check = decision
            self.counters.add(verify_quarantine_skipped_blocks=present - first - usable)
            if check:
                st.check, st.checked = (first, first + usable, sources), 0
                self.counters.add(verify_requests=1, verify_request_blocks=usable)
                log.info("kvstore: request %s computes its %d stored blocks (from %s) to verify them instead of "
                         "loading them", request.request_id, usable, sorted(set(sources)))
                self._release_handle(st)  # nothing is loaded: the handoff's blocks need no pin
        usable, _, check = st.admitted[1]
        return first if check else first + usable

    def _sources(self, keys: list[bytes]) -> list[Source]:
        """Per key, the (node, medium) a load would read it from: this node if it holds it, else
        the first holder (as the client's get picks them); one index call."""
        me = self._client.node_id
        out = []
        for holders in self._client.where(keys):
            media: dict[str, str] = {}
            for node, medium in holders:
                media.setdefault(node, medium)
            node = me if me in media else next(iter(media), "?")
            out.append((node, media.get(node, "?")))
        return out

    def _check_handle(self, request: "Request", st: _Req) -> None:
        """Keeps the leases of a producer's handle whose keys are this request's own keys."""
        params = request.kv_transfer_params or {}
        if st.handle_leases or "kvstore_keys" not in params:
            return
        theirs_tp = params.get("kvstore_tp_size", 1)
        if theirs_tp != len(st.keys):
            log.error("request %s: its kvstore handle comes from a producer with tensor parallel size %s, this engine's "
                      "is %d: each rank stores its own share of a block's heads, so the handoff cannot be used "
                      "(run prefill and decode with the same tensor_parallel_size); computing the prompt instead",
                      request.request_id, theirs_tp, len(st.keys))
            return
        try:
            theirs = [bytes.fromhex(k) for k in params["kvstore_keys"]]
        except (TypeError, ValueError):
            theirs = None
        if not theirs or theirs != st.keys[0][:len(theirs)]:
            log.warning("request %s: its kvstore handle names other blocks (different tokens, LoRA, cache salt, "
                        "multimodal inputs, layout or namespace); ignoring it and looking up its own keys",
                        request.request_id)
            return
        st.handle_leases = [lease for lease in (params.get("kvstore_leases") or [params.get("kvstore_lease")]) if lease]
        st.handle_node = str(params["kvstore_node"]) if params.get("kvstore_node") else None

    # -- each step's plan -------------------------------------------------------------------------

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        """For `KVStoreConnector.update_state_after_alloc`: with external tokens, plans the load of
        the blocks the last lookup found into the request's newly allocated blocks; it goes to the
        workers in this step's metadata. Raises RuntimeError if vLLM asks for other tokens than the
        lookup offered."""
        st = self._req_state(request)
        if num_external_tokens <= 0:
            return
        B = self._block_size
        first = st.lookup[0]
        end = first + num_external_tokens // B
        if num_external_tokens % B or end > st.lookup[1]:
            raise RuntimeError(f"request {request.request_id}: vLLM asked to load {num_external_tokens} tokens after "
                               f"block {first}; the store offered blocks {st.lookup[0]}..{st.lookup[1]}")
        block_ids = list(blocks.get_block_ids()[0][first:end])
        st.pending_load = Transfer(request.request_id, block_ids, [k[first:end] for k in st.keys],
                                   is_async=self.settings.load_async, handoff_node=st.handle_node)
        st.loading = self.settings.load_async
        st.saved = max(st.saved, end)  # these blocks are in the store already

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVStoreConnectorMetadata:
        """For `KVStoreConnector.build_connector_meta`. Returns this step's work for the workers:
        the loads planned since the last call, the full prompt blocks that this step's forward
        completes (to save, and to check), and preempted requests whose async saves must finish
        before their blocks are reused. Reads `scheduler_output`, never modifies it."""
        meta = KVStoreConnectorMetadata()
        self._sync_loaded = []
        for st in self._reqs.values():
            if st.pending_load is not None:
                meta.loads.append(st.pending_load)
                if not st.pending_load.is_async:
                    self._sync_loaded.append(st.pending_load.req_id)
                st.pending_load = None
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs[new.req_id]  # made in update_state_after_alloc, which vLLM calls first
            st.block_ids = list(new.block_ids[0])
            st.saved = max(st.saved, new.num_computed_tokens // self._block_size)
            self._plan_save(meta, new.req_id, st, new.num_computed_tokens + scheduled.get(new.req_id, 0))
            self._plan_check(meta, new.req_id, st, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, st, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
            self._plan_check(meta, req_id, st, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        for req_id in scheduler_output.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            if st is not None and st.async_saves:
                meta.flush.add(req_id)
        return meta

    def _plan_save(self, meta: KVStoreConnectorMetadata, req_id: str, st: _Req, done_tokens: int) -> None:
        if not self._produces:
            return
        complete = min(min(done_tokens, st.prompt_len) // self._block_size, len(st.keys[0]), len(st.block_ids))
        if complete <= st.saved:
            return
        first = st.saved
        meta.saves.append(Transfer(req_id, st.block_ids[first:complete], [k[first:complete] for k in st.keys],
                                   [k[first - 1] if first else None for k in st.keys],
                                   is_async=self.settings.save_async))
        st.saved = complete
        st.async_saves |= self.settings.save_async

    def _plan_check(self, meta: KVStoreConnectorMetadata, req_id: str, st: _Req, done_tokens: int) -> None:
        """Verified restores: the blocks of the request's check that this step's forward
        completes go to the workers, to be compared as the forward computes them."""
        if st.check is None:
            return
        first, end, sources = st.check
        start = first + st.checked
        complete = min(done_tokens // self._block_size, end, len(st.block_ids))
        if complete <= start:
            return
        meta.checks.append(Check(req_id, st.block_ids[start:complete], [k[start:complete] for k in st.keys],
                                 sources[start - first:complete - first]))
        st.checked = complete - first
        if complete >= end:
            st.check = None

    # -- the workers' reports and the end of requests ---------------------------------------------

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        """For `KVStoreConnector.update_connector_output`: quarantines the sources the workers'
        checks found wrong, forgets held requests whose async saves are done, and releases the
        handoff leases of requests whose loads are done (sync loads of the last step; async ones
        in finished_recving)."""
        found = connector_output.kv_connector_worker_meta
        if isinstance(found, KVStoreWorkerMetadata):
            for node, medium, blocks in found.quarantine:
                if (node, medium) not in self.verifier.quarantined:
                    log.error("kvstore: quarantining source node %s medium %s (%d blocks did not match the engine's "
                              "own KV): its blocks are no longer loaded by this engine", node, medium, blocks)
                    self.counters.add(verify_quarantined_sources=1)
                self.verifier.quarantine((node, medium), blocks)
        self._held -= set(connector_output.finished_sending or ())
        done = list(self._sync_loaded) + list(connector_output.finished_recving or ())
        self._sync_loaded = []
        for req_id in done:
            st = self._reqs.get(req_id)
            if st is not None:
                st.loading = False
                self._release_handle(st)

    def _release_handle(self, st: _Req) -> None:
        leases, st.handle_leases = st.handle_leases, []
        for lease in leases:
            try:
                self._client.release_lease(lease)
            except Exception as e:  # expired or released already: nothing is pinned
                log.debug("releasing kvstore lease %s: %s", lease, e)

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        """For `KVStoreConnector.request_finished`: forgets the request. Returns (hold,
        kv_transfer_params): `hold` True while async saves of the request may still read its
        blocks; a producer's handoff dict (HANDOFF_KEYS; None if no block was stored), whose blocks
        it leases for the decode side in sync save mode."""
        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        self._release_handle(st)
        if st.async_saves:
            self._held.add(request.request_id)
        if not self._produces or st.saved == 0:
            return st.async_saves, None
        n = st.saved
        leases: list[str] = []
        if not self.settings.save_async:
            for layout, keys in zip(self.layouts, st.keys):
                try:
                    leases.append(self._client.lease(layout, keys[:n], self.settings.lease_ttl_s).lease_id)
                except Exception as e:
                    log.warning("request %s: no kvstore lease for its handoff blocks: %s", request.request_id, e)
                    break
        params = {
            "kvstore_version": HANDOFF_VERSION,
            "kvstore_keys": [k.hex() for k in st.keys[0][:n]],
            "kvstore_node": self._client.node_id,
            "kvstore_lease": leases[0] if leases else None,
            "kvstore_leases": leases,
            "kvstore_namespace": self.namespace,
            "kvstore_layout": self.layouts[0].id.hex(),
            "kvstore_tp_size": len(self.layouts),
            "num_tokens": n * self._block_size,
        }
        return st.async_saves, params

    def has_held_blocks(self) -> bool:
        """For `KVStoreConnector.has_pending_block_frees` and `has_pending_push_work`: True while
        finished requests' blocks are held for their async saves."""
        return bool(self._held)
