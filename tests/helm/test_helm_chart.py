"""The Helm chart helm/kvstore: lint, render, validate offline, and agree with kvstore/config.py."""
from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from kvstore.config import FIELDS, Config, load_config, parse_size
from kvstore.tenants import Tenant, load_tenants

from .conftest import (
    CHART,
    CI_VALUES,
    KUBERNETES_VERSION,
    NAMESPACE,
    RELEASE,
    REPO,
    by_kind,
    cluster_pod_templates,
    one,
    pod_template_as_pod,
    run_helm,
    template,
)
from .fake_apiserver import FakeAPIServer

# Settings the chart sets itself (from `ports`, `auth`, `tenants`, `tls`, a group's `nvme`, the
# environment) and therefore refuses in a `config` block. Every other setting of kvstore/config.py
# must be in the schema's kvstoreConfig, so a setting added to the service shows up here until the
# chart has it.
CHART_OWNED = {
    "http_host", "http_port", "flight_host", "flight_port",
    "nvme_path", "ray_address", "auth_token", "auth_token_file", "node_name",
    "tenants_file",  # from `tenants`, a Secret mounted at /etc/kvstore/tenants
    "tls_cert_file", "tls_key_file", "tls_ca_file",  # from `tls`, a Secret mounted at /etc/kvstore/tls
}
TOKEN_PATH = "/etc/kvstore/secret/token"
CONFIG_PATH = "/etc/kvstore/config.yaml"
CORE_KINDS = {"ConfigMap", "Secret", "Service", "Ingress", "NetworkPolicy"}


@pytest.fixture(params=["default", "ci"])
def case(request, rendered_default, rendered_ci, values_default, values_ci):
    """(rendered documents, effective values) with values.yaml alone and with ci-values.yaml."""
    if request.param == "default":
        return rendered_default, values_default
    return rendered_ci, values_ci


def groups_of(values):
    """Group name -> that group's values, head first."""
    return {"head": values["head"], **{g["groupName"]: g for g in values["workerGroups"]}}


def containers(pod_template):
    return {c["name"]: c for c in pod_template["spec"]["containers"]}


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def volumes(pod_template):
    return {v["name"]: v for v in pod_template["spec"].get("volumes", [])}


def secret_named(docs, name):
    found = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one Secret {name}, got {len(found)}"
    return found[0]


def ray_port_params(values, role):
    """The `ray start` parameters the chart owns: Ray's ports from `ray.ports`, and on the head the
    dashboard's address (127.0.0.1 unless exposed in the cluster) and port."""
    ports = values["ray"]["ports"]
    params = {
        "node-manager-port": ports["nodeManager"], "object-manager-port": ports["objectManager"],
        "dashboard-agent-grpc-port": ports["dashboardAgentGrpc"],
        "dashboard-agent-listen-port": ports["dashboardAgentHttp"],
        "runtime-env-agent-port": ports["runtimeEnvAgent"], "metrics-export-port": ports["metricsExport"],
        "min-worker-port": ports["minWorker"], "max-worker-port": ports["maxWorker"],
    }
    if role == "head":
        dashboard = values["ray"]["dashboard"]
        params["dashboard-host"] = "0.0.0.0" if dashboard["exposeInCluster"] else "127.0.0.1"
        params["dashboard-port"] = dashboard["port"]
    return {k: str(v) for k, v in params.items()}


# --- lint and render -----------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, CI_VALUES], ids=["default", "ci"])
def test_lint_strict(helm_bin, values):
    args = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    proc = run_helm(helm_bin, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_rendered_kinds(rendered_default, rendered_ci):
    # Two generated Secrets: kvstore's token and Ray's.
    assert sorted(d["kind"] for d in rendered_default) == [
        "ConfigMap", "NetworkPolicy", "RayCluster", "Secret", "Secret", "Service"]
    # ci-values: existing Secrets (none rendered), ServiceMonitor and Ingress on.
    assert sorted(d["kind"] for d in rendered_ci) == [
        "ConfigMap", "Ingress", "NetworkPolicy", "RayCluster", "Service", "ServiceMonitor"]


def test_core_kinds_validate_strict(case, kubernetes_validate):
    docs, _ = case
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_resource_has_recommended_labels(case):
    docs, _ = case
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, (doc["kind"], key)


# --- the RayCluster ---------------------------------------------------------------------------

def test_raycluster_has_what_kuberay_requires(case, kuberay_schema, kubernetes_validate):
    docs, values = case
    cluster = one(docs, "RayCluster")
    jsonschema.validate(cluster, {**kuberay_schema, "$ref": "#/definitions/RayCluster"})
    spec = cluster["spec"]
    assert spec["rayVersion"] == values["rayVersion"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == [g["groupName"] for g in values["workerGroups"]]
    for group, wanted in zip(spec["workerGroupSpecs"], values["workerGroups"]):
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert group[key] == wanted[key]
    # The pod templates are core PodTemplateSpecs: validate them as Pods, unknown fields included.
    for name, pod_template in cluster_pod_templates(spec).items():
        kubernetes_validate.validate(pod_template_as_pod(pod_template, f"x-{name}"), KUBERNETES_VERSION, strict=True)


def test_head_runs_ray_then_the_kvstore_service(case):
    docs, values = case
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"] == {**{k: str(v) for k, v in values["head"]["rayStartParams"].items()},
                                      **ray_port_params(values, "head")}
    spec = head["template"]["spec"]
    # KubeRay runs `ray start` in the first container.
    assert [c["name"] for c in spec["containers"]] == ["ray-head", "kvstore"]
    service = spec["containers"][1]
    assert service["command"] == ["kvstore", "serve", "--config", CONFIG_PATH]
    assert env_of(service)["KVSTORE_RAY_ADDRESS"]["value"] == "127.0.0.1:6379"
    assert {p["name"]: p["containerPort"] for p in service["ports"]} == {"http": values["ports"]["http"]}
    for probe in ("readinessProbe", "livenessProbe"):
        # With TLS the service speaks https only, and so must the kubelet's probes.
        scheme = {"scheme": "HTTPS"} if values["tls"]["enabled"] else {}
        assert service[probe]["httpGet"] == {"path": "/healthz", "port": "http", **scheme}
        for key, value in values["head"]["serviceContainer"][probe].items():
            assert service[probe][key] == value


def test_every_container_reads_its_group_config_and_the_token(case):
    docs, values = case
    cluster = one(docs, "RayCluster")
    secret_name = values["auth"]["existingSecret"] or f"{cluster['metadata']['name']}-auth"
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        etc = volumes(pod_template)["kvstore-etc"]["projected"]["sources"]
        assert etc[0]["configMap"]["items"] == [{"key": f"{name}.yaml", "path": "config.yaml"}]
        assert etc[1]["secret"]["name"] == secret_name
        assert etc[1]["secret"]["items"][0]["key"] == values["auth"]["secretKey"]
        assert etc[1]["secret"]["items"][0]["path"] == "secret/token"
        for container in pod_template["spec"]["containers"]:
            env = env_of(container)
            assert env["KVSTORE_CONFIG"]["value"] == CONFIG_PATH
            # flight_host is the pod IP, from the downward API (the environment beats the file).
            assert env["KVSTORE_FLIGHT_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/etc/kvstore"] == "kvstore-etc"
            assert mounts["/dev/shm"] == "dshm"
            assert mounts["/tmp"] == "tmp"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        ray = pod_template["spec"]["containers"][0]
        assert {"name": "flight", "containerPort": values["ports"]["flight"]} in ray["ports"]
        assert pod_template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod_template["metadata"]["labels"]["app.kubernetes.io/component"] == (
            "head" if name == "head" else "worker")


def test_gpu_group_requests_gpus_and_tells_ray(rendered_ci, values_ci):
    cluster = one(rendered_ci, "RayCluster")
    gpu_groups = 0
    for group, wanted in zip(cluster["spec"]["workerGroupSpecs"], values_ci["workerGroups"]):
        gpus = wanted.get("gpus", 0)
        resources = group["template"]["spec"]["containers"][0].get("resources", {})
        if gpus:
            gpu_groups += 1
            assert resources["limits"]["nvidia.com/gpu"] == gpus
            assert resources["requests"]["nvidia.com/gpu"] == gpus
            assert group["rayStartParams"]["num-gpus"] == str(gpus)
            for key, value in wanted["rayStartParams"].items():
                assert group["rayStartParams"][key] == str(value)
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {})
            assert "num-gpus" not in group["rayStartParams"]
    assert gpu_groups == 1
    head = cluster["spec"]["headGroupSpec"]
    assert "num-gpus" not in head["rayStartParams"]


