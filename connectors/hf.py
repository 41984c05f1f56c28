"""Hugging Face transformers connector: DynamicCache <-> kvstore blocks, prefill and decode.

Works for any decoder whose cache is a `DynamicCache` of `[batch, kv_heads, seq, head_dim]`
layers (Llama, Mistral, Qwen, ...; GQA and MQA included: the layout takes the KV head count).

- `prefill(model, ids, client, layout)` runs a prompt, reusing any stored prefix, and saves each
  layer's KV to the store as soon as the model finishes that layer (a forward hook queues the
  copy; it overlaps the next layer's compute). Returns the first token and a handoff Handle.
- `decode(model, ids, first_token, client, handle)` rebuilds the cache from the store on another
  worker, recomputes whatever did not arrive, and generates greedily.
- `first_token(model, ids, client, layout)` is the decode side's time-to-first-token path
  without a prefill worker: load the longest stored prefix, compute the rest.
- `Worker` wraps a model and a kvstore client for a Ray actor on one node (`WorkerActor`).

Batch size 1; greedy decoding (the point is the KV path, not sampling).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import ray
import torch

from kvstore.connectors.handoff import Handle, Loaded, SaveSession, load
from kvstore.errors import InvalidLayoutError
from kvstore.layout import Layout

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def layout_for(config, model_id: str, block_tokens: int = 16, dtype: torch.dtype = torch.float32) -> Layout:
    """The block layout of a transformers model config (KV heads and head dim from the config)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if dtype not in _DTYPE_NAMES:
        raise InvalidLayoutError(f"dtype={dtype} is not supported by the transformers connector")
    return Layout(model_id, config.num_hidden_layers, kv_heads, head_dim, _DTYPE_NAMES[dtype], block_tokens)


def cache_from(loaded: Loaded | None, config) -> "DynamicCache":  # noqa: F821
    """A DynamicCache holding the loaded prefix (empty without one, or if nothing was usable)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if loaded is not None and loaded.num_tokens:
        for i in range(loaded.layout.num_layers):
            k, v = loaded.layer(i)
            cache.update(k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), i)
    return cache


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers


@dataclasses.dataclass
class PrefillResult:
    first_token: int
    logits: torch.Tensor  # the first token's logits
    handle: Handle
    reused_tokens: int  # prompt tokens whose KV came from the store instead of being computed
    seconds: float


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, client, layout: Layout, namespace: str = "default",
            reuse: bool = True, lease_ttl_s: float | None = None) -> PrefillResult:
    """Runs the prompt (reusing the longest stored prefix), saving every layer as it finishes."""
    start = time.perf_counter()
    ids = input_ids[0].tolist()
    loaded = load(client, token_ids=ids, layout=layout, namespace=namespace, max_tokens=len(ids) - 1) \
        if reuse else None
    reused = loaded.num_tokens if loaded else 0
    cache = cache_from(loaded, model.config)
    session = SaveSession(client, layout, ids, namespace)

    def save(i: int):
        def hook(module, args, output):
            layer = cache.layers[i]
            session.save_layer(i, layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
        return hook

    hooks = [layer.register_forward_hook(save(i)) for i, layer in enumerate(_decoder_layers(model))]
    try:
        out = model(input_ids[:, reused:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    except BaseException:
        session.abort()
        raise
    finally:
        for h in hooks:
            h.remove()
    handle = session.finish(lease_ttl_s)
    logits = out.logits[0, -1]
    return PrefillResult(int(logits.argmax()), logits, handle, reused, time.perf_counter() - start)


@dataclasses.dataclass
class DecodeResult:
    tokens: list[int]  # the first token (from prefill) and the generated ones
    logits: list[torch.Tensor]  # logits of each generated token after the first
    loaded_tokens: int  # prompt tokens whose KV came from the store
    recomputed_tokens: int  # prompt tokens this side had to compute
    sources: list  # per block: (node, "local"/"remote") or None
    load_seconds: float


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, first_token: int, client, handle: Handle,
           max_new_tokens: int) -> DecodeResult:
    """Continues a request prefilled elsewhere: its KV from the store, then greedy decoding."""
    start = time.perf_counter()
    loaded = load(client, handle)
    cache = cache_from(loaded, model.config)
    load_seconds = time.perf_counter() - start
    n = input_ids.shape[1]
    if loaded.num_tokens < n:  # the tail block, or everything after a lost block
        model(input_ids[:, loaded.num_tokens:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens, logits = [first_token], []
    for _ in range(max_new_tokens - 1):
        step = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
        logits.append(step)
        tokens.append(int(step.argmax()))
    return DecodeResult(tokens, logits, loaded.num_tokens, n - loaded.num_tokens, loaded.sources, load_seconds)


@torch.no_grad()
def first_token(model, input_ids: torch.Tensor, client=None, layout: Layout | None = None,
                namespace: str = "default") -> tuple[int, torch.Tensor, int]:
    """The first token of a prompt: from the longest stored prefix plus the rest computed, or
    (client None) by computing the whole prompt. Returns (token, logits, tokens loaded)."""
    n = input_ids.shape[1]
    if client is None:
        cache, done = cache_from(None, model.config), 0
    else:
        loaded = load(client, token_ids=input_ids[0].tolist(), layout=layout, namespace=namespace, max_tokens=n - 1)
        cache, done = cache_from(loaded, model.config), loaded.num_tokens
    logits = model(input_ids[:, done:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    return int(logits.argmax()), logits, done


@torch.no_grad()
def generate_reference(model, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Single-process greedy generate(): the tokens and logits any handoff must reproduce."""
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, input_ids.shape[1]:].tolist(), [step[0] for step in out.logits]


