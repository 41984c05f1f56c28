"""Verified restores with transformers on a real two-node Ray cluster: right KV or a clean miss.

Wrong KV is written through the store's own producer path (SaveSession), so every checksum is
right: only a recompute on the model can tell. The writer is this test process (its node, "D");
the engine under test is a Worker actor on the other node, which pulls the blocks from D. A
single-process greedy generate() is the reference.
"""
from __future__ import annotations

import asyncio
import functools
import sys

import pytest
import ray
import torch
from transformers import DynamicCache

from kvstore.connectors import hf
from kvstore.connectors.handoff import Handle, SaveSession
from kvstore.connectors.hf import WorkerActor, layout_for, tiny_llama
from kvstore.connectors.verify import Verifier, VerifySettings
from kvstore.metrics import render

pytestmark = pytest.mark.cluster
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEW_TOKENS = 8
MODEL_ID = "test/tiny-llama-verify"
KV_CLUSTER = {"nodes": 2, "settings": dict(host_tier_bytes="64MiB", slot_bytes="64KiB", event_batch_ms=10)}
factory = functools.partial(tiny_llama, seed=0)


@pytest.fixture(scope="module")
def env(kv_cluster):
    """(cluster, client, the writer's model and layout, the engine's node index)."""
    rc, client = kv_cluster
    torch.set_num_threads(1)  # as the workers: the same KV bit for bit
    model = factory()
    layout = layout_for(model.config, MODEL_ID, 16, dtype=model.dtype)
    other = next(i for i in range(rc.num_nodes) if rc.node_id(i) != client.node_id)
    return rc, client, model, layout, other


def worker(env, **verify):
    rc, *_, other = env
    return WorkerActor.options(resources={rc.resources[other]: 0.01}).remote(factory, MODEL_ID, verify=verify)


def prompt(seed: int, n: int = 96) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def kv_of(model, ids: list[int]) -> list[list[torch.Tensor]]:
    """Per layer [k, v], [tokens, kv_heads, head_dim] each: what a writer would store."""
    cache = DynamicCache(config=model.config)
    model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [[layer.keys[0].transpose(0, 1).clone(), layer.values[0].transpose(0, 1).clone()] for layer in cache.layers]


def store(client, layout, ids: list[int], kv) -> Handle:
    """Commits `kv` under the keys of `ids` through the producer path (checksums and all)."""
    session = SaveSession(client, layout, ids)
    for i, (k, v) in enumerate(kv):
        session.save_layer(i, k, v)
    return session.finish()


def corrupt_block(model, ids, other_ids, block: int):
    """The KV of `ids`, block `block` replaced by the same positions of another prompt's KV:
    valid-looking KV, wrong for these tokens (what a writer bug produces)."""
    kv, wrong = kv_of(model, ids), kv_of(model, other_ids)
    rows = slice(block * 16, (block + 1) * 16)
    for layer, bad in zip(kv, wrong):
        for part, bad_part in zip(layer, bad):
            part[rows] = bad_part[rows]
    return kv


def http_view(client) -> tuple[str, dict]:
    """/metrics and /v1/stats through the real HTTP service."""
    from aiohttp.test_utils import TestClient, TestServer

    from kvstore.service import Service

    async def fetch():
        async with TestClient(TestServer(Service(client, "t0ken").app(), host="127.0.0.2")) as c:
            auth = {"Authorization": "Bearer t0ken"}
            metrics = await (await c.get("/metrics", headers=auth)).text()
            stats = await (await c.get("/v1/stats", headers=auth)).json()
            page = await (await c.get("/", headers=auth)).text()
            return metrics, stats, page
    return asyncio.run(fetch())


def test_corrupted_block_is_caught_deleted_quarantined_and_tokens_stay_right(env):
    rc, client, model, layout, _ = env
    ids = prompt(11)
    handle = store(client, layout, ids, corrupt_block(model, ids, prompt(12), block=2))
    writer = (client.node_id, "CPU")
    w = worker(env, fraction=0.0, first_n=8)  # no coin: the new source's first loads are checked
    try:
        ref = ray.get(w.reference.remote(ids, NEW_TOKENS))
        dec = ray.get(w.decode.remote(ids, ref["tokens"][0], handle.to_dict(), NEW_TOKENS))
        assert dec["verified"] and dec["mismatched_blocks"] == 1
        assert dec["tokens"] == ref["tokens"]  # went on with the recomputed KV
        assert all(torch.equal(x, y) for x, y in zip(dec["logits"], ref["logits"][1:]))
        assert dec["loaded_tokens"] == 0 and dec["recomputed_tokens"] == 96
        stats = ray.get(w.verification.remote())
        assert stats["checks"] == 1 and stats["mismatches"] == 1 and stats["mismatched_blocks"] == 1
        assert [(q["node_id"], q["medium"]) for q in stats["quarantined"]] == [writer]

        # The wrong block is gone everywhere (the writer's copy and the one the pull cached on
        # the engine's node); the right ones stay.
        where = client.where(handle.keys)
        assert where[2] == [] and all(where[j] for j in (0, 1, 3, 4, 5))

        # The controller has it: /v1/stats, /metrics and the page.
        metrics, http_stats, page = http_view(client)
        ver = http_stats["verification"]
        assert ver["mismatches"] >= 1
        assert any((q["node_id"], q["medium"]) == writer and handle.keys[2].hex() in q["keys"]
                   for q in ver["quarantined"])
        labels = f'{{node="{writer[0][:12]}",medium="CPU"}}'
        assert f"kvstore_verify_mismatches_total{labels} 1" in metrics
        assert f"kvstore_verify_mismatched_blocks_total{labels} 1" in metrics
        assert f"kvstore_verify_quarantined{labels} 1" in metrics
        assert "sources quarantined" in page

        # From now on this process treats the quarantined source as a miss, even for right KV.
        other = prompt(13)
        store(client, layout, other, kv_of(model, other))
        first = ray.get(w.first_token.remote(other))
        assert first["loaded_tokens"] == 0 and first["token"] == ray.get(w.reference.remote(other, 1))["tokens"][0]
        assert ray.get(w.verification.remote())["quarantine_skipped_blocks"] == 5
    finally:
        ray.kill(w)


