"""helm/examples/: Ray Serve LLM prefill/decode deployed onto the kvstore chart's RayCluster.

llm-pd-serve.yaml is the Serve config (`serve deploy`); values-llm.yaml the chart's values that
make the RayCluster ready for it. The engines must run inside kvstore's Ray cluster, so the
connector gets no address, and the chart's GPU worker group must be able to hold them.
"""
from __future__ import annotations

import ast
import re

import jsonschema
import pytest
import yaml

from kvstore.config import load_config, parse_size
from kvstore.layout import Layout

from .conftest import (
    CHART,
    EXAMPLES,
    KUBERNETES_VERSION,
    REPO,
    cluster_pod_templates,
    deep_merge,
    one,
    pod_template_as_pod,
    run_helm,
    template,
)

SERVE_CONFIG = EXAMPLES / "llm-pd-serve.yaml"
VALUES_LLM = EXAMPLES / "values-llm.yaml"
README = EXAMPLES / "README.md"
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
CORE_KINDS = {"ConfigMap", "Secret", "Service", "NetworkPolicy"}

# Qwen2.5-7B-Instruct (the example's model_source), from its config.json: num_hidden_layers 28,
# num_key_value_heads 4, hidden_size 3584 / num_attention_heads 28 = head dim 128, bfloat16.
MODEL_SHAPE = {"Qwen/Qwen2.5-7B-Instruct": {"num_layers": 28, "num_kv_heads": 4, "head_dim": 128, "dtype": "bfloat16"}}


def connector_settings() -> set[str]:
    """The connector's kv_connector_extra_config names (_SETTINGS of connectors/vllm_settings.py),
    read without importing vLLM."""
    tree = ast.parse((REPO / "connectors" / "vllm_settings.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SETTINGS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("connectors/vllm_settings.py has no _SETTINGS")


@pytest.fixture(scope="module")
def serve_config():
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def engines(serve_config):
    """role -> LLMConfig of the Serve application."""
    app, = serve_config["applications"]
    assert app["import_path"] == "ray.serve.llm:build_pd_openai_app"
    return {"prefill": app["args"]["prefill_config"], "decode": app["args"]["decode_config"]}


@pytest.fixture(scope="module")
def values_llm(values_default):
    """values.yaml with values-llm.yaml over it, merged the way Helm merges."""
    return deep_merge(values_default, yaml.safe_load(VALUES_LLM.read_text()))


@pytest.fixture(scope="module")
def rendered_llm(helm_bin):
    return template(helm_bin, "--values", str(VALUES_LLM))


@pytest.fixture(scope="module")
def gpu_group(values_llm):
    """The one worker group with GPUs: where the engines land."""
    groups = [g for g in values_llm["workerGroups"] if g.get("gpus", 0) > 0]
    assert len(groups) == 1, "values-llm.yaml should have exactly one GPU worker group"
    return groups[0]


# --- the Serve config ---------------------------------------------------------------------

def test_serve_config_is_a_serve_deploy_file(serve_config):
    assert set(serve_config) <= {"proxy_location", "http_options", "grpc_options", "logging_config", "applications"}
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}  # what the README queries
    app, = serve_config["applications"]
    assert app["name"] and app["route_prefix"] == "/"


def test_engines_use_the_kvstore_connector(engines):
    assert engines["prefill"]["model_loading_config"] == engines["decode"]["model_loading_config"]
    for role, kv_role in ROLES.items():
        transfer = engines[role]["engine_kwargs"]["kv_transfer_config"]
        assert transfer["kv_connector"] == "KVStoreConnector"
        assert transfer["kv_connector_module_path"] == "kvstore.connectors.vllm"
        assert transfer["kv_role"] == kv_role
        assert transfer["kv_load_failure_policy"] == "recompute"


def test_engines_join_the_ray_cluster_they_run_in(engines, values_llm):
    """No address (the connector would join another cluster, or refuse an http:// one) and no
    token file: inside kvstore's cluster the client gets both from Ray."""
    known = connector_settings()
    namespaces = set()
    for role in ROLES:
        extra = engines[role]["engine_kwargs"]["kv_transfer_config"]["kv_connector_extra_config"]
        assert set(extra) <= known, f"{role}: unknown connector settings {set(extra) - known}"
        assert not extra.get("kvstore_address"), role
        assert "kvstore_token_file" not in extra, role
        assert not any("http" in str(v) for v in extra.values()), role
        namespaces.add(extra.get("kvstore_namespace", values_llm["config"]["namespace"]))
    assert namespaces == {values_llm["config"]["namespace"]}


def test_engines_request_gpus_the_gpu_group_has(engines, gpu_group, values_llm):
    assert values_llm["head"]["rayStartParams"].get("num-gpus", "0") in (0, "0")  # nothing else offers GPUs
    total_max = 0
    for role, engine in engines.items():
        # GPUs come from the placement group: Ray Serve LLM adds ray_actor_options to its first
        # bundle, so GPUs there would be counted twice.
        assert "num_gpus" not in engine.get("deployment_config", {}).get("ray_actor_options", {}), role
        pg = engine["placement_group_config"]
        assert pg["strategy"] == "STRICT_PACK", role  # one engine's GPUs on one pod
        tp = engine["engine_kwargs"].get("tensor_parallel_size", 1) * engine["engine_kwargs"].get("pipeline_parallel_size", 1)
        gpus = pg["bundle_per_worker"]["GPU"] * tp
        assert 1 <= gpus <= gpu_group["gpus"], role
        total_max += engine["deployment_config"]["autoscaling_config"]["max_replicas"] * gpus
    # The group can grow to hold every engine replica Serve may start (one pod per gpus GPUs).
    assert gpu_group["maxReplicas"] * gpu_group["gpus"] >= total_max
    assert values_llm["enableInTreeAutoscaling"] or gpu_group["replicas"] * gpu_group["gpus"] >= total_max


def test_slot_holds_one_engine_block(engines, rendered_llm, gpu_group, tmp_path):
    """A vLLM block of the model is one kvstore block; the GPU nodes' slot must hold it."""
    path = tmp_path / "gpu.yaml"
    path.write_text(one(rendered_llm, "ConfigMap")["data"][f"{gpu_group['groupName']}.yaml"])
    config = load_config(path, env={})
    for role, engine in engines.items():
        source = engine["model_loading_config"]["model_source"]
        kwargs = engine["engine_kwargs"]
        shape = MODEL_SHAPE[source]
        tp = kwargs.get("tensor_parallel_size", 1)
        # One block per TP rank: that rank's share of the KV heads.
        layout = Layout(model_id=source, num_layers=shape["num_layers"], num_kv_heads=shape["num_kv_heads"] // tp,
                        head_dim=shape["head_dim"], dtype=shape["dtype"], block_tokens=kwargs["block_size"], tp_size=tp)
        assert layout.block_nbytes <= config.slot_bytes, role
        assert layout.block_nbytes == config.slot_bytes, f"{role}: a slot of {config.slot_bytes} wastes memory"


# --- values-llm.yaml through the chart ------------------------------------------------------

def test_values_llm_pass_the_chart_schema_and_lint(values_llm, values_schema, helm_bin):
    jsonschema.validate(values_llm, values_schema)
    proc = run_helm(helm_bin, "lint", "--strict", str(CHART), "--values", str(VALUES_LLM))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_values_llm_render_what_kuberay_and_kubernetes_accept(rendered_llm, kuberay_schema, kubernetes_validate):
    cluster = one(rendered_llm, "RayCluster")
    jsonschema.validate(cluster, {**kuberay_schema, "$ref": "#/definitions/RayCluster"})
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        kubernetes_validate.validate(pod_template_as_pod(pod_template, f"x-{name}"), KUBERNETES_VERSION, strict=True)
    core = [d for d in rendered_llm if d["kind"] in CORE_KINDS]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_gpu_workers_run_the_serve_llm_image_with_gpus(rendered_llm, values_llm, gpu_group):
    cluster = one(rendered_llm, "RayCluster")
    image = f"{values_llm['image']['repository']}:{values_llm['image']['tag']}"
    # Every container runs the image with Ray Serve LLM, vLLM and kvstore (the README's Dockerfile).
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        for container in pod_template["spec"]["containers"]:
            assert container["image"] == image, (name, container["name"])
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == gpu_group["groupName"])
    worker = group["template"]["spec"]["containers"][0]
    assert worker["name"] == "ray-worker"
    for kind in ("requests", "limits"):
        assert worker["resources"][kind]["nvidia.com/gpu"] == gpu_group["gpus"]
    assert group["rayStartParams"]["num-gpus"] == str(gpu_group["gpus"])
    # Engines write weights and caches under the home directory.
    assert worker["securityContext"]["readOnlyRootFilesystem"] is False


