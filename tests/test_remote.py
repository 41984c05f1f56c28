"""The remote client (`kvstore.connect("kvstore://...")`, cluster/remote.py) without Ray: URLs
and their errors, the module importable with Ray made unimportable, and whole round trips
against two in-process "nodes" (a store and its Flight server each) behind the real HTTP
service, whose backend answers lookups from those stores. tests/cluster/test_remote_client.py
runs it against a real Ray cluster."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import kvstore
from kvstore.cluster.dataplane import DataPlaneClient, DataPlaneServer
from kvstore.cluster.leases import Lease
from kvstore.cluster.remote import RemoteClient, connect_remote, is_remote_url, parse_url
from kvstore.errors import AuthError, ConfigError, InvalidKeyError, LeaseError, PayloadError, TransferError
from kvstore.layout import Layout
from kvstore.store import TieredStore
from kvstore.tenants import Tenants
from kvstore.tiers.host import HostTier
from kvtest_support import NO_RAY, http_call, http_service, shm_name

LAYOUT = Layout("test/remote", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
ADMIN = "admin-" + os.urandom(8).hex()
A_TOKEN, B_TOKEN = "tenant-a-" + os.urandom(8).hex(), "tenant-b-" + os.urandom(8).hex()


# -- URLs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, host, port, tls", [
    ("kvstore://10.0.0.5:8470", "10.0.0.5", 8470, False),
    ("kvstores://kv.example.com:443", "kv.example.com", 443, True),
    ("KVSTORE://kv", "kv", 8470, False),
    ("kvstore://[::1]:9000/", "::1", 9000, False),
])
def test_urls_name_the_service_and_the_scheme_says_tls(url, host, port, tls):
    endpoint = parse_url(url)
    assert (endpoint.host, endpoint.port, endpoint.tls) == (host, port, tls)
    assert is_remote_url(url)


@pytest.mark.parametrize("url, words", [
    ("http://kv:8470", ["http://", "kvstore://"]),
    ("kv:8470", ["kvstore://"]),
    ("kvstore://:8470", ["no host"]),
    ("kvstore://kv:99999", ["kv:99999"]),
    ("kvstore://kv:port", ["kv:port"]),
    ("kvstore://kv:0", ["port 0"]),
    ("kvstore://kv:8470/v1", ["path", "/v1"]),
    ("kvstore://kv:8470?token=s3cret", ["query", "token="]),
    ("kvstore://s3cret@kv:8470", ["credential", "token="]),
    (None, ["None"]),
    (8470, ["8470"]),
])
def test_a_bad_url_is_a_config_error_naming_it_and_never_echoes_a_credential(url, words):
    with pytest.raises(ConfigError) as e:
        parse_url(url)
    for word in words:
        assert word in str(e.value)
    assert "s3cret" not in str(e.value)


def test_ray_addresses_are_not_remote_urls():
    for address in (None, "auto", "10.0.0.5:6379", "ray://head:10001", 5):
        assert not is_remote_url(address)


def test_the_remote_client_imports_and_connects_without_ray():
    """With Ray unimportable: the module imports, and kvstore.connect dispatches to it (the
    connection is refused: nothing listens there; the point is that it got that far)."""
    code = NO_RAY + textwrap.dedent("""
        import kvstore, kvstore.cluster.remote
        from kvstore.errors import TransferError
        try:
            kvstore.connect("kvstore://127.0.0.1:1", token="x" * 20)
        except TransferError as e:
            assert "127.0.0.1:1" in str(e), e
        assert "ray" not in sys.modules
        print("no ray: ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no ray: ok" in done.stdout, done.stderr


# -- two in-process nodes behind the HTTP service ----------------------------------------------

class Nodes:
    """The service's backend over in-process stores: where / best_node / nodes as the cluster's."""

    def __init__(self, count: int, tenants: Tenants, slots: int = 64) -> None:
        self.stores = [TieredStore([HostTier(shm_name(), LAYOUT.block_nbytes, slots * LAYOUT.block_nbytes)])
                       for _ in range(count)]
        self.released: list[str] = []
        self.holds: dict[str, tuple] = {}  # leases taken through the service: hold id -> (store, handles)
        self.servers = [DataPlaneServer(store, "127.0.0.1", 0, tenants, 1 << 30, release_hold=self.released.append)
                        .start() for store in self.stores]
        self.ids = [f"node{i}-" + os.urandom(6).hex() for i in range(count)]

    def lease(self, layout, keys, ttl_s, node_id):
        store = self.stores[self.ids.index(node_id)]
        handles = store.acquire(layout, keys)
        hold = "hold" + os.urandom(4).hex()
        self.holds[hold] = (store, handles)
        return Lease(f"{hold}@{node_id}", node_id, [h.key for h in handles if h is not None], ttl_s or 30.0)

    def release_lease(self, lease_id):
        hold = lease_id.partition("@")[0]
        if hold not in self.holds:
            raise LeaseError(f"no hold {hold}")
        store, handles = self.holds.pop(hold)
        store.release(handles)
        self.released.append(hold)

    def nodes(self) -> list[dict]:
        return [{"node_id": n, "address": s.address, "tls": False, "pid": 1, "shm_name": "secret-ish"}
                for n, s in zip(self.ids, self.servers)]

    def where(self, keys):
        held = [store.contains(keys) for store in self.stores]
        return [[(n, "host") for n, h in zip(self.ids, held) if h[i]] for i in range(len(keys))]

    def best_node(self, keys):
        per_node = {}
        for n, store in zip(self.ids, self.stores):
            present = store.contains(keys) + [False]
            if present.index(False):
                per_node[n] = present.index(False)
        if not per_node:
            return {"node_id": None, "prefix_blocks": 0, "per_node": {}}
        best = min(per_node, key=lambda n: (-per_node[n], n))
        return {"node_id": best, "prefix_blocks": per_node[best], "per_node": per_node}

    def stats(self) -> dict:
        return {"nodes": {}}

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
        for store in self.stores:
            store.close()


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    path.write_text(f"tenants:\n  - name: a\n    token: {A_TOKEN}\n  - name: b\n    token: {B_TOKEN}\n")
    return str(path)


@pytest.fixture(scope="module")
def cluster(tenants_file):
    nodes = Nodes(2, Tenants(ADMIN, tenants_file))
    for base in http_service(nodes, Tenants(ADMIN, tenants_file)):
        yield nodes, "kvstore://" + base.removeprefix("http://")
    nodes.close()


def blocks(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, LAYOUT.block_nbytes), dtype=np.uint8))


