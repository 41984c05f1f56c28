"""Fixtures of the vLLM connector tests (marker `vllm`; run them in .venv-vllm, see
scripts/vllm-env.sh):

    bash scripts/vllm-env.sh
    .venv-vllm/bin/python -m pytest tests/vllm_engine -m vllm

Without vLLM installed every test here is skipped except the layout conversions, which need
only torch.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 128, 2 KV heads of 32) with a word-level tokenizer, built locally."""
    from tiny_model import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def kv_cluster():
    """kvstore on a real two-node Ray cluster on this machine (127.0.0.2 = node A, .3 = node B).

    The test process is a Ray driver on node A; engines started by the tests join as drivers
    on the node they are given. Yields (RayTestCluster, kvstore client).
    """
    import ray

    import kvstore
    from kvstore.cluster.localcluster import RayTestCluster

    rc = RayTestCluster(2, num_cpus=3).start()  # CPUs for Ray Serve's replicas (test_serve_pd.py)
    try:
        client = kvstore.connect(rc.gcs_address, host_tier_bytes="64MiB", slot_bytes="256KiB", event_batch_ms=10,
                                 lease_ttl_s=60)
        ray.get(client._controller.wait_ready.remote(2, 60))
        yield rc, client
        client.close(shutdown_cluster=True)
    finally:
        rc.stop()
