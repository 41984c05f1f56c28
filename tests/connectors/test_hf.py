"""Disaggregated prefill/decode with transformers on a real two-node Ray cluster.

Prefill runs in a Ray actor on node A, decode in one on node B; the KV crosses between them
through kvstore (Arrow Flight). A single-process greedy generate() is the reference.
"""
from __future__ import annotations

import functools
import sys

import pytest
import ray
import torch

from kvstore.connectors.handoff import Handle
from kvstore.connectors.hf import WorkerActor, tiny_llama

pytestmark = pytest.mark.cluster
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEW_TOKENS = 8
CONFIGS = {"gqa": {"num_key_value_heads": 2}, "mqa": {"num_key_value_heads": 1}, "mha": {"num_key_value_heads": 4}}


KV_CLUSTER = {"nodes": 2, "settings": dict(host_tier_bytes="64MiB", slot_bytes="64KiB", event_batch_ms=10)}


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    return kv_cluster


@pytest.fixture(scope="module")
def workers(cluster):
    """Per model config: (prefill worker on A, decode worker on B)."""
    rc, _ = cluster
    made = {}

    def get(name: str):
        if name not in made:
            factory = functools.partial(tiny_llama, seed=0, **CONFIGS[name])
            made[name] = tuple(WorkerActor.options(resources={rc.resources[i]: 0.01})
                               .remote(factory, f"test/tiny-llama-{name}") for i in (0, 1))
        return made[name]
    yield get
    for pair in made.values():
        for actor in pair:
            ray.kill(actor)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def handoff(prefill_worker, decode_worker, ids, new_tokens=NEW_TOKENS):
    pre = ray.get(prefill_worker.prefill.remote(ids))
    dec = ray.get(decode_worker.decode.remote(ids, pre["first_token"], pre["handle"], new_tokens))
    return pre, dec


@pytest.mark.parametrize("name", list(CONFIGS))
def test_handoff_across_nodes_is_bit_identical(cluster, workers, name):
    rc, _ = cluster
    a, b = workers(name)
    ids = prompt(1, 96)  # six full blocks: all prompt KV crosses over
    ref = ray.get(b.reference.remote(ids, NEW_TOKENS))
    pre, dec = handoff(a, b, ids)
    assert pre["node_id"] == rc.node_id(0) and dec["node_id"] == rc.node_id(1)
    assert dec["tokens"] == ref["tokens"]
    assert torch.equal(pre["logits"], ref["logits"][0])
    assert all(torch.equal(x, y) for x, y in zip(dec["logits"], ref["logits"][1:]))
    assert dec["loaded_tokens"] == 96 and dec["recomputed_tokens"] == 0
    assert {s for s in dec["sources"]} == {(rc.node_id(0), "remote")}
    assert dec["verified"] and dec["mismatched_blocks"] == 0  # a new source's loads are checked: right KV passes


def test_prompt_with_a_partial_tail_block(cluster, workers):
    a, b = workers("gqa")
    ids = prompt(2, 70)  # 4 full blocks + 6 tokens the decode side computes
    ref = ray.get(b.reference.remote(ids, NEW_TOKENS))
    pre, dec = handoff(a, b, ids)
    assert dec["loaded_tokens"] == 64 and dec["recomputed_tokens"] == 6
    assert dec["tokens"] == ref["tokens"]
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(dec["logits"], ref["logits"][1:]))


def test_second_request_prefills_only_its_new_part(cluster, workers):
    a, b = workers("gqa")
    first = prompt(3, 80)
    handoff(a, b, first)
    second = first[:48] + prompt(4, 40)
    ref = ray.get(b.reference.remote(second, NEW_TOKENS))
    pre, dec = handoff(a, b, second)
    assert pre["reused_tokens"] == 48  # three shared full blocks came from the store
    assert pre["verified"] and pre["mismatched_blocks"] == 0  # checked: KV computed in other chunks passes
    assert dec["tokens"] == ref["tokens"]