def test_head_lets_serve_deploy_in_through_port_forward_only(rendered_llm):
    """`serve deploy` reaches the dashboard through `kubectl port-forward` to the head pod (which
    connects to the pod's loopback), with Ray's token: the dashboard is not on the pod's network."""
    head = one(rendered_llm, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["rayStartParams"]["dashboard-port"] == "8265"
    ray_head = head["template"]["spec"]["containers"][0]
    assert "dashboard" not in {p["name"] for p in ray_head["ports"]}
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in ray_head["env"]
    readme = README.read_text()
    assert "export RAY_AUTH_MODE=token" in readme
    assert "kubectl get secret --namespace llm kvstore-ray-auth -o jsonpath='{.data.auth_token}'" in readme
    assert "8265:8265" in readme


# --- the README -----------------------------------------------------------------------------

def supported_vllm() -> tuple[str, ...]:
    """SUPPORTED_VLLM of connectors/vllm.py, read without importing vLLM."""
    tree = ast.parse((REPO / "connectors" / "vllm.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED_VLLM" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("connectors/vllm.py has no SUPPORTED_VLLM")


def test_the_image_recipe_is_in_the_repo_and_matches_the_cluster(values_llm):
    """Dockerfile.ray-llm: the base's Ray is the chart's rayVersion, the vLLMs it accepts are the
    connector's, and it copies every package directory pyproject.toml maps."""
    dockerfile = (REPO / "Dockerfile.ray-llm").read_text()
    assert re.search(rf"^FROM rayproject/ray-llm:{re.escape(values_llm['rayVersion'])}-", dockerfile, re.M)
    accepted = re.search(r'case "\$VLLM" in ([^)]*)\)', dockerfile).group(1).split("|")
    assert sorted(accepted) == sorted(f"{minor}.*" for minor in supported_vllm())
    for directory in ("kvstore", "tiers", "cluster", "connectors"):
        assert re.search(rf"^COPY .* {directory} /src/kvstore/{directory}$", dockerfile, re.M), directory


def test_readme_builds_installs_and_deploys_these_files(values_llm):
    readme = README.read_text()
    image = f"{values_llm['image']['repository']}:{values_llm['image']['tag']}"
    assert "Dockerfile.ray-llm" in readme
    assert f"docker build -f Dockerfile.ray-llm -t {image} ." in readme
    assert "helm install kvstore helm/kvstore --namespace llm --create-namespace -f helm/examples/values-llm.yaml" in readme
    assert "serve deploy --address http://127.0.0.1:8265 helm/examples/llm-pd-serve.yaml" in readme
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in readme
    assert "llm-pd-rayservice" not in readme and "kvstore_address: http" not in readme