def test_blocks_under_the_wrong_keys_are_caught_on_the_prefill_reuse_path(env):
    """Prompt A's blocks stored under prompt B's keys (a wrong key mapping); a prefill reusing
    B's prefix catches them, recomputes, and saves B's right KV in their place."""
    _, client, model, layout, _ = env
    b_ids, a_ids = prompt(21), prompt(22)
    client.release_lease(store(client, layout, b_ids, kv_of(model, a_ids)).lease_id)
    full = b_ids + prompt(23, 10)  # B's six blocks and ten more tokens
    w = worker(env, fraction=0.0, first_n=8)
    try:
        ref = ray.get(w.reference.remote(full, NEW_TOKENS))
        pre = ray.get(w.prefill.remote(full))
        assert pre["verified"] and pre["mismatched_blocks"] == 6 and pre["reused_tokens"] == 0
        assert pre["first_token"] == ref["tokens"][0]
        assert ray.get(w.verification.remote())["quarantined"][0]["node_id"] == client.node_id
        # The prefill wrote B's right KV under B's keys (on the engine's node): a decode from it
        # passes its check and generates the reference.
        dec = ray.get(w.decode.remote(full, pre["first_token"], pre["handle"], NEW_TOKENS))
        assert dec["verified"] and dec["mismatched_blocks"] == 0 and dec["loaded_tokens"] == 96
        assert dec["tokens"] == ref["tokens"]
    finally:
        ray.kill(w)


def test_negative_control_without_verification_the_wrong_kv_changes_the_tokens(env):
    _, client, model, layout, _ = env
    ids = prompt(31)
    handle = store(client, layout, ids, corrupt_block(model, ids, prompt(32), block=2))
    w = worker(env, fraction=0.0, first_n=0)
    try:
        ref = ray.get(w.reference.remote(ids, NEW_TOKENS))
        dec = ray.get(w.decode.remote(ids, ref["tokens"][0], handle.to_dict(), NEW_TOKENS))
        assert not dec["verified"] and dec["loaded_tokens"] == 96
        assert dec["tokens"] != ref["tokens"], "the corrupted block must matter, or the tests above prove nothing"
        assert ray.get(w.verification.remote())["checks"] == 0
    finally:
        ray.kill(w)


@pytest.mark.parametrize("settings, checked", [
    (VerifySettings(fraction=0.0, first_n=0), [False, False, False]),
    (VerifySettings(fraction=0.0, first_n=2), [True, True, False]),
    (VerifySettings(fraction=1.0, first_n=0), [True, True, True]),
])
def test_sampling_decides_which_loads_are_recomputed(env, settings, checked):
    """In this process, from this node's store: a recompute is a forward over the whole prefix;
    decoding a fully loaded prompt otherwise runs only one-token steps."""
    _, client, model, layout, _ = env
    ids = prompt(41)
    handle = store(client, layout, ids, kv_of(model, ids))
    client.release_lease(handle.lease_id)
    handle = Handle(handle.namespace, layout, handle.keys, handle.num_tokens, handle.node_id, None)
    ref, _ = hf.generate_reference(model, torch.tensor([ids]), 4)
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    v = Verifier(settings)
    try:
        for expect in checked:
            lengths.clear()
            r = hf.decode(model, torch.tensor([ids]), ref[0], client, handle, 4, verify=v)
            assert r.tokens == ref and r.loaded_tokens == 96
            assert r.verified == expect and (96 in lengths) == expect, lengths
    finally:
        hook.remove()
    assert v.stats()["checks"] == sum(checked) and v.stats()["loads"] == len(checked)
    assert v.stats()["mismatches"] == 0 and not v.quarantined