def keys_of(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def test_a_tenant_puts_and_gets_back_its_blocks_and_another_tenant_misses(cluster):
    nodes, url = cluster
    keys, data = keys_of(6), blocks(1, 6)
    with kvstore.connect(url, token=A_TOKEN) as a:
        assert isinstance(a, RemoteClient)
        result = a.put(LAYOUT, keys, data, parents=[None, *keys[:-1]], wait_index=True)
        assert (result.stored, result.present, result.rejected) == (6, 0, [])
        assert a.put(LAYOUT, keys[:2], data[:2]).present == 2  # content-addressed: present ones are skipped
        holder = a.where(keys)[0][0][0]
        assert all(w == [(holder, "host")] for w in a.where(keys))
        assert a.contains(keys + keys_of(1)) == [True] * 6 + [False]
        assert a.longest_prefix(keys + keys_of(1) + keys) == 6
        assert a.best_node(keys)["node_id"] == holder and a.best_node(keys)["prefix_blocks"] == 6
        # The servers scoped them: the store holds other keys than the ones the tenant named.
        assert not any(store.contains(keys)[0] for store in nodes.stores)

    with kvstore.connect(url, token=A_TOKEN) as again:  # another client (process) of the same tenant
        out = torch.zeros_like(data)
        got = again.get(LAYOUT, keys, out)
        assert got.hits == 6 and got.sources == [(holder, "remote")] * 6
        assert torch.equal(out, data)
    with kvstore.connect(url, token=B_TOKEN) as b:
        out = torch.zeros_like(data)
        assert b.get(LAYOUT, keys, out).found == [False] * 6 and not out.any()
        assert b.contains(keys) == [False] * 6 and b.longest_prefix(keys) == 0
        assert b.best_node(keys)["node_id"] is None


def test_gets_pull_from_every_owner_and_a_key_named_twice_is_filled_twice(cluster):
    nodes, url = cluster
    with connect_remote(url, token=A_TOKEN) as a, connect_remote(url, token=A_TOKEN) as other:
        first, second = keys_of(3), keys_of(3)
        a.put_node, other.put_node = nodes.ids  # each puts to another node
        a.put(LAYOUT, first, blocks(2, 3), wait_index=True)
        other.put(LAYOUT, second, blocks(3, 3), wait_index=True)
        asked = [second[0], first[0], first[1], second[1], first[0], keys_of(1)[0], second[2], first[2]]
        out = torch.zeros(len(asked), LAYOUT.block_nbytes, dtype=torch.uint8)
        got = other.get(LAYOUT, asked, out)
        assert [s and s[0] for s in got.sources] == [nodes.ids[1], nodes.ids[0], nodes.ids[0], nodes.ids[1],
                                                     nodes.ids[0], None, nodes.ids[1], nodes.ids[0]]
        want = {**dict(zip(first, blocks(2, 3))), **dict(zip(second, blocks(3, 3)))}
        for i, key in enumerate(asked):
            if key in want:
                assert torch.equal(out[i], want[key])
        # Scattered buffers and typed ones work as with the Ray client.
        rows = [torch.zeros(LAYOUT.block_shape, dtype=torch.float16) for _ in first]
        assert other.get(LAYOUT, first, rows).hits == 3
        assert all(torch.equal(r.view(torch.uint8).reshape(-1), want[k]) for r, k in zip(rows, first))


def test_puts_and_gets_larger_than_one_request_are_split(cluster):
    _, url = cluster
    with connect_remote(url, token=A_TOKEN, max_request_bytes=3 * LAYOUT.block_nbytes) as a:
        keys, data = keys_of(7), blocks(8, 7)
        result = a.put(LAYOUT, keys, data, parents=[None, *keys[:-1]], wait_index=True)
        assert (result.stored, result.rejected) == (7, [])
        assert len({holders[0][0] for holders in a.where(keys)}) == 1  # all parts to one node
        out = torch.zeros_like(data)
        assert a.get(LAYOUT, keys, out).hits == 7 and torch.equal(out, data)


def test_blocks_a_node_found_no_room_for_are_named_rejected():
    tenants = Tenants(ADMIN)
    nodes = Nodes(1, tenants, slots=4)
    try:
        for base in http_service(nodes, tenants):
            with connect_remote("kvstore://" + base.removeprefix("http://"), token=ADMIN) as client:
                keys = keys_of(6)
                result = client.put(LAYOUT, keys, blocks(9, 6))  # one stream: 4 slots, none evictable meanwhile
                assert result.rejected and result.stored + len(result.rejected) == 6
                assert set(result.rejected) == {k for k, here in zip(keys, client.contains(keys)) if not here}
    finally:
        nodes.close()


def test_a_block_damaged_on_its_node_is_a_miss_and_counted(cluster):
    nodes, url = cluster
    with connect_remote(url, token=ADMIN) as admin:  # the admin's keys are stored as they are
        keys, data = keys_of(3), blocks(10, 3)
        admin.put_node = nodes.ids[0]
        admin.put(LAYOUT, keys, data, wait_index=True)
        store = nodes.stores[0]
        store.tiers[0].arena[store._index[keys[1]].slot, 5] ^= 0xFF
        try:
            out = torch.zeros_like(data)
            assert admin.get(LAYOUT, keys, out).found == [True, False, True]
            assert admin.corrupt_received == 1
            assert torch.equal(out[0], data[0]) and torch.equal(out[2], data[2])
        finally:
            store.tiers[0].arena[store._index[keys[1]].slot, 5] ^= 0xFF


def test_concurrent_gets_from_threads_each_get_their_own_blocks(cluster):
    from concurrent.futures import ThreadPoolExecutor

    nodes, url = cluster
    with connect_remote(url, token=A_TOKEN) as a:
        chains = [(keys_of(4), blocks(20 + i, 4)) for i in range(6)]
        for i, (keys, data) in enumerate(chains):
            a.put_node = nodes.ids[i % 2]
            a.put(LAYOUT, keys, data, wait_index=True)

        def read(i):
            keys, data = chains[i % len(chains)]
            out = torch.zeros_like(data)
            return a.get(LAYOUT, keys, out).hits == 4 and torch.equal(out, data)

        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(read, range(36)))


