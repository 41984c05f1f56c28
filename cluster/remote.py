"""A client for engines outside Ray: `kvstore.connect("kvstore://HOST:PORT", token=...)`.

It reaches a cluster through two of its network surfaces and nothing else: the HTTP service
(HOST:PORT, `kvstore serve`'s) for control, and the nodes' Arrow Flight data planes for bytes,
both with one credential (a tenant's token, or the admin's). No Ray in the caller's process:
this module does not import it (tests/test_remote.py checks with Ray made unimportable).

- Lookups (`where`, `contains`, `longest_prefix`, `best_node`) are POST /v1/lookup. Its answer
  names the holders' data-plane addresses too; GET /v1/dataplane lists every node's (what a
  tenant may see of the cluster: ids and addresses, nothing else).
- A get asks the lookup only for keys whose owner it does not remember (cluster/locations.py),
  then pulls from every owner at once, one Flight session per owner, straight into the caller's
  buffer; every block is checked against the checksum it travelled with (cluster/pulled.py), a
  damaged one is a miss. An owner that fails is left alone for a while (PeerBreaker) and its
  blocks are asked about once more. A lease named by the get is given back over HTTP once the
  pull is over.
- Leases (`lease`, `release_lease`) are POST /v1/leases and /v1/leases/release: the service pins
  the blocks on their owner and lets a tenant end only the leases it took (cluster/leases.py).
- A put streams the blocks to one node (Flight do_put): the node holding the first block's
  parent when this client knows it (a chain stays on one node, for KV-aware routing), else the
  node this client picked at connect (`nearest_node`: one on this host if there is one, the same
  for every process of the host, so an engine's scheduler and workers agree; hosts spread over
  the nodes); another if that one fails.
- The servers scope every key by the caller's credential (kvstore/tenants.py), so the client
  sends keys as the engine computed them, and a tenant addresses only its own blocks.

TLS: `kvstores://` speaks https to the service and `grpc+tls` to the nodes, checking the service's
certificate against `tls_ca_file` and the URL's host name, the nodes' against `tls_ca_file` under
`tls_server_name` (docs/security.md); `kvstore://` is plaintext. A cluster whose nodes disagree
with the scheme is refused at connect, naming the scheme to use.

There is no host arena here: nothing is cached locally (`cache` is accepted and ignored), and
the Ray client's slot-level calls (reserve, acquire) are not offered. `node_id` is the node puts
go to by default, which a handoff names for its reader.
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from kvstore.cluster.dataplane import Peers
from kvstore.cluster.leases import Lease, lease_parts
from kvstore.cluster.locations import LocationCache, PeerBreaker
from kvstore.cluster.protocol import MAX_KEYS
from kvstore.cluster.pulled import ClusterGetResult, Landing, PulledBlocks
from kvstore.cluster.residency import check_engine_id
from kvstore.config import Config, load_config
from kvstore.errors import (AuthError, ConfigError, InvalidKeyError, KVStoreError, LeaseError, TransferError)
from kvstore.keys import check_key, check_keys
from kvstore.layout import Layout
from kvstore.payload import Blocks, block_rows
from kvstore.store import PutResult
from kvstore.tls import TLS, _read as read_pem

log = logging.getLogger(__name__)

SCHEMES = {"kvstore": False, "kvstores": True}  # scheme -> TLS
DEFAULT_PORT = Config.http_port  # the HTTP service's default port
HTTP_TIMEOUT_S = 30.0
LOOKUP_BATCH = 65536  # keys per lookup request (the service's MAX_LOOKUP_KEYS)
NODES_REFRESH_S = 1.0  # GET /v1/dataplane at most this often when a node is not known
INDEX_WAIT_S = 10.0  # a put with wait_index waits this long for the index at most
REJECTED_WAIT_S = 2.0  # a put with rejections waits this long for the index to name them
_STREAM_MIN_BYTES = 32 * 1024 * 1024  # a pull is split into streams of at least this much


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the cluster's HTTP service is, from a kvstore:// or kvstores:// URL."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def is_remote_url(address: object) -> bool:
    """Whether `address` names a cluster by its service (kvstore:// or kvstores://), not by Ray."""
    if not isinstance(address, str):
        return False
    scheme, sep, _ = address.strip().partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def parse_url(url: object) -> Endpoint:
    """The endpoint of `kvstore://HOST[:PORT]` (plaintext) or `kvstores://HOST[:PORT]` (TLS);
    PORT defaults to the HTTP service's 8470. ConfigError naming the URL and what is wrong; a
    credential in the URL (user info, a query) is refused: logs and histories keep URLs."""
    if not isinstance(url, str):
        raise ConfigError(f"url={url!r} must be a string like 'kvstore://HOST:PORT'")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"url={url!r} is not a URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"url={url!r}: the scheme must be kvstore:// (plaintext) or kvstores:// (TLS), "
                          f"not {scheme + '://' if scheme else 'missing'}")
    if "@" in parts.netloc:
        raise ConfigError(f"url={_redacted(url)!r} carries a credential: pass token=... instead (logs and histories "
                          "keep URLs)")
    if parts.query or parts.fragment:
        raise ConfigError(f"url={_redacted(url)!r} has a query or fragment: give only kvstore://HOST:PORT (a token "
                          "goes in token=...)")
    if parts.path not in ("", "/"):
        raise ConfigError(f"url={url!r} has a path ({parts.path!r}): give only kvstore://HOST:PORT")
    host = parts.hostname
    if not host:
        raise ConfigError(f"url={url!r} names no host: give kvstore://HOST:PORT")
    if parts.netloc.startswith("[") and not _is_ip(host):
        raise ConfigError(f"url={url!r}: {host!r} in brackets is not an IPv6 address")
    if port == 0:
        raise ConfigError(f"url={url!r}: port 0 is not a port")
    return Endpoint(host, DEFAULT_PORT if port is None else port, SCHEMES[scheme])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _redacted(url: str) -> str:
    """The URL without what may be a credential (user info, query, fragment)."""
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].split("?")[0].split("#")[0]
    return f"{scheme}://***@{host}" if "@" in rest else f"{scheme}://{host}?..."


