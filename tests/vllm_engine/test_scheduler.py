"""The connector's scheduler side inside vLLM's real Scheduler, driven with fake model outputs.

The scheduler runs here as in an engine; instead of a model, each step's ModelRunnerOutput is
built by the test (a sampled token per request that finished its prompt, and the KV connector's
completions as a worker would report them). The store is the real kvstore on a two-node Ray
cluster; where the worker would have saved blocks, the test puts them itself. Every test checks
that the scheduler's free block count returns to where it started and no state is left behind.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_support import needs_vllm

pytestmark = [pytest.mark.vllm, needs_vllm]

BLOCK = 128
NUM_BLOCKS = 24
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def make_scheduler(model: str, address: str, role: str, tp: int = 1, **extra):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    config = EngineArgs(
        model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=BLOCK, max_num_seqs=4,
        max_num_batched_tokens=1024, enable_prefix_caching=True, tensor_parallel_size=tp,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.connectors.vllm", kv_role=role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"kvstore_address": address, "kvstore_namespace": "sched-test",
                                       # verified restores off unless a test turns them on; async
                                       # loads, as in an engine core of its own process (the
                                       # in-process default is sync)
                                       "kvstore_verify_fraction": 0, "kvstore_verify_first_n": 0,
                                       "kvstore_load_mode": "async", **extra}),
    ).create_engine_config()
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
        # A rank's KV cache holds its share of the model's 2 KV heads.
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, FullAttentionSpec(block_size=BLOCK, num_kv_heads=2 // tp, head_size=32,
                                                                    dtype=torch.float32))])
    return Scheduler(vllm_config=config, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(config), block_size=BLOCK, log_stats=True)


def request(req_id: str, tokens: list[int], max_tokens: int = 2, kv_transfer_params: dict | None = None,
            **inputs):
    """A vLLM Request; `inputs` are its other inputs (cache_salt, lora_request, mm_features, prompt_embeds)."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None)
    return Request(req_id, tokens, params, None, block_hasher=get_request_block_hasher(BLOCK, sha256), **inputs)


def output(scheduler, so, *, sending=(), recving=(), invalid=(), worker_meta=None):
    """The fake ModelRunnerOutput of step `so`: token 7 for each request that is past its prompt."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    req_ids = list(so.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        req = scheduler.requests[req_id]
        done = req.num_computed_tokens >= req.num_tokens  # the scheduler already advanced it by this step
        sampled.append([7] if done else [])
    kv = KVConnectorOutput(finished_sending=set(sending) or None, finished_recving=set(recving) or None,
                           invalid_block_ids=set(invalid), kv_connector_worker_meta=worker_meta)
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled, kv_connector_output=kv)


def step(scheduler, **kv):
    so = scheduler.schedule()
    outs = scheduler.update_from_output(so, output(scheduler, so, **kv))
    finished = {o.request_id: o for eco in outs.values() for o in eco.outputs if o.finish_reason is not None}
    return so, finished


def put_blocks(client, connector, tokens: list[int], n: int, extra: bytes = b"",
               block_extra: dict[int, bytes] | None = None) -> list[bytes]:
    """Stores the first n blocks of `tokens` (with key extras) as the producer's worker would have."""
    import kvstore

    layout = connector.connector_scheduler.layouts[0]
    keys = kvstore.block_keys(tokens, layout, connector.connector_scheduler.namespace, extra=extra, block_extra=block_extra)[:n]
    blocks = torch.randn((n, *layout.block_shape)).to(layout.torch_dtype)
    result = client.put(layout, keys, blocks, parents=kvstore.chain_parents(keys), wait_index=True)
    assert not result.rejected, result
    return keys


def free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def assert_clean(scheduler, free0: int) -> None:
    assert free_blocks(scheduler) == free0
    assert not scheduler.requests
    assert not scheduler.connector.connector_scheduler._reqs and not scheduler.connector.connector_scheduler._held
    assert not scheduler.connector.has_pending_push_work()


@pytest.fixture(scope="module")
def store(kv_cluster):
    rc, client = kv_cluster
    return rc.gcs_address, client