def test_a_lease_is_taken_over_http_ended_by_the_get_naming_it_and_by_no_other_tenant(cluster):
    nodes, url = cluster
    with connect_remote(url, token=A_TOKEN) as a, connect_remote(url, token=B_TOKEN) as b:
        keys = keys_of(2)
        a.put_node = nodes.ids[0]
        a.put(LAYOUT, keys, blocks(4, 2), wait_index=True)
        lease = a.lease(LAYOUT, keys, ttl_s=30)
        hold = lease.lease_id.partition("@")[0]
        assert lease.node_id == nodes.ids[0] and lease.keys == keys and hold in nodes.holds
        with pytest.raises(LeaseError, match="no lease"):
            b.release_lease(lease)  # another tenant's: as if there were none
        out = torch.zeros(2, LAYOUT.block_nbytes, dtype=torch.uint8)
        assert b.get(LAYOUT, keys, out, lease=lease).hits == 0  # B's own scope; A's lease stays
        assert hold in nodes.holds
        assert a.get(LAYOUT, keys, out, lease=lease).hits == 2 and hold not in nodes.holds
        with pytest.raises(LeaseError, match="no lease"):
            a.release_lease(lease)  # ended already
        with pytest.raises(LeaseError, match="nothing to lease"):
            a.lease(LAYOUT, keys_of(1))


