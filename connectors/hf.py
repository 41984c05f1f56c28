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

Every load goes through a `Verifier` (connectors/verify.py, docs/verified-restores.md): on a
sampled fraction of loads, and on every load while a source is new to this process, the loaded
prefix is recomputed and compared with what was loaded; KV that does not match is deleted from
the store, its source quarantined, and the recomputed KV used instead. The functions and the
Worker take `verify`: a Verifier, its settings (VerifySettings or a dict), or None for this
process's shared Verifier with the default settings.

Batch size 1; greedy decoding (the point is the KV path, not sampling).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import ray
import torch

from kvstore.connectors.handoff import Handle, Loaded, Loading, SaveSession, start_load
from kvstore.connectors.verify import CheckResult, VerifySettings, verifier as as_verifier
from kvstore.errors import InvalidLayoutError, KVStoreError
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


def cache_while_loading(loading: Loading, config) -> tuple["DynamicCache", Loaded]:  # noqa: F821
    """A DynamicCache built layer by layer as the load's blocks arrive, so the build overlaps the
    transfer; then, once the load is over, cut to the tokens that arrived whole and right."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(loading.layout.num_layers):
        k, v = loading.layer(i)
        cache.update(k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), i)
    loaded = loading.result()
    return _cut(cache, loaded.num_tokens, config), loaded


def _cut(cache: "DynamicCache", tokens: int, config) -> "DynamicCache":  # noqa: F821
    """The cache's first `tokens` tokens (an empty cache for none)."""
    held = cache.get_seq_length()
    if tokens == 0:
        return cache_from(None, config)
    if tokens < held:
        cache.crop(tokens - held)
    return cache


@dataclasses.dataclass
class Restored:
    """A load made ready for the engine: the cache to continue from, and what happened on the way."""

    cache: "DynamicCache"  # noqa: F821
    num_tokens: int  # prompt tokens the cache holds (loaded, or recomputed by a failed check)
    loaded_tokens: int  # of them, the tokens whose KV the engine uses from the store
    check: CheckResult | None  # None: not verified


@torch.no_grad()
def restore(model, input_ids: torch.Tensor, client, loaded: Loaded | Loading, verify=None) -> Restored:
    """A cache from a load, through the verifier: blocks from a quarantined source are a miss,
    and a load picked for a check has its prefix recomputed and compared; on a mismatch the
    recomputed KV is used (the bad blocks are gone from the store, their source quarantined).
    A load still in flight (`start_load`) has its cache built while its blocks arrive."""
    v = as_verifier(verify)
    built = None
    if isinstance(loaded, Loading):
        built, loaded = cache_while_loading(loaded, model.config)
    return _restore_admitted(model, input_ids, client, v.admit(client, loaded), v, built)


def _restore_admitted(model, input_ids: torch.Tensor, client, admission, v, built=None) -> Restored:
    """`restore` once the verifier has admitted the load; `built`: its cache, if built already."""
    loaded = admission.loaded
    n = loaded.num_tokens
    if not admission.verify:
        cache = cache_from(loaded, model.config) if built is None else _cut(built, n, model.config)
        return Restored(cache, n, n, None)
    start = time.perf_counter()
    fresh = cache_from(None, model.config)
    model(input_ids[:, :n], past_key_values=fresh, use_cache=True, logits_to_keep=1)
    recomputed = [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in fresh.layers]
    result = v.check(client, admission, recomputed, time.perf_counter() - start)
    if result.ok:
        return Restored(cache_from(loaded, model.config), n, n, result)
    return Restored(fresh, n, 0, result)


