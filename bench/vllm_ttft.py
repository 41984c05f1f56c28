"""Decode TTFT through the vLLM connector, per way an engine reaches kvstore, with and without the KV.

    bash scripts/vllm-env.sh && .venv-vllm/bin/python -m bench.vllm_ttft --json bench-results/vllm_ttft.json

A two-node Ray cluster on this machine runs kvstore (and its HTTP service, for engines outside
Ray). Every engine is vLLM's real CPU engine in a process of its own (tests/vllm_engine/
engine_main.py), on a small Llama built locally (8 layers, hidden 512, 2 KV heads of 64: a
3,000-token prefill takes about a second here, so loading and computing can be told apart). For
each path a producer computes the prompt and hands it off; a consumer engine then answers the
same prompt with max_tokens=1 using the handoff, and a consumer without a connector computes it.
Each consumer answers a warm-up prompt first, so one-time start-up costs are not counted. Paths:
- ray: engines that are Ray drivers of kvstore's cluster (producer on node A, consumer on B);
- kvstore: engines outside Ray, through kvstore://HOST:PORT (no Ray in their processes);
- kvstore_mp: the same with vLLM's engine core in a process of its own
  (VLLM_ENABLE_V1_MULTIPROCESSING=1), where the connector's scheduler side runs;
- openai: two vLLM OpenAI servers in PD roles on kvstore:// (the prefill server asked with
  max_tokens=1 and do_remote_decode, the decode server with the kv_transfer_params it returned);
  without the KV: the decode server answering a prompt of the same length that no store holds;
- serve: Ray Serve LLM's PD app (`build_pd_openai_app`, vLLM 0.29 and ray[serve]: run it with
  .venv-vllm-0.29.0/bin/python and `--paths serve`), its engines in the Ray cluster as
  helm/examples configures them, asked through its OpenAI endpoint with the openai client. Its
  decode side orchestrates prefill, so what a client sees is the whole request's time to the
  first streamed token: prefill on one engine, then decode's first token on the other, with the
  KV handed over; without: the same app with the decode engine in another key namespace, so
  it finds nothing and computes the prompt itself.
Figures: `ttft_s_<path>_kv`, `ttft_s_<path>_recompute`, `speedup_<path>` (recompute / with KV;
target >= 1.5: a load must beat computing the prompt; for serve, where both include the
prefill, at most 2 can be reached).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import parser, report

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "vllm_engine")
sys.path[:0] = [HERE, os.path.dirname(HERE)]

PROMPT_TOKENS = 3000
MODEL = dict(num_layers=8, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
             head_dim=64, max_position_embeddings=4096)


def openai_server(model: str, port: int, role: str, extra: dict) -> subprocess.Popen:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`: `vllm serve` does not
    run from the CPU build) on loopback, with the connector in `role`; its engine core in a
    process of its own, as vLLM runs it by default."""
    config = {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.connectors.vllm",
              "kv_role": role, "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
         "--kv-cache-memory-bytes", str(256 * 1024**2), "--no-enable-prefix-caching",
         "--kv-transfer-config", json.dumps(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def complete(port: int, body: dict, timeout_s: float = 120) -> tuple[dict, float]:
    """POST /v1/completions; returns (the answer, seconds)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    elapsed = time.perf_counter() - start
    conn.close()
    if reply.status != 200:
        raise RuntimeError(f"completion: {reply.status} {data[:500]!r}")
    return json.loads(data), elapsed


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import http.client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the OpenAI server on port {port} exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the OpenAI server on port {port} did not come up in {timeout_s} s")


def two_servers(model: str, extra: dict, prompt: list[int], warm: list[int], cold: list[int]) -> tuple[float, float]:
    """PD with two OpenAI servers: the prefill server answers with max_tokens=1 and
    do_remote_decode, the decode server gets the same request with the returned
    kv_transfer_params. Returns the decode server's (seconds with the KV, seconds for a prompt of
    the same length that is in no store)."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    servers = [openai_server(model, ports[0], "kv_producer", extra), openai_server(model, ports[1], "kv_consumer", extra)]
    try:
        for port, proc in zip(ports, servers):
            wait_healthy(port, proc)
        base = {"model": model, "max_tokens": 1, "temperature": 0}
        made, _ = complete(ports[0], {**base, "prompt": prompt, "kv_transfer_params": {"do_remote_decode": True}})
        params = made["kv_transfer_params"]
        assert params and params["num_tokens"] > PROMPT_TOKENS - 256, params
        complete(ports[1], {**base, "prompt": warm})
        _, with_kv = complete(ports[1], {**base, "prompt": prompt, "kv_transfer_params": params})
        _, recomputed = complete(ports[1], {**base, "prompt": cold})
        return with_kv, recomputed
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve_pd(model: str, host: str, prompt: list[int], warm: list[int], same_namespace: bool) -> float:
    """Ray Serve LLM's PD app, deployed in the Ray cluster this process is a driver of: seconds
    to the first streamed token of `prompt` (after a warm-up request of `warm`). Without
    `same_namespace`, the decode engine's keys are not the prefill engine's: it computes."""
    import openai
    from ray import serve
    from ray.serve.llm import build_pd_openai_app
    from vllm_support import serve_engine_config

    sizes = {"max_model_len": 4096, "kv_cache_bytes": 256 * 1024**2}
    app = build_pd_openai_app({
        "prefill_config": serve_engine_config(model, "kv_producer", "ttft-serve", **sizes),
        "decode_config": serve_engine_config(model, "kv_consumer", "ttft-serve" if same_namespace else "ttft-elsewhere",
                                             **sizes)})
    serve.start(http_options={"host": host, "port": 8124})
    try:
        serve.run(app, blocking=False)
        api = openai.OpenAI(base_url=f"http://{host}:8124/v1", api_key="unused", timeout=300)

        def first_token_s(tokens: list[int]) -> float:
            start = time.perf_counter()
            for _ in api.completions.create(model="tiny", prompt=tokens, max_tokens=1, temperature=0, stream=True):
                return time.perf_counter() - start
            raise AssertionError("the PD app streamed nothing")

        first_token_s(warm)
        return first_token_s(prompt)
    finally:
        serve.shutdown()


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--load-mode", choices=("async", "sync"), help="the consumers' kvstore_load_mode (default: the connector's)")
    p.add_argument("--paths", default="ray,kvstore,kvstore_mp,openai", help="which paths, comma-separated")
    args = p.parse_args(argv)
    import ray

    import kvstore
    from kvstore.cluster.localcluster import RayTestCluster
    from kvtest_support import http_service
    from tiny_model import build_tiny_llama
    from vllm_support import run_engine

    work = tempfile.mkdtemp(prefix="kvstore-ttft-")
    model = build_tiny_llama(os.path.join(work, "model"), **MODEL)
    rng = np.random.default_rng(0)
    prompt, warm, cold = (rng.integers(3, 500, PROMPT_TOKENS).tolist() for _ in range(3))
    base = {"model": model, "max_tokens": 1, "max_model_len": 4096, "kv_cache_bytes": 256 * 1024**2}
    rc = RayTestCluster(2, num_cpus=3).start()  # CPUs for Ray Serve's replicas (the serve path)
    figures: dict = {}
    try:
        client = kvstore.connect(rc.gcs_address, host_tier_bytes="1GiB", event_batch_ms=10, lease_ttl_s=120)
        ray.get(client._controller.wait_ready.remote(2, 60))
        token_file = os.path.join(work, "token")
        with open(token_file, "w") as f:
            f.write(client._token)
        service = http_service(client, client._token)
        address = "kvstore://" + next(service).removeprefix("http://")
        remote = {"kvstore_address": address, "kvstore_token_file": token_file}
        paths = {"ray": ({"ray": {"address": rc.gcs_address, "node_ip": rc.ips[0]}},
                         {"ray": {"address": rc.gcs_address, "node_ip": rc.ips[1]}}, {}),
                 "kvstore": ({"no_ray": True}, {"no_ray": True}, remote),
                 "kvstore_mp": ({"no_ray": True, "multiprocessing": True},
                                {"no_ray": True, "multiprocessing": True}, remote)}
        for name in args.paths.split(","):
            at_producer, at_consumer, extra = paths.get(name, ({}, {}, remote))
            extra = {**extra, "kvstore_namespace": f"ttft-{name}", "kvstore_verify_fraction": 0,
                     "kvstore_verify_first_n": 0, **({"kvstore_load_mode": args.load_mode} if args.load_mode else {})}
            if name == "serve":
                with_kv = serve_pd(model, rc.ips[0], prompt, warm, same_namespace=True)
                recomputed = serve_pd(model, rc.ips[0], cold, warm, same_namespace=False)
                figures.update({"ttft_s_serve_kv": with_kv, "ttft_s_serve_recompute": recomputed,
                                "speedup_serve": recomputed / with_kv})
                print(f"{name}: with the KV {with_kv:.3f} s, decode recomputing {recomputed:.3f} s", flush=True)
                continue
            if name == "openai":
                with_kv, recomputed = two_servers(model, extra, prompt, warm, cold)
                figures.update({"ttft_s_openai_kv": with_kv, "ttft_s_openai_recompute": recomputed,
                                "speedup_openai": recomputed / with_kv})
                print(f"{name}: with the KV {with_kv:.3f} s, recomputed {recomputed:.3f} s", flush=True)
                continue
            (made,) = run_engine({**base, **at_producer, "rounds": [{"prompts": [prompt]}],
                                  "connector": {"kv_role": "kv_producer", "extra": extra}})["rounds"]
            (handle,) = made["kv_transfer_params"]
            assert handle and handle["num_tokens"] > PROMPT_TOKENS - 256, handle  # every full block (of 128 on CPU)
            mp = {"multiprocessing": True} if at_consumer.get("multiprocessing") else {}
            _, loaded = run_engine({**base, **at_consumer, "rounds": [
                {"prompts": [warm]}, {"prompts": [prompt], "handoffs": [handle]}],
                "connector": {"kv_role": "kv_consumer", "extra": extra}})["rounds"]
            _, computed = run_engine({**base, **mp, "rounds": [{"prompts": [warm]}, {"prompts": [prompt]}]})["rounds"]
            assert loaded["tokens"] == computed["tokens"], (loaded["tokens"], computed["tokens"])
            figures[f"ttft_s_{name}_kv"] = loaded["seconds"]
            figures[f"ttft_s_{name}_recompute"] = computed["seconds"]
            figures[f"speedup_{name}"] = computed["seconds"] / loaded["seconds"]
            print(f"{name}: with the KV {loaded['seconds']:.3f} s, recomputed {computed['seconds']:.3f} s", flush=True)
        next(service, None)
        client.close(shutdown_cluster=True)
    finally:
        rc.stop()
    targets = {f"speedup_{name}": (">=", 1.5) for name in args.paths.split(",")}
    return report("vllm_ttft", figures, targets, args.json,
                  notes={"prompt_tokens": PROMPT_TOKENS, "model": MODEL, "time": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    raise SystemExit(main())
