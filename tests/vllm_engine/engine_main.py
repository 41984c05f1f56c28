"""Runs one vLLM engine (in-process engine core) in its own process and prints a JSON result.

    python engine_main.py '<json spec>'

spec: model (dir), max_tokens, connector (None or a dict: kv_role, extra config,
kv_load_failure_policy), ray (None or {"address", "node_ip"}: join the test's Ray cluster as a
driver on that node first, so the connector's kvstore.connect() reuses it), no_ray (optional:
Ray made unimportable in this process, an engine outside Ray that reaches kvstore through a
kvstore:// address), tp (optional: tensor parallel size; its workers are processes vLLM spawns,
so no connector report), multiprocessing (optional: the engine core in a process of its own,
VLLM_ENABLE_V1_MULTIPROCESSING=1; no connector report either), kv_events (optional: a ZMQ
endpoint where vLLM publishes its KV events, with prefix caching on), max_lora_rank
(optional: enables LoRA), max_model_len and kv_cache_bytes (optional), and rounds: a list of {prompts (each a list of token ids, or a dict
{"tokens", "cache_salt" (optional), "lora" (optional: [name, int id, path])}), handoffs (per
prompt: kv_transfer_params to pass, or None), corrupt (optional: hex keys whose blocks are
replaced by noise in the store before the round, the negative control)}. The rounds run one
after the other in the same engine.

Prints one line `RESULT {json}`: per round the generated token ids, the seconds generate took, the returned
kv_transfer_params, the connector's per-process totals after the round, where the store
holds the blocks named in the round's handoffs and outputs, and the verifiers' state (the
worker's checks, the scheduler's samples and quarantine).
"""
from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("no_ray"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from kvtest_support import NO_RAY

        exec(NO_RAY)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocessing") else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import torch

    torch.set_num_threads(1)
    if spec.get("ray"):
        import ray

        ray.init(address=spec["ray"]["address"], _node_ip_address=spec["ray"]["node_ip"], namespace="kvstore",
                 log_to_driver=False)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.lora.request import LoRARequest

    kwargs = {}
    if spec.get("tp", 1) > 1:  # workers in processes vLLM spawns: the connector's worker side lives there
        kwargs.update(tensor_parallel_size=spec["tp"], distributed_executor_backend="mp")
        # vLLM's CPU build binds each worker to a NUMA node of its own unless told which CPUs to use.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % os.cpu_count()) for r in range(spec["tp"])))
    if spec.get("max_lora_rank"):
        kwargs.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=2)
    if spec.get("connector"):
        c = spec["connector"]
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.connectors.vllm",
            kv_role=c["kv_role"], kv_load_failure_policy=c.get("kv_load_failure_policy", "recompute"),
            kv_connector_extra_config=c.get("extra", {}), **({"engine_id": c["engine_id"]} if c.get("engine_id") else {}))
    if spec.get("kv_events"):  # vLLM publishes its prefix cache's changes there (needs prefix caching)
        from vllm.config import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=spec["kv_events"])
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, seed=0, max_model_len=spec.get("max_model_len", 1024),
              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 16 * 1024**2), max_num_seqs=4,
              enable_prefix_caching=bool(spec.get("kv_events")), **kwargs)
    rounds = []
    for rnd in spec["rounds"]:
        if rnd.get("corrupt"):
            corrupt(rnd["corrupt"])
        handoffs = rnd.get("handoffs") or [None] * len(rnd["prompts"])
        params = [SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True,
                                 extra_args={"kv_transfer_params": h} if h else None) for h in handoffs]
        prompts = [p if isinstance(p, dict) else {"tokens": p} for p in rnd["prompts"]]
        inputs = [{"prompt_token_ids": p["tokens"], **({"cache_salt": p["cache_salt"]} if p.get("cache_salt") else {})}
                  for p in prompts]
        loras = [LoRARequest(*p["lora"]) if p.get("lora") else None for p in prompts]
        start = time.perf_counter()
        outs = llm.generate(inputs, params, lora_request=loras, use_tqdm=False)
        result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": time.perf_counter() - start,
                  "kv_transfer_params": [o.kv_transfer_params for o in outs]}
        if spec.get("connector") and spec.get("tp", 1) == 1 and not spec.get("multiprocessing"):
            result.update(connector_report(result["kv_transfer_params"], handoffs))  # else in other processes
            result.update(scheduler_report(llm))
        rounds.append(result)
    if spec.get("kv_events"):
        time.sleep(1.5)  # the connector reports the HBM residency of the last round's blocks (every 0.2 s)
    if spec.get("multiprocessing"):
        llm.llm_engine.engine_core.shutdown()  # the engine core's process, which would outlive this one
    print("RESULT " + json.dumps({"rounds": rounds}), flush=True)
    os._exit(0)  # the engine's threads and Ray's would otherwise hold the exit


def connector_report(returned: list, handoffs: list) -> dict:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvstore.connectors import vllm_client, vllm_stats

    get_kv_transfer_group().wait_idle()  # async saves of this round are in the store
    client = next(iter(vllm_client._CLIENTS.values()))
    if hasattr(client, "flush"):  # the Ray client (a remote client's puts are indexed when they return)
        client.flush()  # copies cached by this round's pulls are committed ...
        client.sync()   # ... and in the cluster's index
    keys = [bytes.fromhex(k) for p in returned + handoffs if p for k in p.get("kvstore_keys", [])]
    return {"totals": dict(vllm_stats.TOTALS), "node_id": client.node_id, "ray_imported": "ray" in sys.modules,
            "worker_verify": get_kv_transfer_group().verification(),
            "where": {k.hex(): sorted(n for n, _ in holders) for k, holders in zip(keys, client.where(keys))}}


def corrupt(keys_hex: list[str]) -> None:
    """Replaces blocks in the store by noise of the same shape (the negative control)."""
    import torch

    from kvstore.connectors import vllm_client

    client = next(iter(vllm_client._CLIENTS.values()))
    layout = get_worker_layout()
    keys = [bytes.fromhex(k) for k in keys_hex]
    client.delete(keys)
    noise = torch.randn((len(keys), *layout.block_shape), generator=torch.Generator().manual_seed(7)).to(layout.torch_dtype)
    result = client.put(layout, keys, noise, wait_index=True)
    assert result.stored == len(keys), result


def scheduler_report(llm) -> dict:
    """The engine core's scheduler after the round: requests it still tracks, blocks free."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    return {"sched_requests": len(scheduler.requests), "sched_held": sorted(scheduler.connector.connector_scheduler._held),
            "sched_verify": scheduler.connector.verification(),
            "free_blocks": pool.get_num_free_blocks(), "total_blocks": pool.num_gpu_blocks - 1}


def get_worker_layout():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().connector_worker.layout


if __name__ == "__main__":
    main()