def test_async_load_then_compute_the_tail(tiny_model, store):
    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer")
    free0 = free_blocks(s)
    tokens = prompt(1, 300)
    keys = put_blocks(client, s.connector, tokens, 2)
    s.add_request(request("a", tokens))

    so, _ = step(s)  # the lookup finds 2 blocks: async load, nothing computed yet
    (load,) = so.kv_connector_metadata.loads
    assert load.is_async and load.keys[0] == keys and len(load.block_ids) == 2
    assert not so.num_scheduled_tokens
    assert s.requests["a"].status.name == "WAITING_FOR_REMOTE_KVS"
    assert free_blocks(s) < free0

    so, _ = step(s, recving={"a"})  # the worker reports the load done
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"a": 300 - 256}  # only the tail is computed
    so, finished = step(s)
    assert "a" in finished and finished["a"].kv_transfer_params is None  # a consumer hands nothing off
    assert_clean(s, free0)


def test_async_load_failure_recomputes(tiny_model, store):
    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer")
    free0 = free_blocks(s)
    tokens = prompt(2, 300)
    put_blocks(client, s.connector, tokens, 2)
    s.add_request(request("b", tokens))
    so, _ = step(s)
    (load,) = so.kv_connector_metadata.loads
    # The second block did not arrive: reported in the same step as the request's completion.
    step(s, recving={"b"}, invalid={load.block_ids[1]})
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"b": 300 - 128}  # the valid first block is kept
    for _ in range(3):
        step(s)
    assert_clean(s, free0)


def test_sync_load_leaves_the_last_token_to_compute(tiny_model, store):
    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer", kvstore_load_mode="sync")
    free0 = free_blocks(s)
    tokens = prompt(3, 256)  # exactly two blocks
    put_blocks(client, s.connector, tokens, 2)
    s.add_request(request("c", tokens))
    so, _ = step(s)
    (load,) = so.kv_connector_metadata.loads
    assert not load.is_async and len(load.block_ids) == 1  # a sync load may not cover the last token
    assert so.num_scheduled_tokens == {"c": 128} and so.has_sync_kv_loads
    for _ in range(3):
        step(s)
    assert_clean(s, free0)


def test_async_saves_hold_blocks_until_finished_sending(tiny_model, store):
    address, client = store
    s = make_scheduler(tiny_model, address, "kv_both", kvstore_save_mode="async")
    free0 = free_blocks(s)
    tokens = prompt(4, 300)
    s.add_request(request("d", tokens, max_tokens=1))
    so, finished = step(s)
    (save,) = so.kv_connector_metadata.saves
    assert save.is_async and len(save.block_ids) == 2
    params = finished["d"].kv_transfer_params
    assert params["num_tokens"] == 256 and len(params["kvstore_keys"]) == 2 and params["kvstore_lease"] is None
    # Finished, but its blocks stay with the connector until a worker says the save is done.
    assert free_blocks(s) < free0 and s.connector.has_pending_push_work() and s.has_requests()
    so, _ = step(s)
    assert "d" in so.finished_req_ids  # the workers learn that it finished
    assert free_blocks(s) < free0
    step(s, sending={"d"})
    assert_clean(s, free0)


def test_abort_during_async_load_frees_after_the_load(tiny_model, store):
    from vllm.v1.request import RequestStatus

    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer")
    free0 = free_blocks(s)
    tokens = prompt(5, 300)
    put_blocks(client, s.connector, tokens, 2)
    s.add_request(request("e", tokens))
    step(s)
    s.finish_requests("e", RequestStatus.FINISHED_ABORTED)
    assert free_blocks(s) < free0  # the worker may still be writing into them
    step(s, recving={"e"})
    assert_clean(s, free0)