def effective(values, group, key, default):
    return group.get("config", {}).get(key, values["config"].get(key, default))


def test_dev_shm_holds_the_host_tier_plus_headroom(case):
    docs, values = case
    cluster = one(docs, "RayCluster")
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        group = groups_of(values)[name]
        dshm = volumes(pod_template)["dshm"]["emptyDir"]
        assert dshm["medium"] == "Memory"
        host = parse_size(effective(values, group, "host_tier_bytes", Config().host_tier_bytes))
        headroom = parse_size(group.get("shmHeadroom", "1GiB"))
        assert parse_size(dshm["sizeLimit"]) == host + headroom, name
        # tmpfs pages count against the Ray container's memory limit.
        limits = pod_template["spec"]["containers"][0].get("resources", {}).get("limits", {})
        if "memory" in limits:
            assert parse_size(limits["memory"]) >= host + headroom


def test_nvme_volumes(rendered_ci, values_ci):
    cluster = one(rendered_ci, "RayCluster")
    templates = cluster_pod_templates(cluster["spec"])
    # The head: a hostPath.
    head_nvme = values_ci["head"]["nvme"]
    assert volumes(templates["head"])["nvme"]["hostPath"] == head_nvme["hostPath"]
    mounts = {m["name"]: m["mountPath"] for m in templates["head"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["nvme"] == head_nvme["mountPath"]
    # The kvstore service container does not touch the NVMe tier.
    assert "nvme" not in {m["name"] for m in templates["head"]["spec"]["containers"][1]["volumeMounts"]}
    # The GPU group: a generic ephemeral volume (RayCluster pod templates have no volumeClaimTemplates).
    gpu = next(g for g in values_ci["workerGroups"] if g["groupName"] == "gpu")
    claim = volumes(templates["gpu"])["nvme"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == gpu["nvme"]["pvc"]["storageClassName"]
    assert claim["accessModes"] == gpu["nvme"]["pvc"]["accessModes"]
    assert claim["resources"]["requests"]["storage"] == gpu["nvme"]["pvc"]["size"]
    # A group without an NVMe volume has none.
    assert "nvme" not in volumes(templates["cpu-memory"])
    # A host path's NVMe file is found again by the Kubernetes node's name (a recreated pod has a new
    # name); a per-pod volume dies with its pod, so the pod's own name (the default) is right there.
    def node_name_env(template):
        env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
        return env.get("KVSTORE_NODE_NAME")
    assert node_name_env(templates["head"])["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert node_name_env(templates["gpu"]) is None and node_name_env(templates["cpu-memory"]) is None


# --- the config files -------------------------------------------------------------------------

def test_config_files_load_with_the_service_loader(case, tmp_path):
    """Each group's config.yaml parses with kvstore.config.load_config and holds the values set."""
    docs, values = case
    cluster = one(docs, "RayCluster")
    data = one(docs, "ConfigMap")["data"]
    groups = groups_of(values)
    assert set(data) == {f"{name}.yaml" for name in groups}
    for name, group in groups.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(data[f"{name}.yaml"])
        config = load_config(path, env={})
        settings = {**values["config"], **group.get("config", {})}
        for key, value in settings.items():
            kind = FIELDS[key].metadata["kind"]
            expected = parse_size(value) if kind == "size" else value
            assert getattr(config, key) == expected, (name, key)
        assert config.http_host == "0.0.0.0"
        assert config.http_port == values["ports"]["http"]
        assert config.flight_port == values["ports"]["flight"]
        assert config.auth_token_file == TOKEN_PATH
        nvme = group.get("nvme", {"type": "none"})
        assert config.nvme_path == ("" if nvme["type"] == "none" else nvme["mountPath"])
        # The service reads the token from the mounted Secret, never from the ConfigMap.
        assert config.auth_token == ""
        tenants = values["tenants"]
        has_tenants = bool(tenants["existingSecret"] or tenants["list"])
        assert config.tenants_file == (f"/etc/kvstore/tenants/{tenants['secretKey']}" if has_tenants else "")
        tls = values["tls"]["enabled"]
        assert (config.tls_cert_file, config.tls_key_file, config.tls_ca_file) == (
            ("/etc/kvstore/tls/tls.crt", "/etc/kvstore/tls/tls.key", "/etc/kvstore/tls/ca.crt") if tls else ("", "", ""))
    # The head's service container gets ray_address from the environment, with that file.
    head_env = {e["name"]: e.get("value") for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]["env"]}
    path = tmp_path / "head.yaml"
    config = load_config(path, env={k: v for k, v in head_env.items() if v is not None} | {"KVSTORE_FLIGHT_HOST": "10.0.0.7"})
    assert config.ray_address == "127.0.0.1:6379"
    assert config.flight_host == "10.0.0.7"


def test_values_defaults_are_the_service_defaults(values_default):
    defaults = Config()
    groups = groups_of(values_default)
    for key, value in [*values_default["config"].items(), *groups["head"]["config"].items()]:
        if key in ("host_tier_bytes",):
            continue  # sized per group on purpose
        kind = FIELDS[key].metadata["kind"]
        assert (parse_size(value) if kind == "size" else value) == getattr(defaults, key), key


def test_schema_knows_every_setting_of_config_py(values_schema):
    settings = values_schema["definitions"]["kvstoreConfig"]["properties"]
    missing = set(FIELDS) - CHART_OWNED - set(settings)
    assert not missing, (
        f"kvstore/config.py has settings the chart does not expose: {sorted(missing)}; add them to "
        "values.schema.json (kvstoreConfig), values.yaml and helm/kvstore/README.md, or to CHART_OWNED")
    assert not set(settings) - set(FIELDS), "the schema names settings kvstore/config.py lacks"
    assert not set(settings) & CHART_OWNED
    json_type = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}
    for name, prop in settings.items():
        meta = FIELDS[name].metadata
        if meta["kind"] == "size":
            assert {"$ref": "#/definitions/size"} in prop["allOf"], name
        else:
            assert prop["type"] == json_type[meta["kind"]], name
        if meta["choices"]:
            assert prop["enum"] == list(meta["choices"]), name


def test_chart_versions_follow_pyproject():
    pyproject = (REPO / "pyproject.toml").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject).group(1)
    assert values["rayVersion"] == re.search(r'"ray==([^"]+)"', pyproject).group(1)


# --- auth, Service, ServiceMonitor, Ingress -------------------------------------------------

def test_generated_token_secret(rendered_default, values_default):
    secret = secret_named(rendered_default, "kvstore-auth")
    assert secret["metadata"]["name"] == "kvstore-auth"
    token = base64.b64decode(secret["data"][values_default["auth"]["secretKey"]]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)


def test_existing_secret_is_used_not_created(rendered_ci, values_ci):
    assert not by_kind(rendered_ci, "Secret")
    monitor = one(rendered_ci, "ServiceMonitor")
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == {"name": values_ci["auth"]["existingSecret"], "key": values_ci["auth"]["secretKey"]}


def test_service_selects_the_head_pod(case):
    docs, values = case
    service = one(docs, "Service")
    assert service["spec"]["type"] == values["service"]["type"]
    app_protocol = {"appProtocol": "https"} if values["tls"]["enabled"] else {}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": values["service"]["port"], "targetPort": "http", "protocol": "TCP", **app_protocol}]
    templates = cluster_pod_templates(one(docs, "RayCluster")["spec"])
    selector = service["spec"]["selector"].items()
    assert selector <= templates.pop("head")["metadata"]["labels"].items()
    for pod_template in templates.values():
        assert not selector <= pod_template["metadata"]["labels"].items()


def test_service_monitor(rendered_ci, values_ci):
    monitor = one(rendered_ci, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    endpoint, = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == values_ci["serviceMonitor"]["interval"]
    assert endpoint["scrapeTimeout"] == values_ci["serviceMonitor"]["scrapeTimeout"]
    assert endpoint["authorization"]["type"] == "Bearer"
    service = one(rendered_ci, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_ingress_routes_to_the_service(rendered_ci, values_ci):
    ingress = one(rendered_ci, "Ingress")
    service = one(rendered_ci, "Service")
    assert ingress["spec"]["ingressClassName"] == values_ci["ingress"]["className"]
    assert ingress["spec"]["tls"] == values_ci["ingress"]["tls"]
    rule, = ingress["spec"]["rules"]
    assert rule["host"] == values_ci["ingress"]["hosts"][0]["host"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}


# --- Ray locked down: token auth, the dashboard, the NetworkPolicy (issue 10) ------------------

RAY_TOKEN_DIR = "/etc/ray/auth"
SELECTOR = {"app.kubernetes.io/name": "kvstore", "app.kubernetes.io/instance": "kvstore"}
GCS_PORT, RAY_CLIENT_PORT = 6379, 10001


def ray_secret_name(values, cluster_name):
    return values["ray"]["auth"]["existingSecret"] or f"{cluster_name}-ray-auth"


def all_containers(cluster):
    """(group, container) of every container of every pod template of a RayCluster."""
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        for container in pod_template["spec"]["containers"]:
            yield name, container


def test_ray_token_auth_on_every_container_from_the_secret(case):
    """Every container is a Ray process or a Ray driver (`kvstore serve`): each gets token mode and
    the token as a file from the Secret, never as a literal in the manifest."""
    docs, values = case
    cluster = one(docs, "RayCluster")
    secret = ray_secret_name(values, cluster["metadata"]["name"])
    seen = set()
    for group, container in all_containers(cluster):
        seen.add(container["name"])
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, (group, container["name"])
        assert env["RAY_AUTH_TOKEN_PATH"]["value"] == f"{RAY_TOKEN_DIR}/token"
        # A literal RAY_AUTH_TOKEN would win over the file and put the token into the manifest.
        assert "RAY_AUTH_TOKEN" not in env
        mount, = [m for m in container["volumeMounts"] if m["name"] == "ray-auth"]
        assert mount == {"name": "ray-auth", "mountPath": RAY_TOKEN_DIR, "readOnly": True}
    assert seen == {"ray-head", "kvstore", "ray-worker"}
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        ray_auth = volumes(pod_template)["ray-auth"]["secret"]
        assert ray_auth == {"secretName": secret, "items": [
            {"key": values["ray"]["auth"]["secretKey"], "path": "token", "mode": 0o440}]}, name
    # Ray's token is not kvstore's: a tenant or admin credential never opens Ray.
    kvstore_secret = values["auth"]["existingSecret"] or f"{cluster['metadata']['name']}-auth"
    assert secret != kvstore_secret
    assert "RAY_AUTH" not in one(docs, "ConfigMap")["data"]["head.yaml"]


def test_autoscaler_sidecar_gets_the_ray_token(rendered_ci, rendered_default, values_ci):
    cluster = one(rendered_ci, "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    options = cluster["spec"]["autoscalerOptions"]
    assert options["env"] == [{"name": "RAY_AUTH_MODE", "value": "token"},
                              {"name": "RAY_AUTH_TOKEN_PATH", "value": f"{RAY_TOKEN_DIR}/token"}]
    # Only Ray's token, not kvstore's config and token under /etc/kvstore.
    assert options["volumeMounts"] == [{"name": "ray-auth", "mountPath": RAY_TOKEN_DIR, "readOnly": True}]
    assert "autoscalerOptions" not in one(rendered_default, "RayCluster")["spec"]


def test_generated_ray_token_secret(rendered_default, values_default):
    secret = secret_named(rendered_default, "kvstore-ray-auth")
    assert secret["type"] == "Opaque"
    assert set(secret["data"]) == {values_default["ray"]["auth"]["secretKey"]} == {"auth_token"}
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
    assert token != base64.b64decode(secret_named(rendered_default, "kvstore-auth")["data"]["token"]).decode()


def test_existing_ray_secret_is_used_not_created(rendered_ci, values_ci):
    assert values_ci["ray"]["auth"]["existingSecret"] == "kvstore-ray-token"
    assert not by_kind(rendered_ci, "Secret")
    for _, pod_template in cluster_pod_templates(one(rendered_ci, "RayCluster")["spec"]).items():
        assert volumes(pod_template)["ray-auth"]["secret"]["secretName"] == "kvstore-ray-token"
        assert volumes(pod_template)["ray-auth"]["secret"]["items"][0]["key"] == "ray-token"


def test_ray_auth_disabled_cleanly(helm_bin):
    """ray.auth.enabled=false: no Secret, volume or mount, and RAY_AUTH_MODE=disabled said outright
    (Ray 2.60 otherwise turns token mode on in whichever process finds ~/.ray/auth_token)."""
    docs = template(helm_bin, "--set", "ray.auth.enabled=false", "--set", "enableInTreeAutoscaling=true")
    assert [s["metadata"]["name"] for s in by_kind(docs, "Secret")] == ["kvstore-auth"]
    cluster = one(docs, "RayCluster")
    assert "autoscalerOptions" not in cluster["spec"]
    for group, container in all_containers(cluster):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"]["value"] == "disabled", (group, container["name"])
        assert "RAY_AUTH_TOKEN_PATH" not in env and "RAY_AUTH_TOKEN" not in env
        assert "ray-auth" not in {m["name"] for m in container["volumeMounts"]}
    for pod_template in cluster_pod_templates(cluster["spec"]).values():
        assert "ray-auth" not in volumes(pod_template)


def _helm_against(api, helm_bin, tmp_path, *args):
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
    home = tmp_path / "home"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "KUBECONFIG": str(kubeconfig),
           "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    proc = subprocess.run([helm_bin, *args, "--namespace", NAMESPACE, "--disable-openapi-validation"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _released_secret(api, name):
    release = api.releases(NAMESPACE)[-1]
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    return secret_named(docs, name), release


def test_ray_token_is_kept_across_upgrades(helm_bin, tmp_path):
    """A real `helm install` then `helm upgrade` against an API server (lookup runs only there):
    the upgrade renders the token the install generated, so running Ray nodes keep working."""
    with FakeAPIServer() as api:
        _helm_against(api, helm_bin, tmp_path, "install", RELEASE, str(CHART))
        installed, release = _released_secret(api, "kvstore-ray-auth")
        assert release["version"] == 1
        stored = api.get("v1", "secrets", NAMESPACE, "kvstore-ray-auth")
        assert stored["data"] == installed["data"]
        _helm_against(api, helm_bin, tmp_path, "upgrade", RELEASE, str(CHART), "--set", "config.log_level=DEBUG")
        upgraded, release = _released_secret(api, "kvstore-ray-auth")
        assert release["version"] == 2 and release["info"]["status"] == "deployed"
        assert upgraded["data"] == installed["data"]
        # The release notes say how to reach the dashboard and where Ray's token is.
        notes = release["info"]["notes"]
        assert 'kubectl port-forward --namespace kvstore "$(kubectl get pod --namespace kvstore -l ray.io/cluster=kvstore,ray.io/node-type=head -o name)" 8265:8265' in notes
        assert "export RAY_AUTH_TOKEN=$(kubectl get secret --namespace kvstore kvstore-ray-auth" in notes


def test_ray_token_of_an_earlier_release_is_reused(helm_bin, tmp_path):
    """A Secret already there (an earlier release of the same name) keeps its token; a fresh
    render would have made a random one."""
    token = base64.b64encode(b"t" * 64).decode()
    with FakeAPIServer() as api:
        api.put({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": {"auth_token": token},
                 "metadata": {"name": "kvstore-ray-auth", "namespace": NAMESPACE,
                              "labels": {"app.kubernetes.io/managed-by": "Helm"},
                              "annotations": {"meta.helm.sh/release-name": RELEASE,
                                              "meta.helm.sh/release-namespace": NAMESPACE}}})
        _helm_against(api, helm_bin, tmp_path, "install", RELEASE, str(CHART))
        secret, _ = _released_secret(api, "kvstore-ray-auth")
        assert secret["data"] == {"auth_token": token}


@pytest.mark.parametrize("http_from, warned", [(None, True), ("[{podSelector: {matchLabels: {app: prometheus}}}]", False)])
def test_notes_warn_when_the_policy_shuts_prometheus_out(helm_bin, tmp_path, http_from, warned):
    args = ["--set", "serviceMonitor.enabled=true"]
    if http_from:
        args += ["--values", write_values(tmp_path, f"networkPolicy: {{httpFrom: {http_from}}}")]
    with FakeAPIServer() as api:
        proc = _helm_against(api, helm_bin, tmp_path, "install", RELEASE, str(CHART), *args)
    warning = "WARNING: networkPolicy.httpFrom is empty, so Prometheus (serviceMonitor) cannot reach the HTTP port"
    assert (warning in proc.stdout) is warned, proc.stdout


def test_dashboard_not_exposed_by_default(rendered_default):
    cluster = one(rendered_default, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    # KubeRay sets 0.0.0.0 when dashboard-host is missing: the chart must say 127.0.0.1.
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for group in [head, *cluster["spec"]["workerGroupSpecs"]]:
        assert "0.0.0.0" not in group["rayStartParams"].values()
    # No KubeRay-made Service type or Ingress for the head, and no dashboard port on any container:
    # KubeRay's head Service carries the head container's ports.
    assert not {"serviceType", "headService", "enableIngress"} & set(head)
    for _, container in all_containers(cluster):
        for port in container.get("ports", []):
            assert port["name"] != "dashboard" and port["containerPort"] != 8265, port
    for service in by_kind(rendered_default, "Service"):
        for port in service["spec"]["ports"]:
            assert port["port"] != 8265 and port["targetPort"] not in ("dashboard", 8265)
    assert not by_kind(rendered_default, "Ingress")
    rules = one(rendered_default, "NetworkPolicy")["spec"]["ingress"]
    assert all(p["port"] != 8265 for rule in rules for p in rule["ports"])


def test_dashboard_exposed_in_cluster_when_asked(rendered_ci, values_ci):
    port = values_ci["ray"]["dashboard"]["port"]
    head = one(rendered_ci, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["dashboard-port"] == str(port)
    assert {"name": "dashboard", "containerPort": port} in head["template"]["spec"]["containers"][0]["ports"]
    rules = one(rendered_ci, "NetworkPolicy")["spec"]["ingress"]
    admitted = [rule["from"] for rule in rules if {"protocol": "TCP", "port": port} in rule["ports"]]
    assert admitted == [[{"podSelector": {"matchLabels": SELECTOR}}], values_ci["networkPolicy"]["dashboardFrom"]]


def ray_network_ports(values):
    """The Ray ports nodes call on each other: (protocol, port, endPort)."""
    ports = values["ray"]["ports"]
    single = [GCS_PORT, ports["nodeManager"], ports["objectManager"], ports["dashboardAgentGrpc"],
              ports["dashboardAgentHttp"], ports["runtimeEnvAgent"]]
    return {("TCP", p, None) for p in single} | {("TCP", ports["minWorker"], ports["maxWorker"])}


def port_set(rule):
    ports = [(p["protocol"], p["port"], p.get("endPort")) for p in rule["ports"]]
    assert len(ports) == len(set(ports)), rule
    return set(ports)


def test_network_policy_by_default(rendered_default, values_default):
    """Only the cluster's own pods, only Ray's ports and Flight; ingress only."""
    policy = one(rendered_default, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": SELECTOR}
    assert spec["policyTypes"] == ["Ingress"]
    rule, = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": SELECTOR}}]
    assert port_set(rule) == ray_network_ports(values_default) | {("TCP", values_default["ports"]["flight"], None)}
    # Nothing else: not the HTTP port, Ray's metrics, the Ray client server or the dashboard.
    assert not {values_default["ports"]["http"], values_default["ray"]["ports"]["metricsExport"],
                RAY_CLIENT_PORT, 8265} & {p for _, p, _ in port_set(rule)}


def test_network_policy_selects_every_pod_of_the_cluster(case):
    docs, _ = case
    selector = one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items()
    for name, pod_template in cluster_pod_templates(one(docs, "RayCluster")["spec"]).items():
        assert selector <= pod_template["metadata"]["labels"].items(), name


def test_network_policy_with_every_list(rendered_ci, values_ci):
    np = values_ci["networkPolicy"]
    ray_ports = ray_network_ports(values_ci)
    flight, http = values_ci["ports"]["flight"], values_ci["ports"]["http"]
    dashboard = values_ci["ray"]["dashboard"]["port"]
    rules = one(rendered_ci, "NetworkPolicy")["spec"]["ingress"]
    got = [(rule["from"], port_set(rule)) for rule in rules]
    assert got == [
        ([{"podSelector": {"matchLabels": SELECTOR}}], ray_ports | {("TCP", flight, None), ("TCP", dashboard, None)}),
        (np["clientsFrom"], ray_ports | {("TCP", RAY_CLIENT_PORT, None), ("TCP", flight, None)}),
        (np["httpFrom"], {("TCP", http, None)}),
        (np["rayMetricsFrom"], {("TCP", values_ci["ray"]["ports"]["metricsExport"], None)}),
        (np["dashboardFrom"], {("TCP", dashboard, None)}),
        (np["extraIngress"][0]["from"], {("TCP", 8000, None)}),
    ]


def test_network_policy_admits_the_ports_ray_is_started_with(case):
    """The ports in every group's rayStartParams and the policy's Ray ports are the same numbers."""
    docs, values = case
    cluster = one(docs, "RayCluster")
    own = port_set(one(docs, "NetworkPolicy")["spec"]["ingress"][0])
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        params = group["rayStartParams"]
        for key in ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
                    "dashboard-agent-listen-port", "runtime-env-agent-port"):
            assert ("TCP", int(params[key]), None) in own, key
        assert ("TCP", int(params["min-worker-port"]), int(params["max-worker-port"])) in own
    head_ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ("TCP", head_ports["gcs-server"], None) in own
    assert head_ports["client"] == RAY_CLIENT_PORT
    for _, container in all_containers(cluster):
        if container["name"].startswith("ray-"):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == values["ray"]["ports"]["metricsExport"]


def test_network_policy_never_admits_every_source(case):
    docs, _ = case
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        assert rule.get("from") and all(peer for peer in rule["from"]), rule
        assert rule.get("ports"), rule


def test_network_policy_disabled_cleanly(helm_bin, rendered_default):
    docs = template(helm_bin, "--set", "networkPolicy.enabled=false")
    assert not by_kind(docs, "NetworkPolicy")
    # Everything else renders as before (Ray's auth and pinned ports do not depend on the policy).
    strip = lambda ds: sorted((yaml.safe_dump(d) for d in ds if d["kind"] not in ("NetworkPolicy", "Secret")))
    assert strip(docs) == strip(rendered_default)


# --- tenants and TLS from Secrets (issue 10) ---------------------------------------------------

TENANT_TOKENS = {"acme": "acme-token-0123456789abcdef", "globex": "globex-token-0123456789abcdef"}
TENANTS_LIST = (
    "tenants:\n  list:\n"
    f"    - {{name: acme, token: {TENANT_TOKENS['acme']}, key_secret: acme-scope-secret-0123456789,"
    " quota: {host: 2GiB, nvme: 100GiB}}\n"
    f"    - {{name: globex, token: {TENANT_TOKENS['globex']}}}\n"
)
TLS_ON = "tls: {enabled: true, existingSecret: kvstore-tls}\n"


@pytest.fixture
def rendered_tenants(helm_bin, tmp_path):
    return template(helm_bin, "--values", write_values(tmp_path, TENANTS_LIST))


def mounted_file(pod_template, container, path):
    """The (Secret name, key) a container sees at `path`, through the volumes it mounts; None if
    none. Follows projected and plain Secret volumes; a subPath mount is refused outright, since
    the kubelet never updates one."""
    vols = volumes(pod_template)
    for mount in container["volumeMounts"]:
        assert "subPath" not in mount, mount
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        volume = vols[mount["name"]]
        sources = volume["projected"]["sources"] if "projected" in volume else [volume]
        for source in sources:
            secret = source.get("secret")
            if not secret:
                continue
            for item in secret.get("items", []):
                if item["path"] == rest:
                    assert mount.get("readOnly") is True, mount
                    return secret.get("name") or secret.get("secretName"), item["key"]
    return None


def node_configs(docs, tmp_path):
    """Group name -> that group's config file, loaded by kvstore.config.load_config."""
    out = {}
    for key, text in one(docs, "ConfigMap")["data"].items():
        path = tmp_path / key
        path.write_text(text)
        out[key.removesuffix(".yaml")] = load_config(path, env={})
    return out


def test_tenants_list_becomes_a_secret_the_service_loads(rendered_tenants, kubernetes_validate):
    secret = secret_named(rendered_tenants, "kvstore-tenants")
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    assert secret["type"] == "Opaque"
    assert set(secret["data"]) == {"tenants.yaml"}
    text = base64.b64decode(secret["data"]["tenants.yaml"]).decode()
    tenants = load_tenants(text, admin_token="x" * 48)
    assert {t.name: t.token for t in tenants} == TENANT_TOKENS
    # acme's scope derives from its key_secret (survives a token rotation), globex's from its token.
    by_name = {t.name: t for t in tenants}
    assert by_name["acme"].scope == Tenant.make("acme", "other-token-0123456789", "acme-scope-secret-0123456789").scope
    assert by_name["globex"].scope == Tenant.make("globex", TENANT_TOKENS["globex"]).scope
    assert dict(by_name["acme"].quota) == {"host": 2 * 1024**3, "nvme": 100 * 1024**3} and not by_name["globex"].quota
    assert yaml.safe_load(text)["tenants"][1] == {"name": "globex", "token": TENANT_TOKENS["globex"]}


def test_tenants_file_is_mounted_in_every_kvstore_container(rendered_tenants, tmp_path):
    """The HTTP service (container kvstore) and every node actor's Flight server (the Ray containers)
    check tenants' credentials: each sees the tenants file where its config says, from the Secret,
    through a projected volume (no subPath, so a changed Secret reaches the running pod)."""
    cluster = one(rendered_tenants, "RayCluster")
    configs = node_configs(rendered_tenants, tmp_path)
    seen = set()
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        assert configs[name].tenants_file == "/etc/kvstore/tenants/tenants.yaml"
        for container in pod_template["spec"]["containers"]:
            seen.add(container["name"])
            assert mounted_file(pod_template, container, configs[name].tenants_file) == (
                "kvstore-tenants", "tenants.yaml"), (name, container["name"])
        source = volumes(pod_template)["kvstore-etc"]["projected"]["sources"][2]["secret"]
        assert source["items"] == [{"key": "tenants.yaml", "path": "tenants/tenants.yaml", "mode": 0o440}]
    assert seen == {"ray-head", "kvstore", "ray-worker"}


def test_no_tenant_token_outside_the_secret(rendered_tenants):
    """Tokens are credentials: not in a ConfigMap, an environment variable, or anything but the
    tenants Secret."""
    for doc in rendered_tenants:
        text = yaml.safe_dump(doc)
        for token in TENANT_TOKENS.values():
            encoded = base64.b64encode(token.encode()).decode()
            if doc["kind"] == "Secret" and doc["metadata"]["name"] == "kvstore-tenants":
                continue
            assert token not in text and encoded not in text, (doc["kind"], doc["metadata"]["name"])
    for _, container in all_containers(one(rendered_tenants, "RayCluster")):
        for env in container.get("env", []):
            assert env.get("value") not in TENANT_TOKENS.values(), env
            assert "secretKeyRef" not in env.get("valueFrom", {}), env
    for config_map in by_kind(rendered_tenants, "ConfigMap"):
        for name, text in config_map["data"].items():
            assert "token:" not in text and "tenants:" not in text, name


def test_a_tenant_change_touches_only_the_secret(helm_bin, tmp_path, rendered_tenants):
    """Adding or rotating a tenant changes the Secret alone: the pod templates stay as they were, so
    KubeRay restarts nothing, and the kubelet brings the new file to the running pods."""
    rotated = TENANTS_LIST.replace(TENANT_TOKENS["globex"], "globex-rotated-0123456789") + (
        "    - {name: initech, token: initech-token-0123456789}\n")
    docs = template(helm_bin, "--values", write_values(tmp_path, rotated))
    changed = lambda ds: [d for d in ds if d["kind"] == "Secret" and d["metadata"]["name"] == "kvstore-tenants"]
    stable = lambda ds: [yaml.safe_dump(d) for d in ds if d["kind"] in ("RayCluster", "ConfigMap", "Service")]
    assert stable(docs) == stable(rendered_tenants)
    assert changed(docs)[0]["data"] != changed(rendered_tenants)[0]["data"]


def test_existing_tenants_secret_is_used_not_created(rendered_ci, values_ci, tmp_path):
    tenants = values_ci["tenants"]
    assert tenants["existingSecret"] == "kvstore-tenants" and not tenants["list"]
    assert not by_kind(rendered_ci, "Secret")
    cluster = one(rendered_ci, "RayCluster")
    configs = node_configs(rendered_ci, tmp_path)
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        path = configs[name].tenants_file
        assert path == f"/etc/kvstore/tenants/{tenants['secretKey']}"
        for container in pod_template["spec"]["containers"]:
            assert mounted_file(pod_template, container, path) == (tenants["existingSecret"], tenants["secretKey"])


def test_no_tenants_by_default(rendered_default, tmp_path):
    assert "kvstore-tenants" not in {s["metadata"]["name"] for s in by_kind(rendered_default, "Secret")}
    for name, config in node_configs(rendered_default, tmp_path).items():
        assert config.tenants_file == "" and config.tls_cert_file == "", name
    for pod_template in cluster_pod_templates(one(rendered_default, "RayCluster")["spec"]).values():
        assert len(volumes(pod_template)["kvstore-etc"]["projected"]["sources"]) == 2


def test_tls_files_are_mounted_in_every_kvstore_container(rendered_ci, values_ci, tmp_path):
    """Every node's Flight server and the HTTP service serve TLS: each container sees the
    certificate, its key and the CA where its config says, from the kubernetes.io/tls Secret."""
    secret = values_ci["tls"]["existingSecret"]
    cluster = one(rendered_ci, "RayCluster")
    configs = node_configs(rendered_ci, tmp_path)
    seen = set()
    for name, pod_template in cluster_pod_templates(cluster["spec"]).items():
        config = configs[name]
        assert config.tls_server_name == values_ci["config"]["tls_server_name"]
        for container in pod_template["spec"]["containers"]:
            seen.add(container["name"])
            for path, key in [(config.tls_cert_file, "tls.crt"), (config.tls_key_file, "tls.key"),
                              (config.tls_ca_file, "ca.crt")]:
                assert mounted_file(pod_template, container, path) == (secret, key), (name, container["name"], path)
    assert seen == {"ray-head", "kvstore", "ray-worker"}
    # The autoscaler, a Ray client only, mounts none of kvstore's files.
    assert "kvstore-etc" not in str(cluster["spec"]["autoscalerOptions"])


def test_tls_on_makes_every_http_check_https(helm_bin, tmp_path, rendered_ci, values_ci, rendered_default):
    """The service speaks https only with TLS on: the probes, the ServiceMonitor (checking the
    certificate against the cluster's CA, under tls_server_name) and the Service say so."""
    docs = template(helm_bin, "--values", write_values(tmp_path, TLS_ON), "--set", "serviceMonitor.enabled=true")
    for rendered, secret, server_name in [(docs, "kvstore-tls", "kvstore"),
                                          (rendered_ci, values_ci["tls"]["existingSecret"],
                                           values_ci["config"]["tls_server_name"])]:
        head = one(rendered, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
        assert head["name"] == "kvstore"
        assert head["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        assert head["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
        endpoint, = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": secret, "key": "ca.crt"}}, "serverName": server_name}
        assert one(rendered, "Service")["spec"]["ports"][0]["appProtocol"] == "https"
    # TLS off: plain HTTP everywhere, and no TLS files.
    head = one(rendered_default, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    assert "scheme" not in head["readinessProbe"]["httpGet"] and "scheme" not in head["livenessProbe"]["httpGet"]
    plain = template(helm_bin, "--set", "serviceMonitor.enabled=true")
    endpoint, = one(plain, "ServiceMonitor")["spec"]["endpoints"]
    assert "scheme" not in endpoint and "tlsConfig" not in endpoint
    assert "appProtocol" not in one(plain, "Service")["spec"]["ports"][0]


def test_tls_server_name_of_the_head_is_what_the_service_monitor_checks(helm_bin, tmp_path):
    docs = template(helm_bin, "--values", write_values(tmp_path, TLS_ON + (
        "serviceMonitor: {enabled: true}\nconfig: {tls_server_name: kv.shared}\n"
        "head: {config: {tls_server_name: kv.head}}\n")))
    endpoint, = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["tlsConfig"]["serverName"] == "kv.head"


def test_notes_say_how_to_reach_the_service_over_tls(helm_bin, tmp_path):
    values = write_values(tmp_path, TLS_ON + TENANTS_LIST)
    with FakeAPIServer() as api:
        proc = _helm_against(api, helm_bin, tmp_path, "install", RELEASE, str(CHART), "--values", values)
    notes = proc.stdout
    assert 'kubectl get secret --namespace kvstore kvstore-tls -o jsonpath="{.data.ca\\.crt}"' in notes
    assert ("curl --cacert kvstore-ca.crt --resolve kvstore:8470:127.0.0.1 "
            '-H "Authorization: Bearer $KVSTORE_TOKEN" https://kvstore:8470/v1/nodes') in notes
    assert "http://127.0.0.1:8470" not in notes
    assert "Tenants' tokens are in the Secret kvstore-tenants (key tenants.yaml)" in notes
    for token in TENANT_TOKENS.values():
        assert token not in notes


# --- values rejected ----------------------------------------------------------------------

def write_values(tmp_path: Path, text: str) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return str(path)


WORKER = "workerGroups:\n  - {groupName: w, replicas: 1, minReplicas: 1, maxReplicas: 1%s}\n"


@pytest.mark.parametrize("args, message", [
    # Wrong types.
    (["--set", "ports.http=eighty"], "ports.http: Invalid type. Expected: integer, given: string"),
    (["--set", "config.promote_on_hit=maybe"], "config.promote_on_hit: Invalid type. Expected: boolean"),
    (["--values", WORKER % ", replicas: two"], "workerGroups.0.replicas: Invalid type. Expected: integer"),
    # Negative or malformed sizes.
    (["--set", "head.config.host_tier_bytes=-1"], "head.config.host_tier_bytes: Must be greater than or equal to 0"),
    (["--values", WORKER % ", shmHeadroom: -5"], "workerGroups.0.shmHeadroom: Must be greater than or equal to 0"),
    (["--set", "config.max_request_bytes=1 gigabyte"], "config.max_request_bytes: Does not match pattern"),
    # Unknown keys, at the top level and in the main objects.
    (["--set", "bogus=1"], "(root): Additional property bogus is not allowed"),
    (["--set", "head.bogus=1"], "head: Additional property bogus is not allowed"),
    (["--set", "config.host_tier=1GiB"], "config: Additional property host_tier is not allowed"),
    # A setting the chart owns.
    (["--set", "config.flight_port=1"], "config: Additional property flight_port is not allowed"),
    # Out-of-range and enumerated values.
    (["--set", "config.eviction_policy=fifo"], "config.eviction_policy: config.eviction_policy must be one of"),
    # num-gpus comes from gpus.
    (["--values", WORKER % ", rayStartParams: {num-gpus: '1'}"],
     'workerGroups.0.rayStartParams: Property name of "num-gpus" does not match'),
    # Ray's auth, dashboard and ports (issue 10).
    (["--set", "ray.auth.enabled=maybe"], "ray.auth.enabled: Invalid type. Expected: boolean, given: string"),
    (["--set", "ray.auth.secretKey=a/b"], "ray.auth.secretKey: Does not match pattern"),
    (["--set", "ray.dashboard.exposeInCluster=yes"], "ray.dashboard.exposeInCluster: Invalid type. Expected: boolean"),
    (["--set", "ray.dashboard.bogus=1"], "ray.dashboard: Additional property bogus is not allowed"),
    (["--set", "ray.ports.nodeManager=80"], "ray.ports.nodeManager: Must be greater than or equal to 1024"),
    (["--set", "ray.ports.maxWorker=70000"], "ray.ports.maxWorker: Must be less than or equal to 65535"),
    (["--set", "ray.ports.gcs=6379"], "ray.ports: Additional property gcs is not allowed"),
    # What the chart pins is refused in rayStartParams: the dashboard's address, Ray's ports.
    (["--set", "head.rayStartParams.dashboard-host=0.0.0.0"],
     'head.rayStartParams: Property name of "dashboard-host" does not match'),
    (["--values", WORKER % ", rayStartParams: {min-worker-port: '2000'}"],
     'workerGroups.0.rayStartParams: Property name of "min-worker-port" does not match'),
    (["--values", "head: {rayStartParams: {ray-client-server-port: '10002'}}"],
     'head.rayStartParams: Property name of "ray-client-server-port" does not match'),
    # The NetworkPolicy's lists: real peers only, and no rule without `from`.
    (["--set", "networkPolicy.enabled=yes"], "networkPolicy.enabled: Invalid type. Expected: boolean, given: string"),
    (["--values", "networkPolicy: {httpFrom: [{}]}"], "networkPolicy.httpFrom.0: Must have at least 1 properties"),
    (["--values", "networkPolicy: {clientsFrom: [{podSelector: {app: vllm}}]}"],
     "networkPolicy.clientsFrom.0.podSelector: Additional property app is not allowed"),
    (["--values", "networkPolicy: {httpFrom: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}"],
     "networkPolicy.httpFrom.0: Must not validate the schema (not)"),
    (["--values", "networkPolicy: {rayMetricsFrom: [{ipBlock: {cidr: everywhere}}]}"],
     "networkPolicy.rayMetricsFrom.0.ipBlock.cidr: Does not match pattern"),
    (["--values", "networkPolicy: {extraIngress: [{ports: [{port: 8000}]}]}"], "networkPolicy.extraIngress.0: from is required"),
    (["--values", "networkPolicy: {extraIngress: [{from: [], ports: [{port: 8000}]}]}"],
     "networkPolicy.extraIngress.0.from: Array must have at least 1 items"),
    (["--values", "networkPolicy: {extraIngress: [{from: [{podSelector: {}}], ports: [{port: 8000, protocol: HTTP}]}]}"],
     "networkPolicy.extraIngress.0.ports.0.protocol: networkPolicy.extraIngress.0.ports.0.protocol must be one of"),
    # Tenants (issue 10): kvstore/tenants.py's rules, refused at install rather than at pod start.
    (["--values", "tenants: {list: [{name: acme, token: too-short}]}"],
     "tenants.list.0.token: String length must be greater than or equal to 16"),
    (["--values", "tenants: {list: [{name: 'acme corp', token: acme-token-0123456789}]}"],
     "tenants.list.0.name: Does not match pattern '^[A-Za-z0-9._-]{1,64}$'"),
    (["--values", "tenants: {list: [{name: '%s', token: acme-token-0123456789}]}" % ("a" * 65)],
     "tenants.list.0.name: Does not match pattern"),
    (["--values", "tenants: {list: [{name: admin, token: admin-token-0123456789}]}"],
     "tenants.list.0.name: Must not validate the schema (not)"),
    (["--values", "tenants: {list: [{name: acme}]}"], "tenants.list.0: token is required"),
    (["--values", "tenants: {list: [{name: acme, token: 1234567890123456789}]}"],
     "tenants.list.0.token: Invalid type. Expected: string, given: integer"),
    (["--values", "tenants: {list: [{name: acme, token: acme-token-0123456789, scope: x}]}"],
     "tenants.list.0: Additional property scope is not allowed"),
    (["--values", "tenants: {list: [{name: acme, token: acme-token-0123456789, quota: {disk: 1GiB}}]}"],
     "tenants.list.0.quota: Additional property disk is not allowed"),
    (["--values", "tenants: {list: [{name: acme, token: acme-token-0123456789, quota: {host: lots}}]}"],
     "tenants.list.0.quota.host: Does not match pattern"),
    (["--set", "tenants.secretKey=a/b"], "tenants.secretKey: Does not match pattern"),
    (["--set", "tenants.existingSecret=Not_A_Name"], "tenants.existingSecret: Does not match pattern"),
    # TLS needs its Secret.
    (["--set", "tls.enabled=true"], "tls.existingSecret: String length must be greater than or equal to 1"),
    (["--set", "tls.enabled=yes"], "tls.enabled: Invalid type. Expected: boolean, given: string"),
    (["--set", "tls.caKey=ca.pem"], "tls: Additional property caKey is not allowed"),
    # The files are the chart's to set.
    (["--set", "config.tenants_file=/tmp/t.yaml"], "config: Additional property tenants_file is not allowed"),
    (["--set", "head.config.tls_cert_file=/tmp/c.pem"], "head.config: Additional property tls_cert_file is not allowed"),
])
def test_schema_rejects(helm_bin, tmp_path, args, message):
    if args[0] == "--values":
        args = ["--values", write_values(tmp_path, args[1])]
    proc = run_helm(helm_bin, "template", "kvstore", str(CHART), *args)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("values, message", [
    (WORKER % ", config: {nvme_tier_bytes: 10GiB}",
     "workerGroups[0]: nvme_tier_bytes is 10737418240 but workerGroups[0].nvme.type is none"),
    (WORKER % ", config: {hbm_tier_bytes: 1GiB}", "workerGroups[0]: hbm_tier_bytes is 1073741824 but the group has no GPUs"),
    (WORKER % ", config: {nvme_tier_bytes: 200GiB}, nvme: {type: pvc, pvc: {size: 100Gi}}",
     "workerGroups[0].nvme.pvc.size (107374182400 bytes) is smaller than nvme_tier_bytes"),
    (WORKER % ", config: {host_tier_bytes: 16GiB}, resources: {limits: {memory: 8Gi}}",
     "workerGroups[0].resources.limits.memory (8589934592 bytes) is smaller than /dev/shm"),
    (WORKER % ", replicas: 5", "workerGroups[0]: need minReplicas <= replicas <= maxReplicas"),
    ("workerGroups:\n  - {groupName: w, replicas: 1, minReplicas: 1, maxReplicas: 1}\n"
     "  - {groupName: w, replicas: 1, minReplicas: 1, maxReplicas: 1}\n", 'workerGroups[1].groupName="w" is used twice'),
    # Ray's pinned ports must not collide: the NetworkPolicy names them, and Ray fails to start.
    ("ray: {ports: {nodeManager: 8471}}", "ray.ports.nodeManager and ports.flight are both 8471"),
    ("ray: {dashboard: {port: 6379}}", "ray.dashboard.port and Ray's GCS port are both 6379"),
    ("ray: {ports: {objectManager: 15000}}",
     "ray.ports.objectManager (15000) is inside Ray's worker port range ray.ports.minWorker..maxWorker (10002-19999)"),
    ("ports: {http: 10500}", "ports.http (10500) is inside Ray's worker port range"),
    ("ray: {ports: {minWorker: 30000}}", "ray.ports.minWorker (30000) is above ray.ports.maxWorker (19999)"),
    # Tenants: one source, unique names and tokens (kvstore would refuse the file at pod start).
    ("tenants: {existingSecret: mine, list: [{name: acme, token: acme-token-0123456789}]}",
     "tenants.existingSecret (mine) and tenants.list are both set; use one"),
    ("tenants: {list: [{name: acme, token: acme-token-0123456789}, {name: acme, token: acme-token-9876543210}]}",
     'tenants.list[1].name="acme" is used twice'),
    ("tenants: {list: [{name: acme, token: same-token-0123456789}, {name: globex, token: same-token-0123456789}]}",
     "tenants.list[1] (globex): its token is tenants.list[0]'s too"),
])
def test_template_rejects(helm_bin, tmp_path, values, message):
    proc = run_helm(helm_bin, "template", "kvstore", str(CHART), "--values", write_values(tmp_path, values))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_worker_group_defaults(helm_bin, tmp_path):
    """A worker group with only the required keys: no GPUs, no NVMe, config.py's host tier + 1GiB."""
    docs = template(helm_bin, "--values", write_values(tmp_path, WORKER % ""))
    group, = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"] == ray_port_params(yaml.safe_load((CHART / "values.yaml").read_text()), "worker")
    dshm = volumes(group["template"])["dshm"]["emptyDir"]
    assert parse_size(dshm["sizeLimit"]) == Config().host_tier_bytes + 1024**3
    assert set(volumes(group["template"])) == {"tmp", "dshm", "kvstore-etc", "ray-auth"}
    path = tmp_path / "w.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["w.yaml"])
    assert load_config(path, env={}).host_tier_bytes == Config().host_tier_bytes


# --- schema and README ------------------------------------------------------------------------

def test_schema_is_valid_draft7(values_schema, values_default):
    jsonschema.Draft7Validator.check_schema(values_schema)
    assert values_schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.validate(values_default, values_schema)


# Definitions documented as a whole (their keys are Kubernetes' or documented once elsewhere).
_LEAF_DEFINITIONS = {"size", "quantity", "port", "stringMap", "rayStartParams", "resources", "probe"}


def _value_paths(schema, node, path, expanded):
    """Dotted paths of the values to document: the leaves of the chart's own objects."""
    if "$ref" in node or "allOf" in node:
        ref = node.get("$ref") or node["allOf"][0]["$ref"]
        name = ref.rsplit("/", 1)[1]
        if name in _LEAF_DEFINITIONS or name in expanded:
            yield path
            return
        expanded.add(name)
        node = schema["definitions"][name]
    if node.get("type") == "object" and node.get("properties"):
        for key, child in node["properties"].items():
            yield from _value_paths(schema, child, f"{path}.{key}" if path else key, expanded)
    elif node.get("type") == "array" and path == "workerGroups":
        yield from _value_paths(schema, node["items"], f"{path}[]", expanded)
    else:
        yield path


def test_readme_documents_every_value(values_schema):
    readme = (CHART / "README.md").read_text()
    paths = list(_value_paths(values_schema, values_schema, "", set()))
    assert "config.slot_bytes" in paths and "workerGroups[].nvme" in paths
    undocumented = [p for p in paths if f"`{p}`" not in readme]
    assert not undocumented, f"helm/kvstore/README.md does not document {undocumented}"