def test_only_the_admin_ends_a_hold_by_naming_it_in_a_flight_get(cluster):
    """A get may name a hold to end once its blocks are out (a handoff's lease): a tenant's
    would end anyone's it could name, so the data plane honours it from the admin only."""
    nodes, _ = cluster
    address = nodes.servers[0].address
    for token, hold, ended in ((B_TOKEN, "hold-b", False), (ADMIN, "hold-admin", True)):
        peer = DataPlaneClient(address, token)
        try:
            peer.get(LAYOUT, [], lambda *_: None, release=hold)
        finally:
            peer.close()
        assert (hold in nodes.released) == ended


def test_bad_input_is_a_typed_error_naming_the_value(cluster):
    _, url = cluster
    with connect_remote(url, token=A_TOKEN) as a:
        out = torch.zeros(2, LAYOUT.block_nbytes, dtype=torch.uint8)
        with pytest.raises(InvalidKeyError, match="616263"):  # b"abc", in hex
            a.get(LAYOUT, [b"abc", os.urandom(16)], out)
        with pytest.raises(PayloadError, match=r"\(2, 2048\)"):
            a.get(LAYOUT, keys_of(3), out)
        with pytest.raises(LeaseError, match="no-at-sign"):
            a.get(LAYOUT, keys_of(2), out, lease="no-at-sign")
        with pytest.raises(InvalidKeyError, match="parents"):
            a.put(LAYOUT, keys_of(2), out, parents=[None])
        with pytest.raises(InvalidKeyError):
            a.contains(["not bytes"])


def test_connect_fails_at_once_naming_what_is_wrong(cluster, tenants_file):
    nodes, url = cluster
    with pytest.raises(AuthError, match="401"):
        connect_remote(url, token="x" * 32)
    with pytest.raises(ConfigError, match="token"):
        connect_remote(url, config=kvstore.config.load_config(None))
    with pytest.raises(TransferError, match="127.0.0.1:1"):
        connect_remote("kvstore://127.0.0.1:1", token=A_TOKEN)


