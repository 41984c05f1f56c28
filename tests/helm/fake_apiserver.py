"""A Kubernetes API server just real enough for `helm install` / `helm upgrade` to run against it.

helm 3.10 evaluates `lookup` only on a real install or upgrade (never in `helm template` or
`--dry-run`), so checking that the chart keeps a generated Secret across upgrades needs an API
server. This one answers discovery for the kinds the chart renders, holds objects in memory
(seeded by the test, e.g. a Secret the previous release created), and accepts what helm creates,
patches and updates. Helm's own release records (Secrets named sh.helm.release.v1.*) are stored
like any other Secret, so `releases()` decodes what helm wrote: its rendered manifest and notes.
"""
from __future__ import annotations

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

# group/version -> [(plural, kind, namespaced)]
RESOURCES = {
    "v1": [("secrets", "Secret", True), ("configmaps", "ConfigMap", True), ("services", "Service", True),
           ("namespaces", "Namespace", False), ("pods", "Pod", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True), ("ingresses", "Ingress", True)],
    "ray.io/v1": [("rayclusters", "RayCluster", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _merge(base: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386); helm's strategic merge patches of core kinds are close enough
    for the fields a test reads back."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


class FakeAPIServer:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (gv, plural, ns, name)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeAPIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        path.chmod(0o600)
        return path

    def put(self, obj: dict[str, Any]) -> None:
        """Seeds an object, as if an earlier release or a person had created it."""
        gv = obj["apiVersion"]
        plural = next(p for p, kind, _ in RESOURCES[gv] if kind == obj["kind"])
        meta = obj["metadata"]
        self.objects[(gv, plural, meta.get("namespace", ""), meta["name"])] = obj

    def get(self, gv: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((gv, plural, namespace, name))

    def releases(self, namespace: str) -> list[dict[str, Any]]:
        """Helm's release records in `namespace`, decoded, oldest first."""
        out = []
        for (gv, plural, ns, name), obj in self.objects.items():
            if plural == "secrets" and ns == namespace and name.startswith("sh.helm.release.v1."):
                raw = base64.b64decode(base64.b64decode(obj["data"]["release"]))
                out.append(json.loads(gzip.decompress(raw)))
        return sorted(out, key=lambda r: r["version"])

    # --- HTTP -------------------------------------------------------------------------------

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _route(self):
                """(group/version, plural, namespace, name) of a resource path, or None."""
                parts = [p for p in urlparse(self.path).path.split("/") if p]
                if parts[:1] == ["api"] and len(parts) >= 3:
                    gv, rest = parts[1], parts[2:]
                elif parts[:1] == ["apis"] and len(parts) >= 4:
                    gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
                else:
                    return None
                namespace = ""
                if len(rest) >= 3 and rest[0] == "namespaces":
                    namespace, rest = rest[1], rest[2:]
                if not rest:
                    return None
                return gv, rest[0], namespace, rest[1] if len(rest) > 1 else ""

            def _discovery(self) -> dict[str, Any] | None:
                path = urlparse(self.path).path.rstrip("/")
                if path == "/version":
                    return {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}
                if path == "/api":
                    return {"kind": "APIVersions", "versions": ["v1"],
                            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
                if path == "/apis":
                    groups = []
                    for gv in RESOURCES:
                        if "/" in gv:
                            group, version = gv.split("/")
                            entry = {"groupVersion": gv, "version": version}
                            groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
                    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
                gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
                if path.startswith(("/api/", "/apis/")) and gv in RESOURCES:
                    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                        {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                         "verbs": VERBS} for plural, kind, namespaced in RESOURCES[gv]]}
                return None

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path))
                found = self._discovery()
                if found is not None:
                    return self._send(200, found)
                route = self._route()
                if route is None:
                    return self._send(404, _status(404, "NotFound", f"{self.path} not found"))
                gv, plural, namespace, name = route
                with server._lock:
                    if name:
                        obj = server.objects.get((gv, plural, namespace, name))
                        if obj is None:
                            return self._send(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
                        return self._send(200, obj)
                    query = parse_qs(urlparse(self.path).query)
                    wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if "=" in kv)
                    items = [o for (g, p, ns, _), o in server.objects.items()
                             if g == gv and p == plural and ns == namespace
                             and wanted.items() <= (o["metadata"].get("labels") or {}).items()]
                kind = next(k for p, k, _ in RESOURCES.get(gv, []) if p == plural) if gv in RESOURCES else "List"
                self._send(200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": {"resourceVersion": "1"},
                                 "items": items})

            def do_POST(self) -> None:
                server.requests.append(("POST", self.path))
                route = self._route()
                body = self._body()
                if route is None or not isinstance(body, dict):
                    return self._send(404, _status(404, "NotFound", self.path))
                gv, plural, namespace, _ = route
                name = body["metadata"]["name"]
                with server._lock:
                    if (gv, plural, namespace, name) in server.objects:
                        return self._send(409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists'))
                    body["metadata"].setdefault("namespace", namespace)
                    body["metadata"]["resourceVersion"] = "1"
                    server.objects[(gv, plural, namespace, name)] = body
                self._send(201, body)

            def do_PUT(self) -> None:
                server.requests.append(("PUT", self.path))
                route = self._route()
                body = self._body()
                if route is None or not route[3]:
                    return self._send(404, _status(404, "NotFound", self.path))
                with server._lock:
                    server.objects[route] = body
                self._send(200, body)

            def do_PATCH(self) -> None:
                server.requests.append(("PATCH", self.path))
                route = self._route()
                body = self._body()
                with server._lock:
                    obj = server.objects.get(route) if route else None
                    if obj is None:
                        return self._send(404, _status(404, "NotFound", self.path))
                    obj = server.objects[route] = _merge(obj, body)
                self._send(200, obj)

            def do_DELETE(self) -> None:
                server.requests.append(("DELETE", self.path))
                route = self._route()
                with server._lock:
                    obj = server.objects.pop(route, None) if route else None
                if obj is None:
                    return self._send(404, _status(404, "NotFound", self.path))
                self._send(200, _status(200, "", "deleted") | {"status": "Success"})

        return Handler