def tiny_llama(seed: int = 0, **overrides):
    """A small Llama built from a config with a fixed seed: the same weights in every process,
    no download. `initializer_range=0.1` keeps greedy output from collapsing into a 2-cycle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                    initializer_range=0.1)
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


class Worker:
    """A model and a kvstore client in one process (a Ray actor on one node, say).

    `model_factory` builds the model (e.g. functools.partial(tiny_llama, seed=0)); every worker
    of a deployment must build the same weights.
    """

    def __init__(self, model_factory: Callable, model_id: str, block_tokens: int = 16, threads: int = 1,
                 namespace: str = "default") -> None:
        import kvstore

        torch.set_num_threads(threads)  # equal thread counts keep results bit-identical
        self.model = model_factory()
        self.client = kvstore.connect()
        self.layout = layout_for(self.model.config, model_id, block_tokens)
        self.namespace = namespace
        self.node_id = self.client.node_id

    def prefill(self, token_ids: list[int], reuse: bool = True) -> dict:
        r = prefill(self.model, torch.tensor([token_ids]), self.client, self.layout, self.namespace, reuse)
        return {"first_token": r.first_token, "logits": r.logits, "handle": r.handle.to_dict(),
                "reused_tokens": r.reused_tokens, "seconds": r.seconds, "node_id": self.node_id}

    def decode(self, token_ids: list[int], first: int, handle: dict, max_new_tokens: int) -> dict:
        r = decode(self.model, torch.tensor([token_ids]), first, self.client, Handle.from_dict(handle), max_new_tokens)
        return dataclasses.asdict(r) | {"node_id": self.node_id}

    def first_token(self, token_ids: list[int], use_store: bool = True) -> dict:
        start = time.perf_counter()
        token, logits, loaded = first_token(self.model, torch.tensor([token_ids]),
                                            self.client if use_store else None, self.layout, self.namespace)
        return {"token": token, "logits": logits, "loaded_tokens": loaded, "seconds": time.perf_counter() - start}

    def reference(self, token_ids: list[int], max_new_tokens: int) -> dict:
        tokens, logits = generate_reference(self.model, torch.tensor([token_ids]), max_new_tokens)
        return {"tokens": tokens, "logits": logits}

    def pid(self) -> int:
        return os.getpid()


WorkerActor = ray.remote(num_cpus=0)(Worker)