def test_a_scheme_the_service_or_nodes_disagree_with_is_refused(tmp_path):
    tenants = Tenants(ADMIN)
    nodes = Nodes(1, tenants)
    plain = nodes.nodes
    nodes.nodes = lambda: [{**n, "tls": True} for n in plain()]  # as if its nodes served TLS
    try:
        for base in http_service(nodes, tenants):
            with pytest.raises(ConfigError, match="does not serve TLS|use kvstores://"):
                connect_remote("kvstore://" + base.removeprefix("http://"), token=ADMIN)
            with pytest.raises(TransferError, match="TLS"):  # https to a plaintext service
                connect_remote("kvstores://" + base.removeprefix("http://"), token=ADMIN)
    finally:
        nodes.close()


def test_a_tenant_sees_addresses_and_nothing_else_of_the_cluster(cluster):
    nodes, url = cluster
    base = parse_url(url).url
    status, text = http_call(base + "/v1/dataplane", token=A_TOKEN)
    assert status == 200
    import json

    listed = json.loads(text)["nodes"]
    assert {n["node_id"] for n in listed} == set(nodes.ids)
    assert all(set(n) == {"node_id", "address", "tls"} for n in listed)  # no pid, no shm name
    assert http_call(base + "/v1/nodes", token=A_TOKEN)[0] == 403
    assert http_call(base + "/v1/dataplane")[0] == 401


def test_a_failed_owner_is_left_alone_and_its_blocks_are_misses(tmp_path):
    tenants = Tenants(ADMIN)
    nodes = Nodes(2, tenants)
    try:
        for base in http_service(nodes, tenants):
            with connect_remote("kvstore://" + base.removeprefix("http://"), token=ADMIN) as client:
                keys = keys_of(2)
                client.put_node = nodes.ids[1]
                client.put(LAYOUT, keys, blocks(5, 2), wait_index=True)
                nodes.servers[1].shutdown()
                out = torch.zeros(2, LAYOUT.block_nbytes, dtype=torch.uint8)
                assert client.get(LAYOUT, keys, out).hits == 0
                assert not client._breaker.allows(nodes.ids[1])
                # A put goes to the other node meanwhile.
                more = keys_of(1)
                client.put(LAYOUT, more, blocks(6, 1), wait_index=True)
                assert client.where(more) == [[(nodes.ids[0], "host")]]
    finally:
        nodes.servers[0].shutdown()
        for store in nodes.stores:
            store.close()


def test_kvstores_round_trips_over_tls_and_refuses_a_wrong_ca_or_plaintext(tmp_path):
    """TLS end to end: https to the service (its certificate checked against tls_ca_file and the
    URL's host), grpc+tls to the nodes (under tls_server_name)."""
    import asyncio
    import threading

    from kvstore.config import load_config
    from kvstore.service import Service, serve
    from kvstore.tls import TLS
    from kvtest_support import wait_for
    from test_tls import _free_port, make_ca, make_cert

    ca = make_ca(tmp_path, "remote")
    cert, key = make_cert(tmp_path, ca, names=("kvstore", "localhost"))
    tls = TLS.from_config(load_config(None, tls_cert_file=cert, tls_key_file=key, tls_ca_file=ca[2]))
    tenants = Tenants(ADMIN)
    store = TieredStore([HostTier(shm_name(), LAYOUT.block_nbytes, 16 * LAYOUT.block_nbytes)])
    server = DataPlaneServer(store, "127.0.0.1", 0, tenants, 1 << 30, tls=tls).start()
    nodes = Nodes.__new__(Nodes)
    nodes.stores, nodes.servers, nodes.ids, nodes.released = [store], [server], ["tls-node"], []
    plain = Nodes.nodes.__get__(nodes)
    nodes.nodes = lambda: [{**n, "tls": True} for n in plain()]
    loop, stop, port = asyncio.new_event_loop(), asyncio.Event(), _free_port()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        serve(Service(nodes, tenants), "127.0.0.1", port, stop, tls.server_context())), daemon=True)
    thread.start()
    settings = dict(tls_ca_file=ca[2], tls_server_name="kvstore")
    try:
        url = f"kvstores://localhost:{port}"
        client = wait_for(lambda: _connected(url, settings), 10, "the HTTPS service")
        with client:
            keys, data = keys_of(3), blocks(7, 3)
            assert client.put(LAYOUT, keys, data, wait_index=True).stored == 3
            out = torch.zeros_like(data)
            assert client.get(LAYOUT, keys, out).hits == 3 and torch.equal(out, data)
        other = make_ca(tmp_path, "other")
        with pytest.raises(TransferError, match="TLS failed"):  # the service's certificate is not from this CA
            connect_remote(url, token=ADMIN, tls_ca_file=other[2])
        with pytest.raises(TransferError, match="kvstores://"):  # plaintext to a TLS service
            connect_remote(f"kvstore://localhost:{port}", token=ADMIN)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()
        server.shutdown()
        store.close()