def test_producer_handoff_lease_and_consumer_release(tiny_model, store):
    from kvstore.errors import LeaseError

    address, client = store
    p = make_scheduler(tiny_model, address, "kv_producer")
    free0 = free_blocks(p)
    tokens = prompt(6, 300)
    p.add_request(request("p", tokens, max_tokens=1))
    so = p.schedule()
    (save,) = so.kv_connector_metadata.saves
    assert not save.is_async  # a producer commits in the step (sync save mode)
    put_blocks(client, p.connector, tokens, 2)  # what the worker's wait_for_save does
    outs = p.update_from_output(so, output(p, so))
    (out,) = [o for eco in outs.values() for o in eco.outputs]
    handle = out.kv_transfer_params
    assert set(handle) == {"kvstore_version", "kvstore_keys", "kvstore_node", "kvstore_lease", "kvstore_leases",
                           "kvstore_namespace", "kvstore_layout", "kvstore_tp_size", "num_tokens"}
    assert handle["kvstore_lease"] and handle["kvstore_leases"] == [handle["kvstore_lease"]]
    assert handle["num_tokens"] == 256 and handle["kvstore_node"] == client.node_id
    assert_clean(p, free0)  # nothing held: the blocks were committed in the step

    c = make_scheduler(tiny_model, address, "kv_consumer", kvstore_load_mode="sync")
    free1 = free_blocks(c)
    c.add_request(request("q", tokens, kv_transfer_params=handle))
    so, _ = step(c)
    (load,) = so.kv_connector_metadata.loads
    assert [k.hex() for k in load.keys[0]] == handle["kvstore_keys"]
    assert load.handoff_node == handle["kvstore_node"]  # pulled from there, not cached on the decode side
    # The load happened in that step: the handle's lease was released afterwards.
    with pytest.raises(LeaseError):
        client.release_lease(handle["kvstore_lease"])
    for _ in range(3):
        step(c)
    assert_clean(c, free1)


def test_tensor_parallel_2_hands_off_every_ranks_blocks_with_one_lookup_per_request(tiny_model, store, caplog):
    """TP=2 -> TP=2: each rank's share of a block has its own key (the layout names the rank);
    the producer's handle leases every rank's blocks, the consumer asks the index once per
    request for all ranks and plans every rank's load. A TP=1 consumer given that handle says why
    it cannot use it and computes the prompt."""
    import kvstore

    address, client = store
    p = make_scheduler(tiny_model, address, "kv_producer", tp=2)
    layouts = p.connector.connector_scheduler.layouts
    assert [(lay.tp_rank, lay.tp_size, lay.num_kv_heads) for lay in layouts] == [(0, 2, 1), (1, 2, 1)]
    tokens = prompt(21, 300)
    p.add_request(request("p2", tokens, max_tokens=1))
    so = p.schedule()
    (save,) = so.kv_connector_metadata.saves
    assert len(save.keys) == 2 and not set(save.keys[0]) & set(save.keys[1])
    for rank, layout in enumerate(layouts):  # what each rank's worker commits in wait_for_save
        blocks = torch.randn((2, *layout.block_shape)).to(layout.torch_dtype)
        assert client.put(layout, save.keys[rank], blocks, parents=kvstore.chain_parents(save.keys[rank]),
                          wait_index=True).stored == 2
    outs = p.update_from_output(so, output(p, so))
    (out,) = [o for eco in outs.values() for o in eco.outputs]
    handle = out.kv_transfer_params
    assert handle["kvstore_tp_size"] == 2 and len(handle["kvstore_leases"]) == 2

    c = make_scheduler(tiny_model, address, "kv_consumer", tp=2, kvstore_load_mode="sync")
    free0 = free_blocks(c)
    calls = IndexCalls(c.connector.connector_scheduler._client)
    c.connector.connector_scheduler._client = calls
    c.add_request(request("c2", tokens, kv_transfer_params=handle))
    so, _ = step(c)
    assert calls.names == ["contains"]  # both ranks' keys in one index call
    (load,) = so.kv_connector_metadata.loads
    assert load.keys == save.keys and len(load.block_ids) == 2
    for _ in range(3):
        step(c)
    assert_clean(c, free0)

    one = make_scheduler(tiny_model, address, "kv_consumer")
    with caplog.at_level("ERROR", logger="kvstore.connectors.vllm_scheduler"):
        one.add_request(request("c1", tokens, kv_transfer_params=handle))
        so, _ = step(one)
    assert not so.kv_connector_metadata.loads and so.num_scheduled_tokens == {"c1": 300}
    assert "tensor parallel size 2" in caplog.text
    step(one)
    from kvstore.errors import LeaseError

    for lease in handle["kvstore_leases"]:  # the TP=2 consumer's load ended every rank's lease
        with pytest.raises(LeaseError):
            client.release_lease(lease)


class IndexCalls:
    """A client whose index calls (lookups) are recorded by name."""

    def __init__(self, client) -> None:
        self._client, self.names = client, []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name not in ("longest_prefix", "contains", "where"):
            return attr

        def recorded(*args, **kwargs):
            self.names.append(name)
            return attr(*args, **kwargs)
        return recorded