def prefilled_without_lease(client, workers, seed: int):
    """A gqa prompt prefilled on A, its lease released (so its blocks may be tampered with), and
    the reference generation: (decode worker, ids, prefill result, handle, reference)."""
    a, b = workers("gqa")
    ids = prompt(seed, 96)
    ref = ray.get(b.reference.remote(ids, NEW_TOKENS))
    pre = ray.get(a.prefill.remote(ids))
    handle = Handle.from_dict(pre["handle"])
    client.release_lease(handle.lease_id)
    return b, ids, pre, handle, ref


def test_block_lost_mid_handoff_is_recomputed(cluster, workers):
    _, client = cluster
    b, ids, pre, handle, ref = prefilled_without_lease(client, workers, 5)
    assert client.delete([handle.keys[2]]) == 1
    dec = ray.get(b.decode.remote(ids, pre["first_token"], pre["handle"], NEW_TOKENS))
    assert dec["loaded_tokens"] == 32 and dec["recomputed_tokens"] == 64
    assert dec["tokens"] == ref["tokens"]


def bf16_llama():
    return tiny_llama(seed=0).to(torch.bfloat16)


def test_bf16_model_hands_off_in_its_own_dtype(cluster):
    """Regression: the Worker built its layout as float32 whatever the model's dtype, so a bf16
    model's prefill failed with PayloadError (the layer's dtype against the layout's)."""
    rc, _ = cluster
    a, b = (WorkerActor.options(resources={rc.resources[i]: 0.01}).remote(bf16_llama, "test/tiny-llama-bf16")
            for i in (0, 1))
    try:
        ids = prompt(7, 96)
        ref = ray.get(b.reference.remote(ids, NEW_TOKENS))
        pre, dec = handoff(a, b, ids)
        assert Handle.from_dict(pre["handle"]).layout.dtype == "bfloat16"
        assert dec["loaded_tokens"] == 96 and dec["recomputed_tokens"] == 0
        assert dec["tokens"] == ref["tokens"]
        assert all(torch.equal(x, y) for x, y in zip(dec["logits"], ref["logits"][1:]))
    finally:
        for actor in (a, b):
            ray.kill(actor)


def test_negative_control_corrupted_kv_changes_the_tokens(cluster, workers):
    rc, client = cluster
    _, ids, pre, handle, ref = prefilled_without_lease(client, workers, 6)
    client.delete(handle.keys)
    noise = torch.randn((len(handle.keys), handle.layout.block_nbytes // 4)).view(torch.uint8)
    assert client.put(handle.layout, handle.keys, noise).stored == len(handle.keys)
    # Verification off: with it, the first loads from a source are checked and this is caught
    # (tests/connectors/test_hf_verify.py).
    b = WorkerActor.options(resources={rc.resources[1]: 0.01}).remote(
        functools.partial(tiny_llama, seed=0, **CONFIGS["gqa"]), "test/tiny-llama-gqa",
        verify={"fraction": 0.0, "first_n": 0})
    try:
        dec = ray.get(b.decode.remote(ids, pre["first_token"], pre["handle"], NEW_TOKENS))
    finally:
        ray.kill(b)
    assert dec["loaded_tokens"] == 96 and not dec["verified"]
    assert dec["tokens"] != ref["tokens"], "a decode on garbage KV must not match: the test would prove nothing"


def test_a_forward_run_while_its_prefix_arrives_equals_a_recompute(cluster):
    rc, _ = cluster
    factory = functools.partial(tiny_llama, seed=0, **CONFIGS["gqa"])
    unchecked = {"first_n": 0, "fraction": 0.0}  # so the forward run during the load stands
    a, b = (WorkerActor.options(resources={rc.resources[i]: 0.01}).remote(factory, "test/tiny-llama-overlap",
                                                                         verify=unchecked) for i in (0, 1))
    try:
        ids = prompt(21, 200)
        ray.get(a.prefill.remote(ids))  # 12 blocks saved on A
        recomputed = ray.get(b.first_token.remote(ids, False))
        overlapped = ray.get(b.first_token.remote(ids, True))  # layer i of A's blocks arrives as layer i runs
        assert overlapped["loaded_tokens"] == 192 and not overlapped["verified"]
        assert overlapped["token"] == recomputed["token"]
        assert torch.allclose(overlapped["logits"], recomputed["logits"], atol=1e-4)
    finally:
        ray.kill(a)
        ray.kill(b)