def _connected(url: str, settings: dict):
    try:
        return connect_remote(url, token=ADMIN, **settings)
    except TransferError as e:
        if "refused" in str(e):
            return None
        raise


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/leases", {"keys": ["00" * 16]}, 400, ["layout"]),
    ("/v1/leases", {"keys": ["00" * 16], "layout": LAYOUT.to_dict(), "ttl_s": -1}, 400, ["ttl_s=-1"]),
    ("/v1/leases", {"keys": ["00" * 16], "layout": LAYOUT.to_dict(), "ttl_s": True}, 400, ["ttl_s=True"]),
    ("/v1/leases", {"keys": ["00" * 16], "layout": LAYOUT.to_dict(), "node_id": 7}, 400, ["node_id=7"]),
    ("/v1/leases", {"keys": ["zz"], "layout": LAYOUT.to_dict()}, 400, ["keys[0]"]),
    ("/v1/leases", b"{not json", 400, ["JSON"]),
    ("/v1/leases/release", {"lease_id": 5}, 400, ["lease_id=5"]),
    ("/v1/leases/release", {"lease_id": "hold@node"}, 404, ["no lease"]),
])
def test_bad_lease_requests_get_a_4xx_naming_the_value(cluster, path, body, status, words):
    _, url = cluster
    got, text = http_call("http://" + url.removeprefix("kvstore://") + path, body, A_TOKEN)
    assert got == status, text
    for word in words:
        assert word in text


def test_the_remote_client_carries_its_settings_as_the_ray_client_does(cluster):
    """Connectors read `client.config` (the vLLM scheduler its namespace): a remote client without
    it failed engine start unless kvstore_namespace was set."""
    _, url = cluster
    with connect_remote(url, token=A_TOKEN, namespace="team-x") as a:
        assert a.config.namespace == "team-x"
    with connect_remote(url, token=A_TOKEN) as a:
        assert a.config.namespace == "default"


def test_puts_go_to_a_node_on_this_host_the_same_for_every_process_of_it(cluster):
    """An engine's scheduler and workers each make a client: they must name the same node (the
    handoff's hint), and it should be one on their own host when there is one."""
    from kvstore.cluster.remote import nearest_node

    nodes, url = cluster
    with connect_remote(url, token=A_TOKEN) as a, connect_remote(url, token=B_TOKEN) as b:
        assert a.put_node == b.put_node == a.node_id and a.put_node in nodes.ids
    elsewhere = {"far-1": "203.0.113.5:8471", "far-2": "[2001:db8::7]:8471"}  # documentation ranges: not ours
    assert nearest_node({**elsewhere, "here": "127.0.0.1:8471"}) == "here"
    assert nearest_node(elsewhere) in elsewhere  # none local: still one, by host name
    assert nearest_node(elsewhere) == nearest_node(dict(reversed(list(elsewhere.items()))))
    assert nearest_node({}) is None