class _Http:
    """Keep-alive HTTP(S) connections to the service, one per calling thread; JSON in and out."""

    def __init__(self, endpoint: Endpoint, token: str, context: ssl.SSLContext | None, timeout_s: float) -> None:
        self.endpoint = endpoint
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                         "Accept": "application/json"}
        self._context = context
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        e = self.endpoint
        if e.tls:
            conn = http.client.HTTPSConnection(e.host, e.port, timeout=self._timeout_s, context=self._context)
        else:
            conn = http.client.HTTPConnection(e.host, e.port, timeout=self._timeout_s)
        self._local.conn = conn
        with self._lock:
            self._all = [c for c in self._all if c.sock is not None] + [conn]
        return conn

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer; AuthError (401, 403), KVStoreError (another 4xx, with the service's
        message), TransferError (unreachable, or a 5xx)."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, fresh
            conn = self._connection(fresh=attempt > 0)
            try:
                conn.request(method, path, body=data, headers=self._headers)
                response = conn.getresponse()
                text = response.read()
                break
            except ssl.SSLError as e:
                conn.close()
                raise TransferError(f"{self.endpoint.url}: TLS failed ({e.reason or e}): check tls_ca_file and that "
                                    "the URL's host is a name in the service's certificate; a service without TLS "
                                    "is kvstore://, not kvstores://") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if attempt:
                    hint = "" if self.endpoint.tls else " (a service with TLS is kvstores://)"
                    raise TransferError(f"{method} {self.endpoint.url}{path} failed: {e or type(e).__name__}"
                                        f"{hint}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise TransferError(f"{method} {self.endpoint.url}{path} failed: {e or type(e).__name__}") from None
        try:
            answer = json.loads(text) if text else {}
        except (ValueError, UnicodeDecodeError):
            raise TransferError(f"{method} {self.endpoint.url}{path}: HTTP {response.status}, not JSON: "
                                f"{text[:200]!r}") from None
        if response.status < 400:
            return answer
        message = answer.get("error") if isinstance(answer, dict) else None
        message = f"{method} {self.endpoint.url}{path}: HTTP {response.status}: {message or text[:200]!r}"
        if response.status in (401, 403):
            raise AuthError(message)
        raise (KVStoreError if response.status < 500 else TransferError)(message)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()


class RemoteClient:
    """A handle on a kvstore cluster over its HTTP service and the nodes' Flight data planes
    (from `connect("kvstore://...")`); thread-safe for concurrent calls. See the module doc.

    `put_node`: the node id puts go to unless the first block's parent is known to be elsewhere
    (`nearest_node`: one on this host if there is one, chosen the same way by every process of the
    host, so an engine's scheduler and its workers name the node that holds what they put; set it
    to choose another).
    `config`: the settings this client was made with (the Ray client's attribute of that name:
    connectors read its namespace); by default the environment's (KVSTORE_CONFIG, KVSTORE_*).
    """

    def __init__(self, endpoint: Endpoint, token: str, *, tls: TLS | None = None,
                 http_context: ssl.SSLContext | None = None, transfer_timeout_s: float = 5.0,
                 pull_streams: int = 1, max_request_bytes: int = 1024**3,
                 http_timeout_s: float = HTTP_TIMEOUT_S, config: Config | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"token must be a non-empty string (a tenant's or the admin's credential), got "
                              f"{'an empty string' if token == '' else type(token).__name__}")
        if endpoint.tls != (tls is not None):
            raise ConfigError(f"{endpoint.url}: a TLS endpoint needs the data plane's TLS settings and a plaintext "
                              "one none")
        self.endpoint = endpoint
        self.config = config if config is not None else load_config(os.environ.get("KVSTORE_CONFIG") or None)
        self._pull_streams = pull_streams
        self._max_request_bytes = max_request_bytes
        self._http = _Http(endpoint, token, http_context, http_timeout_s)
        self._addresses: dict[str, str] = {}  # node id -> data-plane address
        self._nodes_at = 0.0
        self._nodes_lock = threading.Lock()
        self._locations = LocationCache()
        self._breaker = PeerBreaker()
        self._streams = ThreadPoolExecutor(4, thread_name_prefix="kvstore-remote-pull")  # one per owner
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kvstore-remote-copy")
        self.corrupt_received = 0  # blocks that arrived failing their checksums
        self._closed = False
        try:
            nodes = self._refresh_nodes(force=True)
        except BaseException:
            self._http.close()
            self._streams.shutdown()
            self._copier.shutdown()
            raise
        self.put_node = nearest_node(nodes)  # where puts go by default
        self._peers = Peers(token, transfer_timeout_s, tls)

    # -- control, over HTTP ------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Every node's id, data-plane address and whether it serves TLS (GET /v1/dataplane)."""
        return self._http.call("GET", "/v1/dataplane")["nodes"]

    def _refresh_nodes(self, force: bool = False) -> dict[str, str]:
        """Node id -> data-plane address, asked of the service (at most once a second unless
        `force`); ConfigError if the nodes' TLS disagrees with the URL's scheme."""
        with self._nodes_lock:
            if not force and time.monotonic() - self._nodes_at < NODES_REFRESH_S:
                return self._addresses
            nodes = self.nodes()
            self._nodes_at = time.monotonic()
            for node in nodes:
                if bool(node.get("tls")) != self.endpoint.tls:
                    served = "serves" if node.get("tls") else "does not serve"
                    raise ConfigError(f"node {node['node_id'][:12]}'s data plane at {node['address']} {served} TLS, "
                                      f"but the URL's scheme is {'kvstores' if self.endpoint.tls else 'kvstore'}://: "
                                      f"use {'kvstore' if self.endpoint.tls else 'kvstores'}://")
            self._addresses = {n["node_id"]: n["address"] for n in nodes}
            return self._addresses

    def _lookup(self, keys: list[bytes], best_node: bool = False) -> dict:
        """POST /v1/lookup for keys, in batches the service takes; learns the holders' addresses."""
        merged: dict = {"locations": [], "addresses": {}}
        for start in range(0, max(len(keys), 1), LOOKUP_BATCH):
            part = keys[start:start + LOOKUP_BATCH]
            answer = self._http.call("POST", "/v1/lookup", {"keys": [k.hex() for k in part], "best_node": best_node})
            merged["locations"] += answer["locations"]
            merged["addresses"].update(answer.get("addresses") or {})
            merged["best_node"] = answer.get("best_node")
        if merged["addresses"]:
            self._addresses = {**self._addresses, **merged["addresses"]}
        return merged

    def where(self, keys: Sequence[bytes]) -> list[list[tuple[str, str]]]:
        """Per key, the (node id, medium) pairs that hold it, fastest medium first."""
        keys = check_keys(keys)
        if not keys:
            return []
        return [[(h["node_id"], h["medium"]) for h in loc["holders"]] for loc in self._lookup(keys)["locations"]]

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [bool(h) for h in self.where(keys)]

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading keys present somewhere in the cluster."""
        return next((i for i, holders in enumerate(self.where(keys)) if not holders), len(keys))

    def best_node(self, keys: Sequence[bytes]) -> dict:
        """The node holding the longest prefix: {"node_id", "prefix_blocks", "per_node"}."""
        keys = check_keys(keys)
        if len(keys) > LOOKUP_BATCH:
            raise InvalidKeyError(f"best_node of {len(keys)} keys: at most {LOOKUP_BATCH} per call")
        return self._lookup(keys, best_node=True)["best_node"]

    # -- data, over Flight ---------------------------------------------------------------------

    def get(self, layout: Layout, keys: Sequence[bytes], out: Blocks, cache: bool | None = None,
            owner: str | None = None, lease: "object | None" = None,
            landing: Landing | None = None) -> ClusterGetResult:
        """Fills `out` with every block found in the cluster, pulled from the owners over Flight
        (in parallel) and checked against its checksum; a block not found, or damaged, is a miss.
        `owner`: a node id known to hold the blocks (a handoff's), tried before any lookup.
        `lease`: one this get ends (a Lease or its id, '<hold id>@<node id>'). `cache` is
        accepted for the Ray client's signature and ignored: there is no local arena here.
        `landing`: told how far each block has landed in `out` (the owners send layer-major)."""
        try:
            keys = check_keys(keys)
            rows = block_rows(layout, out, len(keys), "out")
            if owner is not None and not isinstance(owner, str):
                raise KVStoreError(f"owner={owner!r} must be a node id (a string)")
            release = lease_parts(lease) if lease is not None else None
            first = {}  # key -> its first position (a key named twice is pulled once)
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            if owner:
                for key in first:
                    self._locations.learn(key, owner)
            sink = PulledBlocks({k: rows[i] for k, i in first.items()}, layout.block_nbytes, self._copier,
                                landing=landing)
            delivered = self._pull(layout, list(first), sink, landing is not None)
            if release is not None:
                self._end_lease(lease)
        finally:
            if landing is not None:
                landing.end()
        sources: list = [None] * len(keys)
        for i, key in enumerate(keys):
            node = delivered.get(key)
            if node is None:
                continue
            if first[key] != i:
                rows[i].copy_(rows[first[key]])
            sources[i] = (node, "remote")
        return ClusterGetResult(sources)

    def _pull(self, layout: Layout, keys: list[bytes], sink: PulledBlocks, by_layer: bool) -> dict[bytes, str]:
        """Pulls keys into the sink: owners from the location cache, the lookup asked for the
        rest, and once more for blocks whose remembered owner no longer had them. Returns key ->
        the node it came from (checked blocks only)."""
        delivered: dict[bytes, str] = {}
        try:
            todo = keys
            for refresh in (False, True):
                by_owner, looked_up = self._owners(todo, refresh)
                delivered.update(self._stream(layout, by_owner, sink, by_layer))
                todo = [k for k in todo if k not in delivered and k not in looked_up]
                self._locations.forget(todo)
                if not todo:
                    break
        finally:
            sink.wait()
        self.corrupt_received += len(sink.damaged)
        return {k: n for k, n in delivered.items() if k not in sink.damaged}

    def _owners(self, keys: list[bytes], refresh: bool) -> tuple[dict[str, list[bytes]], set[bytes]]:
        """Keys grouped by the node to pull each from, and which of them the lookup was asked about."""
        by_owner: dict[str, list[bytes]] = {}
        unknown = []
        for key in keys:
            node = None if refresh else self._locations.owner(key)
            if node is None or not self._breaker.allows(node):  # another holder may answer
                unknown.append(key)
            else:
                by_owner.setdefault(node, []).append(key)
        if not set(by_owner) <= self._addresses.keys():  # an owner named by a handoff, not yet seen
            self._refresh_nodes()
        for node in [n for n in by_owner if n not in self._addresses]:
            unknown += by_owner.pop(node)
        if unknown:
            for key, loc in zip(unknown, self._lookup(unknown)["locations"]):
                node = next((h["node_id"] for h in loc["holders"]
                             if h["node_id"] in self._addresses and self._breaker.allows(h["node_id"])), None)
                if node is not None:
                    self._locations.learn(key, node)
                    by_owner.setdefault(node, []).append(key)
        return by_owner, set(unknown)

    def _stream(self, layout: Layout, by_owner: dict[str, list[bytes]], sink: PulledBlocks,
                by_layer: bool) -> dict[bytes, str]:
        """Flight streams to every owner at once; key -> owner of the blocks received. An owner
        that fails is forgotten and left alone for a while."""
        jobs = []
        for node, node_keys in by_owner.items():
            n = max(1, min(self._pull_streams, len(node_keys) * layout.block_nbytes // _STREAM_MIN_BYTES))
            n = max(n, -(-len(node_keys) // self._batch(layout)))  # and each within what one request may ask
            jobs += [(node, node_keys[j::n]) for j in range(n)]

        def pull(job) -> tuple[str, set[bytes]]:
            node, node_keys = job
            address = self._addresses.get(node)
            if address is None:
                return node, set()
            try:
                got = self._peers.get(address).get(layout, node_keys, sink, verify=False, by_layer=by_layer)
            except TransferError as e:
                self._drop_peer(node, address, e)
                return node, set()
            self._breaker.succeeded(node)
            return node, got

        results = [pull(jobs[0])] if len(jobs) == 1 else list(self._streams.map(pull, jobs))
        return {key: node for node, got in results for key in got}

    # -- leases, over HTTP (cluster/leases.py) ---------------------------------------------------

    @property
    def node_id(self) -> str | None:
        """The node this client's puts go to by default (`put_node`): where a handoff's reader
        looks first."""
        return self.put_node

    def lease(self, layout: Layout, keys: Sequence[bytes], ttl_s: float | None = None,
              node_id: str | None = None) -> Lease:
        """Pins keys on their node (`node_id`, default the first holder's) for a reader to come,
        until `release_lease`, a get naming the lease, or the TTL (default the cluster's
        lease_ttl_s). One call to the service; `keys` of the lease are the ones pinned."""
        keys = check_keys(keys)
        body: dict = {"keys": [k.hex() for k in keys], "layout": layout.to_dict()}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if node_id is not None:
            body["node_id"] = node_id
        answer = self._http.call("POST", "/v1/leases", body)
        if answer["lease_id"] is None:
            raise LeaseError(f"none of the {len(keys)} blocks is held anywhere: nothing to lease")
        return Lease(answer["lease_id"], answer["node_id"], [bytes.fromhex(k) for k in answer["pinned"]],
                     answer["expires_in_s"])

    def report_residency(self, engine_id: str, stored: Sequence[bytes] = (), removed: Sequence[bytes] = (),
                         cleared: bool = False, node_id: str | None = None) -> dict:
        """As Client.report_residency, over POST /v1/residency (keys in this tenant's scope)."""
        stored, removed = check_keys(stored), check_keys(removed)
        answer = self._http.call("POST", "/v1/residency", {
            "engine_id": check_engine_id(engine_id), "node_id": node_id or self.node_id,
            "stored": [k.hex() for k in stored], "removed": [k.hex() for k in removed], "cleared": cleared})
        return {"known_node": bool(answer["known_node"]), "resend": bool(answer["resend"])}

    def release_lease(self, lease: "Lease | str") -> None:
        """Unpins a lease this caller took; LeaseError if it is not open (ended, or another's)."""
        hold_id, node_id = lease_parts(lease)
        try:
            self._http.call("POST", "/v1/leases/release", {"lease_id": f"{hold_id}@{node_id}"})
        except AuthError:
            raise
        except KVStoreError as e:
            raise LeaseError(str(e)) from None

    def _end_lease(self, lease: "Lease | str") -> None:
        """A get's lease, once its blocks are pulled (or not: it ends at its TTL otherwise)."""
        try:
            self.release_lease(lease)
        except (LeaseError, TransferError) as e:
            log.info("lease %s: %s; it ends at its TTL", getattr(lease, "lease_id", lease), e)

    def put(self, layout: Layout, keys: Sequence[bytes], blocks: Blocks,
            parents: Sequence[bytes | None] | None = None, wait_index: bool = False) -> PutResult:
        """Streams blocks to one node (the one holding the first block's parent, if known; else
        this client's node; another if that fails); present keys are skipped. Readable on that
        node when it returns; in the cluster's index with the node's next event batch, or before
        returning with `wait_index`. `rejected` names the blocks the node found no room for (or
        that arrived damaged): asked of the index when the node reports some."""
        keys = check_keys(keys)
        rows = block_rows(layout, blocks, len(keys))
        if parents is not None:
            if isinstance(parents, (str, bytes)) or len(parents) != len(keys):
                raise InvalidKeyError(f"parents must be a sequence of {len(keys)} keys or None, got {parents!r:.120}")
            parents = [None if p is None else check_key(p, i) for i, p in enumerate(parents)]
        seen: set[bytes] = set()
        keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]  # a key named twice goes once
        if len(keep) < len(keys):
            keys, rows = [keys[i] for i in keep], [rows[i] for i in keep]
            parents = None if parents is None else [parents[i] for i in keep]
        if not keys:
            return PutResult()
        node, stored, present, failed = None, 0, 0, 0
        placed: dict[bytes, str] = {}  # key -> the node it was sent to
        step = self._batch(layout)
        for start in range(0, len(keys), step):  # each within what one request may carry, to one node
            part = slice(start, start + step)
            part_parents = None if parents is None else parents[part]
            node, reply = self._put_somewhere(layout, keys[part], rows[part], part_parents, node)
            stored, present = stored + int(reply.get("stored", 0)), present + int(reply.get("present", 0))
            failed += int(reply.get("rejected", 0)) + int(reply.get("corrupt", 0))
            for key in keys[part]:
                placed[key] = node
                self._locations.learn(key, node)
        rejected: list[bytes] = []
        if wait_index or failed:
            held = self._wait_indexed(placed, stored + present, INDEX_WAIT_S if wait_index else REJECTED_WAIT_S)
            if wait_index and len(held) < stored + present:
                raise TransferError(f"put of {len(keys)} blocks to node {node[:12]}: the index has {len(held)} of the "
                                    f"{stored + present} it stored after {INDEX_WAIT_S:.0f} s")
            if failed:  # the node counts them, the index names them (all not held, if it lags)
                rejected = [k for k in keys if k not in held]
                self._locations.forget(rejected)
        return PutResult(stored=stored, present=present, rejected=rejected)

    def _batch(self, layout: Layout) -> int:
        """Most blocks one data-plane request may name (keys, and bytes: max_request_bytes)."""
        return max(1, min(MAX_KEYS, self._max_request_bytes // layout.block_nbytes))

    def _put_somewhere(self, layout: Layout, keys: list[bytes], rows, parents,
                       previous: str | None = None) -> tuple[str, dict]:
        """(node, its reply) of a put to the node `_put_targets` names first that takes it
        (`previous`, the node of the put's earlier part, first of all)."""
        error = None
        targets = self._put_targets(parents[0] if parents else None)
        if previous in targets:
            targets.remove(previous)
            targets.insert(0, previous)
        for node in targets:
            address = self._addresses.get(node)
            if address is None:
                continue
            try:
                reply = self._peers.get(address).put(layout, keys, rows, parents)
            except TransferError as e:
                self._drop_peer(node, address, e)
                error = e
                continue
            self._breaker.succeeded(node)
            return node, reply
        raise error or TransferError(f"put of {len(keys)} blocks: no kvstore node is known at {self.endpoint.url} "
                                     "(none registered, or all left alone after failing)")

    def _put_targets(self, parent: bytes | None) -> list[str]:
        """Nodes to put to, in order: the parent's, this client's own, then the others."""
        addresses = self._addresses or self._refresh_nodes()
        first = [n for n in (self._locations.owner(parent) if parent else None, self.put_node) if n]
        order = list(dict.fromkeys(first + sorted(addresses)))
        allowed = [n for n in order if n in addresses and self._breaker.allows(n)]
        if allowed:
            return allowed
        return [n for n in sorted(self._refresh_nodes(force=True)) if self._breaker.allows(n)]

    def _wait_indexed(self, placed: dict[bytes, str], expected: int, timeout_s: float) -> set[bytes]:
        """The keys the index says are on the node each was sent to, once it has `expected` of
        them or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        keys = list(placed)
        while True:
            held = {k for k, holders in zip(keys, self.where(keys)) if any(n == placed[k] for n, _ in holders)}
            if len(held) >= expected or time.monotonic() > deadline:
                return held
            time.sleep(0.02)

    # -- peers -------------------------------------------------------------------------------------

    def _drop_peer(self, node: str, address: str, error: Exception) -> None:
        """A peer whose transfer failed: left alone for a while, forgotten as an owner."""
        log.warning("%s; leaving node %s alone for %.0f s", error, node[:12], self._breaker.failed(node))
        self._peers.drop(address)
        self._locations.forget_node(node)

    def close(self) -> None:
        """Ends the sessions and connections; the cluster goes on. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._peers.close()
        self._http.close()
        self._streams.shutdown()
        self._copier.shutdown()

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()




def connect_remote(url: str, token: str | None = None, *, config: Config | None = None,
                   **overrides) -> RemoteClient:
    """A client of the cluster whose HTTP service is at `url` (kvstore://HOST:PORT, or
    kvstores:// for TLS), with `token` (a tenant's, or the admin's; default: the auth_token /
    auth_token_file setting). Other settings from `config`, else the file named by KVSTORE_CONFIG
    and KVSTORE_* variables, with `overrides` on top: tls_ca_file and tls_server_name (for
    kvstores://), transfer_timeout_s, pull_streams, max_request_bytes (the nodes': requests are
    split to fit). Fails at once (ConfigError, AuthError,
    TransferError) if the URL is malformed, the service is unreachable, refuses the token, or
    its nodes' TLS disagrees with the scheme."""
    endpoint = parse_url(url)
    config = config or load_config(os.environ.get("KVSTORE_CONFIG") or None, **overrides)
    if token is None:
        token = config.token()
        if not token:
            raise ConfigError(f"connect({url!r}) needs token=... (a tenant's or the admin's), or the auth_token / "
                              "auth_token_file setting")
    tls = context = None
    if endpoint.tls:
        ca = read_pem("tls_ca_file", config.tls_ca_file) if config.tls_ca_file else None
        tls = TLS(b"", b"", ca, config.tls_server_name, "", "", config.tls_ca_file)
        context = tls.client_context()
    return RemoteClient(endpoint, token, tls=tls, http_context=context,
                        transfer_timeout_s=config.transfer_timeout_s, pull_streams=config.pull_streams,
                        max_request_bytes=config.max_request_bytes, config=config)


def nearest_node(addresses: dict[str, str]) -> str | None:
    """Of nodes (id -> data-plane "host:port"), the one this host's puts go to: among those whose
    address this host owns (it can bind it), else among all, the one its host name picks. Every
    process of a host picks the same node; hosts spread over the nodes."""
    if not addresses:
        return None
    local = [n for n, address in addresses.items() if _is_local(address.rsplit(":", 1)[0].strip("[]"))]
    pool = sorted(local or addresses)
    return pool[zlib.crc32(socket.gethostname().encode()) % len(pool)]


def _is_local(host: str) -> bool:
    """Whether `host` (an IP address) is one of this machine's: binding to it succeeds only then."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except (ValueError, OSError):
        return False
