"""Ray Serve LLM's prefill/decode app (`ray.serve.llm:build_pd_openai_app`) end to end, on CPU,
configured as helm/examples/llm-pd-serve.yaml configures it: no `kvstore_address`, so the
engines' processes (Serve replicas, and the engine cores vLLM spawns from them) join the Ray
cluster they run in. Queried with the official `openai` client: completions (plain and streamed)
and chat. The KV is handed over (the decode side's loads are counted by kvstore's nodes) and the
text equals one engine's without any connector.

Ray Serve LLM 2.60 pins vLLM 0.29: this runs in .venv-vllm-0.29.0 (scripts/vllm-env.sh installs
ray[serve] there) and is skipped where `ray.serve.llm` does not import.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from test_engine import loads
from vllm_support import needs_engine, needs_vllm, run_engine, serve_engine_config, serve_llm_imports

pytestmark = [pytest.mark.vllm, needs_vllm, needs_engine]

MAX_TOKENS = 8
PORT = 8123


def words(seed: int, n: int) -> list[int]:
    """Token ids of the tiny model's word-level vocabulary (word w{i} is id i + 3)."""
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def text(ids: list[int]) -> str:
    return " ".join(f"w{i - 3}" for i in ids)


@pytest.mark.skipif(not serve_llm_imports(), reason="needs Ray Serve LLM (ray[serve] beside vLLM 0.29)")
def test_serve_pd_app_hands_kv_over_and_answers_as_one_engine(tiny_model, kv_cluster):
    import openai
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    rc, client = kv_cluster
    prompts = [words(21, 300), words(22, 300), words(23, 300)]
    baseline = run_engine({"model": tiny_model, "max_tokens": MAX_TOKENS, "rounds": [{"prompts": prompts}]})
    expected = [text(t) for t in baseline["rounds"][0]["tokens"]]
    app = build_pd_openai_app({"prefill_config": serve_engine_config(tiny_model, "kv_producer"),
                               "decode_config": serve_engine_config(tiny_model, "kv_consumer")})
    serve.start(http_options={"host": rc.ips[0], "port": PORT})
    try:
        serve.run(app, blocking=False)
        api = openai.OpenAI(base_url=f"http://{rc.ips[0]}:{PORT}/v1", api_key="unused", timeout=120)
        before = loads(client)
        plain = api.completions.create(model="tiny", prompt=text(prompts[0]), max_tokens=MAX_TOKENS, temperature=0)
        assert plain.choices[0].text.split() == expected[0].split()
        streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(
            model="tiny", prompt=text(prompts[1]), max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert streamed.split() == expected[1].split()
        chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text(prompts[2])}],
                                           max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content.split() == expected[2].split()
        # Each request's 2 full blocks were saved by the prefill engine and loaded by the decode
        # engine (the nodes count directory reads once a second).
        deadline = time.monotonic() + 10
        while loads(client) - before < 6 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert loads(client) - before >= 6
    finally:
        serve.shutdown()
