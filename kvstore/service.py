"""The HTTP service (aiohttp): health, Prometheus metrics, stats, nodes, lookup, a status page.

    GET  /healthz        200 {"status": "ok"}; the only path without auth
    GET  /metrics        Prometheus text format
    GET  /v1/stats       the controller's aggregated stats (JSON)
    GET  /v1/nodes       registered nodes (JSON)
    GET  /v1/dataplane   every node's data-plane (Flight) address: {"nodes": [{"node_id", "address", "tls"}]}
    POST /v1/lookup      {"keys": [hex, ...]} or {"token_ids": [...], "layout": {...}, "namespace": "..."}
                         (optional "best_node": false skips the best node) -> prefix length, best node,
                         where each block lives, and the data-plane addresses of the nodes named
    POST /v1/leases      {"keys": [hex, ...], "layout": {...}, "ttl_s": s (optional), "node_id": "..." (optional:
                         the owner; default the first holder)} -> {"lease_id", "node_id", "pinned": [hex, ...],
                         "expires_in_s"}: pins the blocks on their node for a reader to come (cluster/leases.py)
    POST /v1/leases/release  {"lease_id": "..."} -> {"released": true}; 404 for a lease the caller did
                         not take (or that ended)
    POST /v1/residency   {"engine_id", "node_id", "stored": [hex, ...], "removed": [hex, ...], "cleared": bool}
                         -> {"known_node": bool, "resend": bool}: an engine's blocks entering or leaving
                         its HBM, and its heartbeat (cluster/residency.py); best_node weighs them. "resend":
                         an index shard lost the engine's reports: report all it holds, with "cleared"
    GET  /               the status page (HTML, refreshes itself)

Auth: `Authorization: Bearer <token>`, or HTTP Basic auth with the token as the password (a
browser opening the page asks for it): never a credential in the URL, where logs and browser
histories keep it. The admin token opens everything; a tenant's (kvstore/tenants.py) opens
/v1/lookup, /v1/leases and /v1/residency, in its own key scope, and /v1/dataplane (nodes' ids and Flight
addresses, nothing else: what a remote client, kvstore/cluster/remote.py, needs to reach them),
and gets 403 on the cluster-wide views. A tenant ends only the leases it took through this
service (it remembers who took each, until its TTL is over).
The service talks to the cluster through `backend`, any object with the cluster client's
`stats()`, `nodes()`, `where(keys)`, `longest_prefix(keys)`, `best_node(keys)`, `lease(layout,
keys, ttl_s, node_id)`, `release_lease(lease_id)` and `report_residency(engine_id, stored, removed,
cleared, node_id)` (so this module does not import Ray). Backend calls block, so they run in worker threads; stats are cached for
`STATS_TTL_S` so a busy scraper does not load the controller, nodes' addresses for
`ADDRESSES_TTL_S` (sooner when a lookup names a node not among them).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import html
import json
import logging
import time

from aiohttp import web

from kvstore.cluster.residency import check_engine_id
from kvstore.errors import InvalidKeyError, KVStoreError
from kvstore.keys import KEY_BYTES, block_keys
from kvstore.layout import Layout
from kvstore.metrics import dataplane_rates, render
from kvstore.tenants import Tenant, Tenants

log = logging.getLogger(__name__)

STATS_TTL_S = 1.0
ADDRESSES_TTL_S = 2.0
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_LOOKUP_KEYS = 65536
TENANT_PATHS = {"/v1/lookup", "/v1/dataplane", "/v1/leases", "/v1/leases/release", "/v1/residency"}  # a tenant's; the rest is the admin's
MAX_LEASE_TTL_S = 3600.0
MAX_LEASES_REMEMBERED = 100_000  # leases taken through this service whose taker it remembers


class Service:
    def __init__(self, backend, token: "str | Tenants") -> None:
        if not token:
            raise KVStoreError("the HTTP service needs a non-empty token")
        self.backend = backend
        self._tenants = token if isinstance(token, Tenants) else Tenants(token)
        self._stats: dict | None = None
        self._stats_at = 0.0
        self._rates: dict = {}
        self._lock = asyncio.Lock()
        self._addresses: dict[str, dict] = {}  # node id -> {"node_id", "address", "tls"}
        self._addresses_at = 0.0
        self._addresses_lock = asyncio.Lock()
        self._lease_takers: dict[str, tuple[str, float]] = {}  # lease id -> (tenant, ends), oldest first

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._auth, _errors])
        app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get("/v1/stats", self.stats),
            web.get("/v1/nodes", self.nodes),
            web.get("/v1/dataplane", self.dataplane),
            web.post("/v1/lookup", self.lookup),
            web.post("/v1/leases", self.lease),
            web.post("/v1/leases/release", self.release_lease),
            web.post("/v1/residency", self.residency),
            web.get("/", self.page),
        ])
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        # A header that is not UTF-8 arrives with surrogates standing in for its bytes: compare
        # those bytes (they never match), rather than fail to encode them.
        tenant = self._caller(request)
        if tenant is None:
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "missing or wrong token: send 'Authorization: Bearer <token>' (or Basic "
                                          "auth with the token as the password)"}),
                content_type="application/json", headers={"WWW-Authenticate": 'Basic realm="kvstore"'})
        if not tenant.is_admin and request.path not in TENANT_PATHS:
            raise web.HTTPForbidden(text=json.dumps({"error": f"{request.path} shows the whole cluster: it needs the "
                                                             "admin token, not a tenant's"}),
                                    content_type="application/json")
        return await handler(request)

    def _caller(self, request: web.Request) -> Tenant | None:
        """The tenant (or admin) the request's credential belongs to."""
        return self._tenants.authenticate(_credential(request.headers.get("Authorization", "")))

    async def _snapshot(self) -> dict:
        async with self._lock:
            now = time.monotonic()
            if self._stats is None or now - self._stats_at > STATS_TTL_S:
                fresh = await asyncio.to_thread(self.backend.stats)
                if self._stats is not None:
                    self._rates = dataplane_rates(self._stats, fresh, now - self._stats_at)
                self._stats, self._stats_at = fresh, now
            return self._stats

    async def _dataplane(self, needed: "set[str]" = frozenset()) -> dict[str, dict]:
        """Node id -> its data-plane address and whether it serves TLS; nothing else of the nodes
        (a tenant sees these). Cached; asked again when stale or missing a node in `needed`."""
        async with self._addresses_lock:
            now = time.monotonic()
            if now - self._addresses_at > ADDRESSES_TTL_S or not needed <= self._addresses.keys():
                nodes = await asyncio.to_thread(self.backend.nodes)
                self._addresses = {n["node_id"]: {"node_id": n["node_id"], "address": n["address"],
                                                  "tls": bool(n.get("tls"))}
                                   for n in nodes if n.get("node_id") and n.get("address")}
                self._addresses_at = now
            return self._addresses

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self._snapshot()
        return web.Response(text=render(stats, self._rates), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self._snapshot())

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.backend.nodes))

    async def dataplane(self, request: web.Request) -> web.Response:
        nodes = await self._dataplane()
        return web.json_response({"nodes": [nodes[n] for n in sorted(nodes)]})

    async def lookup(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        asked = _lookup_keys(body)
        want_best = body.get("best_node", True)
        if not isinstance(want_best, bool):
            raise _bad(f"best_node={want_best!r:.80} must be true or false")
        # A tenant looks in its own scope, then in shared tenants' (kvstore/tenants.py).
        keys = await asyncio.to_thread(self._tenants.readable, self._caller(request), asked,
                                       lambda stored: [bool(h) for h in self.backend.where(stored)])
        if want_best:
            where, best = await asyncio.gather(asyncio.to_thread(self.backend.where, keys),
                                               asyncio.to_thread(self.backend.best_node, keys))
        else:
            where, best = await asyncio.to_thread(self.backend.where, keys), None
        prefix = next((i for i, holders in enumerate(where) if not holders), len(keys))
        named = {n for holders in where for n, _ in holders}
        if best and best.get("node_id"):
            named.add(best["node_id"])
        addresses = await self._dataplane(named) if named else {}
        return web.json_response({
            "blocks": len(keys),
            "prefix_blocks": prefix,
            "best_node": best,
            "locations": [{"key": k.hex(), "holders": [{"node_id": n, "medium": m} for n, m in h]}
                          for k, h in zip(asked, where)],
            "addresses": {n: addresses[n]["address"] for n in sorted(named) if n in addresses},
        })

    async def lease(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        asked = _lookup_keys(body)
        if "layout" not in body:
            raise _bad("a lease needs 'layout' (its blocks' layout) with its 'keys'")
        layout = Layout.from_dict(body["layout"])
        ttl_s, node_id = body.get("ttl_s"), body.get("node_id")
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float))
                                  or not 0 < ttl_s <= MAX_LEASE_TTL_S):
            raise _bad(f"ttl_s={ttl_s!r:.80} must be a number of seconds in (0, {MAX_LEASE_TTL_S:.0f}]")
        if node_id is not None and not isinstance(node_id, str):
            raise _bad(f"node_id={node_id!r:.80} must be a node id (a string)")
        tenant = self._caller(request)
        keys = await asyncio.to_thread(self._tenants.readable, tenant, asked,
                                       lambda stored: [bool(h) for h in self.backend.where(stored)])
        if node_id is None:  # the owner: the first holder of the first block held
            holders = await asyncio.to_thread(self.backend.where, keys)
            node_id = next((hs[0][0] for hs in holders if hs), None)
            if node_id is None:
                return web.json_response({"lease_id": None, "node_id": None, "pinned": [], "expires_in_s": 0})
        lease = await asyncio.to_thread(self.backend.lease, layout, keys, ttl_s, node_id)
        self._remember_lease(lease.lease_id, tenant.name, lease.expires_in_s)
        pinned = set(lease.keys)
        return web.json_response({"lease_id": lease.lease_id, "node_id": lease.node_id,
                                  "pinned": [a.hex() for a, k in zip(asked, keys) if k in pinned],
                                  "expires_in_s": lease.expires_in_s})

    async def release_lease(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        lease_id = body.get("lease_id") if isinstance(body, dict) else None
        if not isinstance(lease_id, str) or len(lease_id) > 256:
            raise _bad(f"lease_id={lease_id!r:.80} must be a lease id ('<hold id>@<node id>')")
        tenant = self._caller(request)
        taker = self._lease_takers.get(lease_id)
        if not tenant.is_admin and (taker is None or taker[0] != tenant.name):
            raise web.HTTPNotFound(text=json.dumps({"error": f"no lease {lease_id!r:.80} of yours is open"}),
                                   content_type="application/json")
        self._lease_takers.pop(lease_id, None)
        await asyncio.to_thread(self.backend.release_lease, lease_id)
        return web.json_response({"released": True})

    async def residency(self, request: web.Request) -> web.Response:
        """An engine's connector reporting the prompt blocks in its HBM (cluster/residency.py).
        A tenant's engine ids and keys are its own: scoped as its blocks are."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _bad(f"body must be a JSON object, got {type(body).__name__}")
        tenant = self._caller(request)
        try:
            engine_id = check_engine_id(body.get("engine_id"))
        except InvalidKeyError as e:
            raise _bad(str(e)) from None
        node_id, cleared = body.get("node_id"), body.get("cleared", False)
        if not isinstance(node_id, str) or len(node_id) > 256:
            raise _bad(f"node_id={node_id!r:.80} must be a node id (a string)")
        if not isinstance(cleared, bool):
            raise _bad(f"cleared={cleared!r:.80} must be true or false")
        stored = tenant.stored(_hex_keys(body.get("stored", []), "stored"))
        removed = tenant.stored(_hex_keys(body.get("removed", []), "removed"))
        if not tenant.is_admin:
            engine_id = f"{tenant.name}/{engine_id}"
        answer = await asyncio.to_thread(self.backend.report_residency, engine_id, stored, removed, cleared, node_id)
        return web.json_response({"known_node": answer["known_node"], "resend": answer["resend"]})

    def _remember_lease(self, lease_id: str, tenant: str, ttl_s: float) -> None:
        """Who took a lease, until it ends (the oldest forgotten first past the bound)."""
        now = time.monotonic()
        takers = self._lease_takers
        while takers and (len(takers) >= MAX_LEASES_REMEMBERED or next(iter(takers.values()))[1] < now):
            del takers[next(iter(takers))]
        takers[lease_id] = (tenant, now + ttl_s)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=status_page(await self._snapshot()), content_type="text/html")


@web.middleware
async def _errors(request: web.Request, handler):
    """Bad input -> 400 with the message; our own typed errors too. Never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except (KVStoreError, ValueError) as e:
        raise _bad(str(e)) from None


async def _json_body(request: web.Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("body must be JSON") from None
    except RecursionError:
        raise _bad("body is nested too deeply") from None


def _credential(header: str) -> str:
    """The token an Authorization header carries: Bearer's, or Basic's password."""
    scheme, _, value = header.partition(" ")
    if scheme == "Bearer":
        return value
    if scheme == "Basic":
        try:
            return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape").partition(":")[2]
        except (binascii.Error, ValueError):
            return ""
    return ""


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _hex_keys(hexes, name: str) -> list[bytes]:
    if not isinstance(hexes, list) or len(hexes) > MAX_LOOKUP_KEYS:
        raise _bad(f"{name} must be a list of at most {MAX_LOOKUP_KEYS} hex strings")
    keys = []
    for i, h in enumerate(hexes):
        try:
            key = bytes.fromhex(h)
        except (TypeError, ValueError):
            raise _bad(f"{name}[{i}]={h!r:.80} is not hex") from None
        if len(key) != KEY_BYTES:
            raise _bad(f"{name}[{i}]={h!r:.80} is {len(key)} bytes, not {KEY_BYTES}")
        keys.append(key)
    return keys


def _lookup_keys(body) -> list[bytes]:
    if not isinstance(body, dict):
        raise _bad(f"body must be a JSON object, got {type(body).__name__}")
    if "keys" in body:
        return _hex_keys(body["keys"], "keys")
    if "token_ids" in body:
        token_ids = body["token_ids"]
        if not isinstance(token_ids, list) or len(token_ids) > MAX_LOOKUP_KEYS * 16:
            raise _bad("token_ids must be a list of integers")
        layout = Layout.from_dict(body.get("layout"))
        return block_keys(token_ids, layout, body.get("namespace", "default"))
    raise _bad("give either 'keys' (hex strings) or 'token_ids' with 'layout'")


async def serve(service: Service, host: str, port: int, stop: asyncio.Event, ssl_context=None) -> None:
    """Runs the service until `stop` is set; over TLS only, with `ssl_context`."""
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    log.info("HTTP service on %s://%s:%d", "https" if ssl_context else "http", host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status_page(stats: dict) -> str:
    """A page a person reads at a glance: nodes, tier fill, hit rate, bytes moved."""
    e = html.escape
    verification = stats.get("verification", {})
    rows = []
    for node_id, node in sorted(stats.get("nodes", {}).items()):
        if "error" in node:
            rows.append(f"<tr><td>{e(node_id[:12])}</td><td colspan=6 class=bad>{e(node['error'])}</td></tr>")
            continue
        store, dp = node["store"], node.get("dataplane", {})
        gets = store.get("gets", 0)
        hit_rate = f"{100 * store.get('hits', 0) / gets:.1f}%" if gets else "&ndash;"
        tiers = []
        for t in store.get("tiers", []):
            fill = 100 * t["used_slots"] / t["slots"] if t["slots"] else 0
            tiers.append(
                f"<div class=tier><b>{e(t['name'])}</b> {_fmt_bytes(t['used_bytes'])} / {_fmt_bytes(t['capacity_bytes'])}"
                f"<div class=bar><span style='width:{fill:.1f}%'></span></div>"
                f"hits {t['hits']:,} &middot; evicted {t['evictions']:,} &middot; demoted {t['demotions']:,}"
                f" &middot; promoted {t['promotions']:,}</div>")
        rows.append(
            f"<tr><td title='{e(node_id)}'>{e(node_id[:12])}</td><td>{e(node.get('address', ''))}</td>"
            f"<td>{store.get('blocks', 0):,}</td><td>{''.join(tiers)}</td><td>{hit_rate}</td>"
            f"<td>{_fmt_bytes(dp.get('bytes_sent', 0))} out<br>{_fmt_bytes(dp.get('bytes_received', 0))} in</td>"
            f"<td>{store.get('corrupt_dropped', 0) + store.get('io_errors', 0) + dp.get('errors', 0):,}</td></tr>")
    tenant_rows = []
    for node_id, node in sorted(stats.get("nodes", {}).items()):
        for tenant, tiers in sorted(node.get("store", {}).get("tenants", {}).items()):
            use = " &middot; ".join(
                f"<b>{e(tier)}</b> {_fmt_bytes(u['bytes'])}"
                + (f" / {_fmt_bytes(u['quota'])}" if u["quota"] is not None else "")
                for tier, u in tiers.items())
            tenant_rows.append(f"<tr><td>{e(tenant)}</td><td>{e(node_id[:12])}</td><td>{use}</td></tr>")
    tenants = ("<h2>Tenants</h2><table><tr><th>tenant</th><th>node</th><th>bytes / quota per tier</th></tr>"
               + "".join(tenant_rows) + "</table>") if tenant_rows else ""
    return f"""<!doctype html>
<html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>kvstore</title>
<style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222}} h1{{font-size:1.4em}}
table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #ddd;padding:.5em;text-align:left;vertical-align:top}}
.summary span{{display:inline-block;margin-right:2em}} .summary b{{font-size:1.5em;display:block}}
.bar{{background:#eee;height:8px;width:220px;margin:3px 0}} .bar span{{display:block;height:8px;background:#3a7}}
.tier{{margin-bottom:.6em}} .bad{{color:#b00}}
</style></head><body>
<h1>kvstore</h1>
<p class=summary><span><b>{stats.get('nodes_registered', 0)}</b>nodes</span>
<span><b>{stats.get('index_keys', 0):,}</b>blocks indexed</span>
<span><b>{sum(n.get('holds', 0) for n in stats.get('nodes', {}).values())}</b>holds</span>
<span><b>{stats.get('nodes_dropped', 0)}</b>nodes lost</span>
<span><b>{verification.get('mismatches', 0):,} / {verification.get('checks', 0):,}</b>verified loads wrong</span>
<span><b{' class=bad' if verification.get('quarantined') else ''}>{len(verification.get('quarantined', []))}</b>sources quarantined</span></p>
<table><tr><th>node</th><th>data plane</th><th>blocks</th><th>tiers</th><th>hit rate</th><th>moved</th><th>errors</th></tr>
{''.join(rows) or '<tr><td colspan=7>no nodes yet</td></tr>'}
</table>{tenants}<p>Refreshes every 5 s. Metrics: <code>/metrics</code> &middot; JSON: <code>/v1/stats</code></p>
</body></html>"""