def test_a_foreign_handle_is_ignored(tiny_model, store):
    address, client = store
    c = make_scheduler(tiny_model, address, "kv_consumer")
    free0 = free_blocks(c)
    tokens = prompt(7, 300)
    foreign = {"kvstore_keys": ["00" * 16, "11" * 16], "kvstore_lease": "nope", "num_tokens": 256}
    c.add_request(request("f", tokens, kv_transfer_params=foreign))
    so, _ = step(c)  # nothing stored for these tokens: computed, and the foreign lease untouched
    assert not so.kv_connector_metadata.loads and so.num_scheduled_tokens == {"f": 300}
    step(c)
    assert_clean(c, free0)


# -- cache identity: inputs besides token ids ----------------------------------------------------

def save_as_worker(client, connector, so) -> list[bytes]:
    """Commits the saves planned in step `so` as the workers would (random payloads); their keys."""
    import kvstore

    layout = connector.connector_scheduler.layouts[0]
    keys = []
    for save in so.kv_connector_metadata.saves:
        blocks = torch.randn((len(save.block_ids), *layout.block_shape)).to(layout.torch_dtype)
        result = client.put(layout, save.keys[0], blocks, parents=kvstore.chain_parents(save.keys[0], save.parents[0]),
                            wait_index=True)
        assert not result.rejected, result
        keys += save.keys[0]
    return keys


def image(identifier: str, offset: int, length: int):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def loads_of_first_step(s, req) -> list[list[bytes]]:
    """Adds the request and runs one step: the keys of the loads the connector planned for it."""
    s.add_request(req)
    so, _ = step(s)
    return [load.keys[0] for load in so.kv_connector_metadata.loads if load.req_id == req.request_id]


def test_a_handle_of_another_cache_salt_is_ignored(tiny_model, store):
    """Same tokens, another cache salt: the producer's handle is not this request's, and none of
    the blocks stored under the other salt is looked up or loaded."""
    from kvstore.errors import LeaseError

    address, client = store
    p = make_scheduler(tiny_model, address, "kv_producer")
    tokens = prompt(8, 300)
    p.add_request(request("p", tokens, max_tokens=1, cache_salt="tenant-a"))
    so = p.schedule()
    stored = save_as_worker(client, p.connector, so)
    outs = p.update_from_output(so, output(p, so))
    (handle,) = [o.kv_transfer_params for eco in outs.values() for o in eco.outputs]
    assert handle["kvstore_keys"] == [k.hex() for k in stored] and handle["kvstore_lease"]

    c = make_scheduler(tiny_model, address, "kv_consumer", kvstore_load_mode="sync")
    free0 = free_blocks(c)
    assert loads_of_first_step(c, request("b", tokens, kv_transfer_params=handle, cache_salt="tenant-b")) == []
    assert not c.connector.connector_scheduler._reqs["b"].handle_leases  # the handle was not taken as its own
    assert c.connector.connector_scheduler._reqs["b"].handle_node is None
    assert all(k not in stored for k in c.connector.connector_scheduler._reqs["b"].keys[0])
    for _ in range(2):
        step(c)
    # The producer's own salt: the handle is its, the blocks load, the lease is released.
    assert loads_of_first_step(c, request("a", tokens, kv_transfer_params=handle, cache_salt="tenant-a")) == [stored]
    with pytest.raises(LeaseError):
        client.release_lease(handle["kvstore_lease"])
    for _ in range(3):
        step(c)
    assert_clean(c, free0)


def image(identifier: str, offset: int, length: int):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def test_multimodal_inputs_key_the_blocks_they_overlap(tiny_model, store):
    """The same placeholder token ids with another image (or the same image elsewhere, or none)
    share no block. The scheduler cannot compute past an image here (a text-only model has no
    encoder budget), so the requests that miss are aborted; those that hit load and finish."""
    from vllm.v1.request import RequestStatus

    from kvstore.connectors.vllm_keys import cache_extras

    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer")
    free0 = free_blocks(s)
    tokens = prompt(9, 300)

    def with_image(req_id, identifier, offset):  # 60 placeholder tokens: in blocks 0 and 1
        return request(req_id, tokens, mm_features=[image(identifier, offset, 60)])

    text = put_blocks(client, s.connector, tokens, 2)  # as a text-only request stored them
    with_a = put_blocks(client, s.connector, tokens, 2, *cache_extras(with_image("-", "img-a", 100), BLOCK))
    assert not set(text) & set(with_a)

    assert loads_of_first_step(s, with_image("b", "img-b", 100)) == []      # another image
    assert loads_of_first_step(s, with_image("a-moved", "img-a", 110)) == []  # the image elsewhere
    assert loads_of_first_step(s, with_image("a", "img-a", 100)) == [with_a]
    assert loads_of_first_step(s, request("text", tokens)) == [text]
    s.finish_requests(["b", "a-moved"], RequestStatus.FINISHED_ABORTED)
    step(s, recving={"a", "text"})
    for _ in range(3):
        step(s)
    assert_clean(s, free0)


