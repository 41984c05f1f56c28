"""What names a vLLM block in kvstore: the layout derived from vLLM's configs, and a request's key extras.

A block's key is `kvstore.block_keys(prompt_token_ids, layout, namespace, extra=...,
block_extra=...)[i]`. The layout (`derive_layout`) is the model's signature per TP rank, so
blocks of different models, dtypes or TP shapes never mix; the extras (`cache_extras`) are what
else vLLM's own prefix cache folds into a block's hash, so requests that differ in any of them
never share a block. Only models whose every layer keeps each prompt block whole and causal can
be stored at all (`_attention_group` refuses the rest at engine start).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import kvstore
from kvstore.layout import DTYPES, Layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

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
    embeddings are not here: such requests are never keyed (`KVStoreScheduler._req_state`).
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
