"""One vLLM worker's paged KV cache seen as kvstore blocks.

vLLM hands a worker its per-layer cache tensors once (`register`); from then on the worker moves
whole kvstore blocks in and out of them one layer at a time (`gather_layer`, `scatter_layer`),
through payload buffers `[n, *Layout.block_shape]` it reuses (`buffer`). The per-format
conversions are in connectors/vllm_layout.py; what is here is vLLM-specific: which format the
attention backend uses, and, on CPU, a check that vLLM's own kernel stores KV the way they read it.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kvstore.connectors import vllm_layout
from kvstore.connectors.vllm_keys import layer_names
from kvstore.layout import Layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvstore.connectors.vllm")  # the connector's one logger, whichever module logs


class PagedCache:
    """A worker's KV cache tensors, in kvstore payload order (empty until `register`)."""

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", layout: Layout) -> None:
        self._vllm_config = vllm_config
        self.layout = layout
        self.layer_names = layer_names(kv_cache_config)  # payload layer i is the cache of layer_names[i]
        self.caches: list[torch.Tensor] = []
        self._fmt = ""
        self._ratio = 1  # vLLM kernel blocks per kvstore block
        self._staging: dict[str, torch.Tensor] = {}

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The worker, once vLLM allocated its KV cache: keeps each attention layer's cache (a
        per-layer view, see connectors/vllm_layout.py), picks the conversion from the attention
        backend, and on CPU checks it against the backend's own kernel. Raises, failing engine
        start, if the caches do not match the layout or cannot be read."""
        missing = [name for name in self.layer_names if name not in kv_caches]
        if missing:
            raise ValueError(f"register_kv_caches got no cache for layers {missing}")
        self.caches = [kv_caches[name] for name in self.layer_names]
        backend = self._backend_name()
        self._fmt = vllm_layout.format_for_backend(backend, self.caches[0])
        _, tokens, heads, dim = vllm_layout.cache_geometry(self._fmt, self.caches[0])
        lay = self.layout
        if (heads, dim) != (lay.num_kv_heads, lay.head_dim) or lay.block_tokens % tokens:
            raise ValueError(f"{backend} cache of shape {tuple(self.caches[0].shape)} does not match layout "
                             f"{lay.block_shape} (layers, K|V, tokens, heads, head_dim)")
        self._ratio = lay.block_tokens // tokens
        if self._fmt == "cpu":
            self._check_cpu_kernel()
        log.info("kvstore connector: %d layers, %s cache format (%s), layout %s (%s)", len(self.caches), self._fmt,
                 backend, lay.id.hex()[:12], lay.model_id)

    def _backend_name(self) -> str:
        try:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention.attention import Attention

            layers = get_layers_from_vllm_config(self._vllm_config, Attention, self.layer_names[:1])
            return next(iter(layers.values())).attn_backend.get_name()
        except Exception as e:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                return "CPU_ATTN"
            raise RuntimeError(f"cannot tell the attention backend of layer {self.layer_names[0]}: {e}") from e

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

        cache = self.caches[0]
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

    # vLLM kernel blocks are grouped into kvstore blocks by `ratio` (see vllm_layout.py).

    def gather_layer(self, layer: int, block_ids: list[int], out: torch.Tensor) -> None:
        """The worker's saves and checks (any of its threads): one layer of n kvstore blocks into
        `out` [n, 2, T, H, D]."""
        vllm_layout.gather_layer(self._fmt, self.caches[layer], block_ids, out, ratio=self._ratio)

    def scatter_layer(self, layer: int, block_ids: list[int], src: torch.Tensor) -> None:
        """The worker's loads (forward or loader thread): one layer of n kvstore blocks from `src`
        [n, 2, T, H, D] into vLLM's blocks `block_ids`."""
        vllm_layout.scatter_layer(self._fmt, self.caches[layer], block_ids, src, ratio=self._ratio)

    def buffer(self, name: str, n: int) -> torch.Tensor:
        """The worker's loads, saves and checks. Returns a reusable staging buffer of n payloads
        `[n, *block_shape]`, one per name, grown when too small. Each name is used by one thread
        (a direction's staging buffer is reused job after job), so none is locked."""
        buf = self._staging.get(name)
        if buf is None or buf.shape[0] < n:
            buf = self._staging[name] = torch.empty((max(n, 8), *self.layout.block_shape),
                                                    dtype=self.layout.torch_dtype)
        return buf[:n]
