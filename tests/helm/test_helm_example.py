"""helm/examples/: the Ray Serve LLM prefill/decode RayService that uses kvstore's vLLM connector."""
from __future__ import annotations

from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from .conftest import EXAMPLES, KUBERNETES_VERSION, cluster_pod_templates, one, pod_template_as_pod

MANIFEST = EXAMPLES / "llm-pd-rayservice.yaml"


@pytest.fixture(scope="module")
def rayservice():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return one(docs, "RayService")


@pytest.fixture(scope="module")
def engines(rayservice):
    """role -> LLMConfig of the Serve application."""
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    app, = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_pd_openai_app"
    return {"prefill": app["args"]["prefill_config"], "decode": app["args"]["decode_config"]}


def test_rayservice_has_what_kuberay_requires(rayservice, kuberay_schema, kubernetes_validate):
    jsonschema.validate(rayservice, {**kuberay_schema, "$ref": "#/definitions/RayService"})
    for name, pod_template in cluster_pod_templates(rayservice["spec"]["rayClusterConfig"]).items():
        kubernetes_validate.validate(pod_template_as_pod(pod_template, f"x-{name}"), KUBERNETES_VERSION, strict=True)


def test_engines_use_the_kvstore_connector(engines):
    assert engines["prefill"]["model_loading_config"]["model_id"] == engines["decode"]["model_loading_config"]["model_id"]
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        transfer = engines[role]["engine_kwargs"]["kv_transfer_config"]
        assert transfer["kv_connector"] == "KVStoreConnector"
        assert transfer["kv_connector_module_path"] == "kvstore.connectors.vllm"
        assert transfer["kv_role"] == kv_role
        assert set(transfer["kv_connector_extra_config"]) == {"kvstore_address", "kvstore_token_file"}


def test_engines_reach_the_chart_service_and_secret(rayservice, engines, rendered_default, values_default):
    """The address, Secret and key are what the chart renders for release "kvstore"."""
    service = one(rendered_default, "Service")
    secret = one(rendered_default, "Secret")
    key = values_default["auth"]["secretKey"]
    for engine in engines.values():
        extra = engine["engine_kwargs"]["kv_transfer_config"]["kv_connector_extra_config"]
        address = urlsplit(extra["kvstore_address"])
        assert (address.scheme, address.hostname, address.port) == ("http", service["metadata"]["name"], service["spec"]["ports"][0]["port"])
        token_file = extra["kvstore_token_file"]
    # Every pod of the RayService mounts the token where the engines look for it.
    for name, pod_template in cluster_pod_templates(rayservice["spec"]["rayClusterConfig"]).items():
        volumes = {v["name"]: v for v in pod_template["spec"]["volumes"]}
        source = volumes["kvstore-token"]["secret"]
        assert source["secretName"] == secret["metadata"]["name"], name
        item, = source["items"]
        assert item["key"] == key
        mount = next(m for m in pod_template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "kvstore-token")
        assert f"{mount['mountPath']}/{item['path']}" == token_file, name


def test_gpu_workers_tell_ray_their_gpus(rayservice):
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"])