@torch.no_grad()
def forward_while_loading(model, input_ids: torch.Tensor, client, loading: Loading,
                          verify=None) -> tuple[torch.Tensor | None, Restored]:
    """Runs the prompt's tokens after the load's prefix while the load's blocks still arrive:
    decoder layer i waits only for layer i of every block (they come layer-major), so the
    transfer overlaps the forward itself. Its result is used only if, once the load is over,
    every block arrived whole and right and the verifier lets the load through unchecked;
    otherwise the forward is thrown away and the load restored as `restore` does (cut, or
    checked against a recompute), for the caller to run the forward again.

    Returns (logits of the last token, restored) when the forward stands, else (None, restored).
    The load must cover less than the whole prompt (the engine computes at least one token)."""
    from transformers import DynamicCache

    v = as_verifier(verify)
    done = len(loading.keys) * loading.layout.block_tokens
    if not 0 < done < input_ids.shape[1]:
        raise KVStoreError(f"a load of {done} tokens leaves nothing of a {input_ids.shape[1]}-token prompt to compute")
    cache = DynamicCache(config=model.config)

    def add_layer(i: int) -> None:
        k, v_ = loading.layer(i)
        cache.update(k.transpose(0, 1).unsqueeze(0), v_.transpose(0, 1).unsqueeze(0), i)

    add_layer(0)  # the forward takes the prefix's length from layer 0, before any layer runs
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: add_layer(i))
             for i, layer in enumerate(_decoder_layers(model)) if i > 0]
    try:
        logits = model(input_ids[:, done:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    admission = v.admit(client, loading.result())
    if not admission.verify and admission.loaded.num_tokens == done:
        return logits, Restored(cache, done, done, None)
    return None, _restore_admitted(model, input_ids, client, admission, v)


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
    verified: bool = False  # the reused prefix was checked against a recompute
    mismatched_blocks: int = 0  # blocks the check found wrong (deleted; recomputed KV used)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, client, layout: Layout, namespace: str = "default",
            reuse: bool = True, lease_ttl_s: float | None = None, verify=None) -> PrefillResult:
    """Runs the prompt (reusing the longest stored prefix), saving every layer as it finishes."""
    start = time.perf_counter()
    ids = input_ids[0].tolist()
    check = None
    if reuse:
        loaded = start_load(client, token_ids=ids, layout=layout, namespace=namespace, max_tokens=len(ids) - 1)
        # Before the save session: blocks a check deletes are then written again, right.
        r = restore(model, input_ids, client, loaded, verify)
        cache, done, reused, check = r.cache, r.num_tokens, r.loaded_tokens, r.check
    else:
        cache, done, reused = cache_from(None, model.config), 0, 0
    session = SaveSession(client, layout, ids, namespace)

    def save(i: int):
        def hook(module, args, output):
            layer = cache.layers[i]
            session.save_layer(i, layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1))
        return hook

    hooks = [layer.register_forward_hook(save(i)) for i, layer in enumerate(_decoder_layers(model))]
    try:
        out = model(input_ids[:, done:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    except BaseException:
        session.abort()
        raise
    finally:
        for h in hooks:
            h.remove()
    handle = session.finish(lease_ttl_s)
    logits = out.logits[0, -1]
    return PrefillResult(int(logits.argmax()), logits, handle, reused, time.perf_counter() - start,
                         check is not None, len(check.mismatches) if check else 0)


@dataclasses.dataclass
class DecodeResult:
    tokens: list[int]  # the first token (from prefill) and the generated ones
    logits: list[torch.Tensor]  # logits of each generated token after the first
    loaded_tokens: int  # prompt tokens whose KV came from the store
    recomputed_tokens: int  # prompt tokens this side had to compute
    sources: list  # per block: (node, "local"/"remote") or None
    load_seconds: float  # the load alone
    verified: bool = False  # the loaded KV was checked against a recompute
    mismatched_blocks: int = 0  # blocks the check found wrong (deleted; recomputed KV used)
    verify_seconds: float = 0.0  # the recompute a check took


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, first_token: int, client, handle: Handle,
           max_new_tokens: int, verify=None) -> DecodeResult:
    """Continues a request prefilled elsewhere: its KV from the store, then greedy decoding."""
    loading = start_load(client, handle)
    n = input_ids.shape[1]
    if 0 < handle.num_tokens < n:  # the tail block's forward overlaps the load
        ran, r = forward_while_loading(model, input_ids, client, loading, verify)
    else:
        ran, r = None, restore(model, input_ids, client, loading, verify)
    loaded = loading.result()
    load_seconds = loading.seconds
    cache = r.cache
    if ran is None and r.num_tokens < n:  # the tail block, or everything after a lost block
        model(input_ids[:, r.num_tokens:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens, logits = [first_token], []
    for _ in range(max_new_tokens - 1):
        step = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
        logits.append(step)
        tokens.append(int(step.argmax()))
    check = r.check
    return DecodeResult(tokens, logits, r.loaded_tokens, n - r.loaded_tokens, loaded.sources, load_seconds,
                        check is not None, len(check.mismatches) if check else 0, check.seconds if check else 0.0)


@torch.no_grad()
def first_token(model, input_ids: torch.Tensor, client=None, layout: Layout | None = None,
                namespace: str = "default", verify=None) -> tuple[int, torch.Tensor, int]:
    """The first token of a prompt: from the longest stored prefix plus the rest computed, or
    (client None) by computing the whole prompt. Returns (token, logits, tokens loaded)."""
    token, logits, restored = _first_token(model, input_ids, client, layout, namespace, verify)
    return token, logits, restored.loaded_tokens if restored else 0


def _first_token(model, input_ids, client, layout, namespace, verify,
                 layerwise: bool = True) -> tuple[int, torch.Tensor, Restored | None]:
    n = input_ids.shape[1]
    if client is None:
        r, cache, done = None, cache_from(None, model.config), 0
    else:
        loading = start_load(client, token_ids=input_ids[0].tolist(), layout=layout, namespace=namespace,
                             max_tokens=n - 1)
        if layerwise and loading.keys:
            logits, r = forward_while_loading(model, input_ids, client, loading, verify)
            if logits is not None:
                return int(logits.argmax()), logits, r
        else:
            r = restore(model, input_ids, client, loading.result(), verify)
        cache, done = r.cache, r.num_tokens
    logits = model(input_ids[:, done:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    return int(logits.argmax()), logits, r


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
    of a deployment must build the same weights. The layout takes the model's dtype. `verify`:
    a Verifier, VerifySettings or a dict of them, or None: the process's shared Verifier with
    the default settings.
    """

    def __init__(self, model_factory: Callable, model_id: str, block_tokens: int = 16, threads: int = 1,
                 namespace: str = "default", verify: VerifySettings | dict | None = None) -> None:
        import kvstore

        torch.set_num_threads(threads)  # equal thread counts keep results bit-identical
        self.model = model_factory()
        self.client = kvstore.connect()
        self.layout = layout_for(self.model.config, model_id, block_tokens, dtype=self.model.dtype)
        self.namespace = namespace
        self.node_id = self.client.node_id
        self.verifier = as_verifier(verify)  # None: the process's shared one

    def prefill(self, token_ids: list[int], reuse: bool = True) -> dict:
        r = prefill(self.model, torch.tensor([token_ids]), self.client, self.layout, self.namespace, reuse,
                    verify=self.verifier)
        return {"first_token": r.first_token, "logits": r.logits, "handle": r.handle.to_dict(),
                "reused_tokens": r.reused_tokens, "seconds": r.seconds, "node_id": self.node_id,
                "verified": r.verified, "mismatched_blocks": r.mismatched_blocks}

    def decode(self, token_ids: list[int], first: int, handle: dict, max_new_tokens: int) -> dict:
        r = decode(self.model, torch.tensor([token_ids]), first, self.client, Handle.from_dict(handle), max_new_tokens,
                   verify=self.verifier)
        return dataclasses.asdict(r) | {"node_id": self.node_id}

    def first_token(self, token_ids: list[int], use_store: bool = True, layerwise: bool = True) -> dict:
        """`seconds` includes a verification's recompute when this load was checked (`verified`).
        `layerwise=False` builds the cache only once the whole load is in (to measure the overlap)."""
        start = time.perf_counter()
        token, logits, r = _first_token(self.model, torch.tensor([token_ids]), self.client if use_store else None,
                                        self.layout, self.namespace, self.verifier, layerwise)
        return {"token": token, "logits": logits, "loaded_tokens": r.loaded_tokens if r else 0,
                "seconds": time.perf_counter() - start, "verified": bool(r and r.check),
                "mismatched_blocks": len(r.check.mismatches) if r and r.check else 0}

    def verification(self) -> dict:
        """This worker's verified-restore counters and quarantine (see connectors/verify.py)."""
        return self.verifier.stats()

    def reference(self, token_ids: list[int], max_new_tokens: int) -> dict:
        tokens, logits = generate_reference(self.model, torch.tensor([token_ids]), max_new_tokens)
        return {"tokens": tokens, "logits": logits}

    def pid(self) -> int:
        return os.getpid()


WorkerActor = ray.remote(num_cpus=0)(Worker)