def test_requests_with_prompt_embeddings_are_neither_loaded_nor_saved(tiny_model, store, caplog):
    """Their KV comes from the embeddings, which no key covers: blocks stored for the same token
    ids are not loaded, nothing is saved, no handle is returned; the refusal is logged once."""
    address, client = store
    s = make_scheduler(tiny_model, address, "kv_both", kvstore_save_mode="sync")
    free0 = free_blocks(s)
    tokens = prompt(10, 300)
    put_blocks(client, s.connector, tokens, 2)
    for req_id in ("e1", "e2"):
        embeds = torch.randn((len(tokens), 128), generator=torch.Generator().manual_seed(int(req_id[1:])))
        s.add_request(request(req_id, tokens, max_tokens=1, prompt_embeds=embeds))
    so, finished = step(s)
    assert not so.kv_connector_metadata.loads and not so.kv_connector_metadata.saves
    assert so.num_scheduled_tokens == {"e1": 300, "e2": 300}
    assert {r: f.kv_transfer_params for r, f in finished.items()} == {"e1": None, "e2": None}
    assert len([r for r in caplog.records if "prompt embeddings" in r.getMessage()]) == 1
    assert_clean(s, free0)


# -- verified restores ---------------------------------------------------------------------------

def test_a_sampled_load_is_computed_and_checked_block_by_block_and_a_bad_source_quarantined(tiny_model, store):
    """With every load sampled, the scheduler loads nothing: the engine computes the prompt (here
    in chunks of 200 tokens) and each step's metadata names the stored blocks that step completes,
    for the workers to compare. A source a worker reports wrong (kv_connector_worker_meta) is
    quarantined: a later request's blocks from it are neither loaded nor checked."""
    from kvstore.connectors.vllm_metadata import KVStoreWorkerMetadata

    address, client = store
    s = make_scheduler(tiny_model, address, "kv_consumer", kvstore_verify_fraction=1.0, kvstore_verify_first_n=0)
    s.max_num_scheduled_tokens = 200  # chunked prefill
    free0 = free_blocks(s)
    tokens, later = prompt(40, 300), prompt(41, 300)
    keys = put_blocks(client, s.connector, tokens, 2)
    put_blocks(client, s.connector, later, 2)
    client.flush()
    source = (client.node_id, client.where(keys[:1])[0][0][1])
    s.add_request(request("v", tokens))

    so, _ = step(s)
    meta = so.kv_connector_metadata
    assert not meta.loads and so.num_scheduled_tokens == {"v": 200}
    (check,) = meta.checks  # the first block is complete after this step
    assert check.keys[0] == keys[:1] and check.sources == [source]
    assert check.block_ids == so.scheduled_new_reqs[0].block_ids[0][:1]
    so, _ = step(s, worker_meta=KVStoreWorkerMetadata([(*source, 1)]))  # the worker found it wrong
    assert so.num_scheduled_tokens == {"v": 100}
    (check,) = so.kv_connector_metadata.checks  # the second block, this step
    assert check.keys[0] == keys[1:2]
    stats = s.connector.verification()
    assert [(q["node_id"], q["medium"]) for q in stats["quarantined"]] == [source]

    s.add_request(request("w", later))
    so, _ = step(s)
    assert not so.kv_connector_metadata.loads and not so.kv_connector_metadata.checks
    assert so.num_scheduled_tokens["w"] == 200 - 1  # computed from the start ("v" decodes one token)
    assert s.connector.verification()["quarantine_skipped_blocks"] == 2
    for _ in range(4):
        step(s)
    assert_clean(s, free0)
