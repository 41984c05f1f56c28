"""What the connector accepts of vLLM's KV cache config, and the extras it folds into block keys.

No store and no engine here: KVCacheConfig objects as vLLM builds them, and vLLM's own block
hashing (vllm/v1/core/kv_cache_utils.py) as the reference for the key extras.
"""
from __future__ import annotations

import types

import msgpack
import numpy as np
import pytest
import torch

from vllm_support import needs_vllm

pytestmark = [pytest.mark.vllm, needs_vllm]

LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SHAPE = dict(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32)


def vllm_config():
    return types.SimpleNamespace(model_config=types.SimpleNamespace(model="tiny", revision=None),
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=1))


def kv_cache_config(*groups):
    """KVCacheConfig of (layer names, spec) groups."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    return KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(names), spec) for names, spec in groups])


def derive(*groups):
    from kvstore.connectors.vllm_keys import derive_layout

    return derive_layout(vllm_config(), kv_cache_config(*groups), 0)


def test_full_attention_is_accepted():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    layout = derive((LAYERS, FullAttentionSpec(**SHAPE)))
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_tokens) == (2, 2, 32, 128)


def test_a_sliding_window_promoted_to_full_attention_is_accepted():
    """vLLM turns a hybrid model's sliding-window layers into FullAttentionSpec (window recorded)
    when its hybrid KV cache manager is off, as it is with this connector: every block is kept."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    assert derive((LAYERS, FullAttentionSpec(**SHAPE, sliding_window=64))).num_layers == 2


def test_a_sliding_window_model_is_refused_naming_the_layer_and_spec():
    """SlidingWindowSpec is an AttentionSpec, but vLLM frees its out-of-window blocks mid-request."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[0]} has SlidingWindowSpec.*sliding_window=64"):
        derive((LAYERS, SlidingWindowSpec(**SHAPE, sliding_window=64)))


def test_every_group_and_layer_is_checked():
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
        UniformTypeKVCacheSpecs,
    )

    full, sliding = FullAttentionSpec(**SHAPE), SlidingWindowSpec(**SHAPE, sliding_window=64)
    # A hybrid model in two groups: the second group's layer is named, not just "two groups".
    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[1]} has SlidingWindowSpec"):
        derive((LAYERS[:1], full), (LAYERS[1:], sliding))
    # Several layer specs in one group: each is looked at.
    mixed = UniformTypeKVCacheSpecs(block_size=128, kv_cache_specs={LAYERS[0]: full, LAYERS[1]: sliding})
    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[1]} has SlidingWindowSpec"):
        derive((LAYERS, mixed))
    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[0]} has ChunkedLocalAttentionSpec"):
        derive((LAYERS, ChunkedLocalAttentionSpec(**SHAPE, attention_chunk_size=64)))
    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[0]} has MLAAttentionSpec"):
        derive((LAYERS, MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32)))
    with pytest.raises(NotImplementedError, match=rf"layer {LAYERS[0]} has a non-causal FullAttentionSpec"):
        derive((LAYERS, FullAttentionSpec(**SHAPE, non_causal=True)))
    # Full attention throughout, but in two groups (or shapes): one layout cannot describe it.
    with pytest.raises(NotImplementedError, match="2 KV cache group"):
        derive((LAYERS[:1], full), (LAYERS[1:], full))


# -- key extras ----------------------------------------------------------------------------------

def vllm_request(tokens, *, mm=(), lora=None, cache_salt=None):
    """A vLLM Request; mm: (identifier, offset, length) of each multimodal input."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm.v1.request import Request

    features = [MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                      mm_position=PlaceholderRange(offset=offset, length=length))
                for ident, offset, length in mm]
    return Request("r", list(tokens), SamplingParams(max_tokens=1), None, mm_features=features or None,
                   lora_request=LoRARequest(*lora) if lora else None, cache_salt=cache_salt)


def vllm_extra_keys(request, block_size: int) -> list[tuple]:
    """vLLM's prefix-cache extra keys of each full block, as its block hasher computes them, in
    vLLM 0.32's tagged form: ("mm", identifier, offset), ("lora", name, path), ("cache_salt", salt).
    vLLM 0.29 hashed them untagged, (identifier, offset), the LoRA's name alone and the salt as
    is: those become ("mm", ...), ("lora", name, None) and ("cache_salt", salt) here."""
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    keys, mm_idx = [], 0
    for start in range(0, request.num_tokens - block_size + 1, block_size):
        extra, mm_idx = generate_block_hash_extra_keys(request, start, start + block_size, mm_idx)
        keys.append(tuple(_tagged(k, request) for k in extra or ()))
    return keys


def _tagged(key, request):
    if isinstance(key, tuple) and key and key[0] in ("mm", "lora", "cache_salt"):
        return key  # vLLM 0.32
    if isinstance(key, tuple):
        return ("mm", *key)
    if request.lora_request is not None and key == request.lora_request.lora_name:
        return ("lora", key, None)
    return ("cache_salt", key)


@pytest.mark.parametrize("seed", range(20))
def test_multimodal_extras_are_vllms(seed):
    """Per block, the multimodal inputs the connector folds into the key (identifier, offset
    relative to the block) are exactly those vLLM's own prefix cache hashes into it."""
    from kvstore.connectors.vllm_keys import cache_extras

    rng = np.random.default_rng(seed)
    block, n = 16, int(rng.integers(40, 120))
    mm, pos = [], int(rng.integers(0, 20))
    while pos < n:
        length = int(rng.integers(1, 40))
        mm.append((f"img-{len(mm)}-{seed}", pos, min(length, n - pos)))
        pos += length + int(rng.integers(0, 30))
    request = vllm_request(range(3, 3 + n), mm=mm)
    extra, block_extra = cache_extras(request, block)
    assert extra == b""  # no LoRA, no salt
    for i, keys in enumerate(vllm_extra_keys(request, block)):
        theirs = [[ident, offset] for tag, ident, offset in keys if tag == "mm"]
        ours = msgpack.unpackb(block_extra[i])["mm"] if i in block_extra else []
        assert ours == theirs, (i, mm)


def test_lora_and_cache_salt_extras_are_vllms():
    from kvstore.connectors.vllm_keys import cache_extras

    request = vllm_request(range(3, 40), lora=("adapter", 3, "/adapters/a"), cache_salt="tenant-7")
    extra, block_extra = cache_extras(request, 16)
    first = vllm_extra_keys(request, 16)[0]
    # vLLM 0.29 hashed the adapter's name only; the connector keys its path too (so a name
    # re-pointed at another adapter never reuses KV), as vLLM 0.32 does.
    assert {k[:2] for k in first} == {("lora", "adapter"), ("cache_salt", "tenant-7")}
    assert all(k[2] == "/adapters/a" for k in first if k[0] == "lora" and k[2] is not None)
    assert msgpack.unpackb(extra) == {"lora": ["adapter", "/adapters/a"], "cache_salt": "tenant-7"}
    assert block_extra == {}
    # The LoRA's int id is not an input of its KV (vLLM does not hash it either); its path is.
    assert cache_extras(vllm_request(range(3, 40), lora=("adapter", 9, "/adapters/a"), cache_salt="tenant-7"),
                        16)[0] == extra
    assert cache_extras(vllm_request(range(3, 40), lora=("adapter", 3, "/adapters/b"), cache_salt="tenant-7"),
                        16)[0] != extra
    assert cache_extras(vllm_request(range(3, 40)), 16) == (b"", {})
