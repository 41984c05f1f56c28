"""Tenants on a real two-node cluster: the attack matrix of the network surfaces.

Tenant A stores blocks over Flight with its own credential. Tenant B, with its own valid
credential, and callers with no, a wrong or an expired (rotated away) credential then go after
A's blocks through every network surface: Flight tickets, sessions, puts and actions, and every
HTTP endpoint. Every case must be refused or answered as a miss, and A's bytes must be unchanged;
the test prints the table. Positive controls show each surface does serve A itself (and the
admin), so a "miss" is the boundary, not a broken path.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import pyarrow.flight as flight
import pytest
import torch

from kvstore import Layout, block_keys
from kvstore.cluster.dataplane import DataPlaneClient
from kvstore.cluster.protocol import encode_request
from kvstore.errors import TransferError
from kvstore.tenants import RELOAD_EVERY_S, Tenants
from kvtest_support import http_call, http_service, wait_for

pytestmark = pytest.mark.cluster

LAYOUT = Layout("test/tenants", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
ADMIN = "admin-" + os.urandom(8).hex()
A_TOKEN, A_ROTATED, B_TOKEN = ("tenant-a-" + os.urandom(8).hex(), "tenant-a2-" + os.urandom(8).hex(),
                               "tenant-b-" + os.urandom(8).hex())
TENANTS_FILE = os.path.join(tempfile.mkdtemp(prefix="kvstore-tenants-"), "tenants.yaml")


def write_tenants(a_token: str, b_quota: str = "") -> None:
    """A keeps its key_secret across a rotation, so its blocks stay its own under the new token."""
    tmp = TENANTS_FILE + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"tenants:\n  - name: a\n    token: {a_token}\n    key_secret: a-keys-{ADMIN}\n"
                f"  - name: b\n    token: {B_TOKEN}\n" + (f"    quota: {{host: {b_quota}}}\n" if b_quota else ""))
    os.replace(tmp, TENANTS_FILE)


write_tenants(A_TOKEN)
KV_CLUSTER = {"nodes": 2, "settings": dict(auth_token=ADMIN, tenants_file=TENANTS_FILE, host_tier_bytes="16MiB",
                                           event_batch_ms=10)}


@pytest.fixture(scope="module")
def cluster(kv_cluster):
    return kv_cluster


@pytest.fixture(scope="module")
def http(cluster):
    yield from http_service(cluster[1], Tenants(ADMIN, TENANTS_FILE))


_http = http_call


def payload(seed: int, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, LAYOUT.block_nbytes, dtype=np.uint8)) for _ in range(n)]


def pull(address: str, token: str, keys: list[bytes]) -> dict[bytes, bytes]:
    peer = DataPlaneClient(address, token, timeout_s=10)
    got: dict[bytes, bytes] = {}
    try:
        peer.get(LAYOUT, keys, lambda k, data, s, offset: got.__setitem__(k, bytes(data)))
    finally:
        peer.close()
    return got


def ticket_rows(address: str, token: str | None, keys: list[bytes]) -> int:
    fc = flight.FlightClient(f"grpc+tcp://{address}")
    headers = [(b"authorization", f"Bearer {token}".encode())] if token is not None else []
    try:
        ticket = flight.Ticket(encode_request("get", LAYOUT, keys))
        return fc.do_get(ticket, flight.FlightCallOptions(headers=headers, timeout=10)).read_all().num_rows
    finally:
        fc.close()


def test_every_surface_refuses_or_misses_another_tenants_blocks(cluster, http):
    _, client = cluster
    address = sorted(n["address"] for n in client.nodes())[1]
    tokens_a = np.random.default_rng(7).integers(0, 50_000, 4 * LAYOUT.block_tokens).tolist()
    keys = block_keys(tokens_a, LAYOUT, "a-private")  # B knows the namespace and the prompt: the same keys
    original = payload(1, 4)
    peer_a = DataPlaneClient(address, A_TOKEN, timeout_s=10)
    assert peer_a.put(LAYOUT, keys, original)["stored"] == 4
    peer_a.close()
    want = {k: bytes(o.numpy()) for k, o in zip(keys, original)}
    wait_for(lambda: json.loads(_http(http + "/v1/lookup", {"keys": [k.hex() for k in keys]}, A_TOKEN)[1])
             ["prefix_blocks"] == 4, 10, "A's blocks in the index")

    # Positive controls: each surface serves A's blocks to A.
    assert pull(address, A_TOKEN, keys) == want
    assert ticket_rows(address, A_TOKEN, keys) == 4
    lookup = {"token_ids": tokens_a, "layout": LAYOUT.to_dict(), "namespace": "a-private"}
    assert json.loads(_http(http + "/v1/lookup", lookup, A_TOKEN)[1])["prefix_blocks"] == 4
    for path in ("/metrics", "/v1/stats", "/v1/nodes", "/"):
        assert _http(http + path, token=ADMIN)[0] == 200

    rotated_away = A_TOKEN
    write_tenants(A_ROTATED)  # A's token rotated: the old one is now an expired credential
    time.sleep(RELOAD_EVERY_S + 0.2)
    bad = {"no credential": None, "wrong credential": "x" * 32, "expired credential": rotated_away}

    table: list[tuple[str, str, str]] = []

    def case(surface: str, who: str, outcome: str, ok: bool) -> None:
        table.append((surface, who, outcome))
        assert ok, f"{surface} as {who}: {outcome}"

    # Flight, do_get tickets and sessions.
    case("flight do_get", "tenant B", f"{ticket_rows(address, B_TOKEN, keys)} rows",
         ticket_rows(address, B_TOKEN, keys) == 0)
    got = pull(address, B_TOKEN, keys)
    case("flight session get", "tenant B", f"{len(got)} blocks", got == {})
    for who, token in bad.items():
        try:
            ticket_rows(address, token, keys)
            case("flight do_get", who, "served", False)
        except flight.FlightUnauthenticatedError:
            case("flight do_get", who, "unauthenticated", True)
        if token is not None:
            try:
                pull(address, token, keys)
                case("flight session get", who, "served", False)
            except TransferError as e:
                case("flight session get", who, "refused", "token" in str(e))
    # HTTP: B's lookup by keys and by tokens finds nothing.
    for body in ({"keys": [k.hex() for k in keys]}, lookup):
        status, text = _http(http + "/v1/lookup", body, B_TOKEN)
        found = json.loads(text)["prefix_blocks"] if status == 200 else None
        case("http /v1/lookup", "tenant B", f"{status}, prefix {found}", status == 200 and found == 0)
    # Leases: A holds one on its blocks (taken over HTTP). B can neither pin A's blocks nor end
    # A's lease, by the service or by naming its hold in a Flight get.
    lease_body = {"keys": [k.hex() for k in keys], "layout": LAYOUT.to_dict(), "ttl_s": 30}
    status, text = _http(http + "/v1/leases", lease_body, A_ROTATED)
    a_lease = json.loads(text)
    assert status == 200 and len(a_lease["pinned"]) == 4, text
    status, text = _http(http + "/v1/leases", lease_body, B_TOKEN)
    pinned = json.loads(text)["pinned"] if status == 200 else None
    case("http /v1/leases", "tenant B", f"{status}, pinned {pinned}", status == 200 and pinned == [])
    status, _ = _http(http + "/v1/leases/release", {"lease_id": a_lease["lease_id"]}, B_TOKEN)
    case("http /v1/leases/release", "tenant B", str(status), status == 404)
    peer_b = DataPlaneClient(address, B_TOKEN, timeout_s=10)
    peer_b.get(LAYOUT, keys, lambda *_: None, release=a_lease["lease_id"].partition("@")[0])
    peer_b.close()
    for who, token in bad.items():
        for path, body in (("/v1/leases", lease_body), ("/v1/leases/release", {"lease_id": a_lease["lease_id"]})):
            status, _ = _http(http + path, body, token)
            case(f"http {path}", who, str(status), status == 401)
    status, _ = _http(http + "/v1/leases/release", {"lease_id": a_lease["lease_id"]}, A_ROTATED)
    case("flight get naming A's hold", "tenant B", "A's lease still open" if status == 200 else "ended",
         status == 200)  # A ends it itself: B's attempts ended nothing
    # Residency: A's engine reports A's prompt in its HBM; B reporting under the same engine id,
    # clearing it or claiming the keys, touches only its own engine's entries, and B's lookups do
    # not name A's engine.
    node = json.loads(_http(http + "/v1/dataplane", token=A_ROTATED)[1])["nodes"][0]["node_id"]
    report = {"engine_id": "engine-1", "node_id": node, "stored": [k.hex() for k in keys]}
    assert _http(http + "/v1/residency", report, A_ROTATED)[0] == 200
    a_best = lambda: json.loads(_http(http + "/v1/lookup", {"keys": [k.hex() for k in keys]}, A_ROTATED)[1])["best_node"]  # noqa: E731
    assert a_best()["engine_id"] == "a/engine-1" and a_best()["hbm_prefix_blocks"] == 4
    status, _ = _http(http + "/v1/residency", {**report, "stored": [], "cleared": True}, B_TOKEN)
    case("http /v1/residency (clear)", "tenant B", f"{status}, A's engine {a_best()['engine_id']}",
         status == 200 and a_best()["engine_id"] == "a/engine-1")
    status, _ = _http(http + "/v1/residency", {**report, "removed": report["stored"], "stored": []}, B_TOKEN)
    case("http /v1/residency (remove)", "tenant B", f"{status}, A's prefix {a_best()['hbm_prefix_blocks']}",
         status == 200 and a_best()["hbm_prefix_blocks"] == 4)
    b_best = json.loads(_http(http + "/v1/lookup", {"keys": [k.hex() for k in keys]}, B_TOKEN)[1])["best_node"]
    case("http /v1/lookup best_node", "tenant B", f"engines named {sorted(b_best['per_engine'])}",
         b_best["engine_id"] is None and b_best["per_engine"] == {})
    for who, token in bad.items():
        status, _ = _http(http + "/v1/residency", report, token)
        case("http /v1/residency", who, str(status), status == 401)
    # Flight, do_put: B's bytes under A's keys land in B's own space only.
    garbage = payload(2, 4)
    peer_b = DataPlaneClient(address, B_TOKEN, timeout_s=10)
    counts = peer_b.put(LAYOUT, keys, garbage)
    peer_b.close()
    case("flight do_put", "tenant B", f"stored {counts['stored']} in its own scope", counts["stored"] == 4)
    for who, token in bad.items():
        if token is None:
            continue
        try:
            DataPlaneClient(address, token, timeout_s=10).put(LAYOUT, keys, garbage)
            case("flight do_put", who, "stored", False)
        except TransferError as e:
            case("flight do_put", who, "refused", "token" in str(e))
    # Flight actions: none are offered, to anyone.
    for who, token in {"tenant B": B_TOKEN, **bad}.items():
        fc = flight.FlightClient(f"grpc+tcp://{address}")
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        try:
            list(fc.do_action(flight.Action("delete", b"".join(keys)), flight.FlightCallOptions(headers=headers,
                                                                                             timeout=10)))
            case("flight do_action", who, "performed", False)
        except flight.FlightError as e:
            case("flight do_action", who, type(e).__name__, True)
        finally:
            fc.close()
    # HTTP: the cluster-wide views are the admin's.
    for path in ("/metrics", "/v1/stats", "/v1/nodes", "/"):
        status, _ = _http(http + path, token=B_TOKEN)
        case(f"http {path}", "tenant B", str(status), status == 403)
        for who, token in bad.items():
            status, _ = _http(http + path, token=token)
            case(f"http {path}", who, str(status), status == 401)
    for who, token in bad.items():
        for path, body in (("/v1/lookup", {"keys": [k.hex() for k in keys]}), ("/v1/dataplane", None)):
            status, _ = _http(http + path, body, token)
            case(f"http {path}", who, str(status), status == 401)
    # What a tenant may see of the cluster (a remote client's need): node ids and addresses, no more.
    status, text = _http(http + "/v1/dataplane", token=B_TOKEN)
    assert status == 200 and all(set(n) == {"node_id", "address", "tls"} for n in json.loads(text)["nodes"])

    # A's bytes are unchanged, read with its rotated token (its key_secret kept its scope); B reads
    # back what it put, in its own space.
    assert pull(address, A_ROTATED, keys) == want
    assert pull(address, B_TOKEN, keys) == {k: bytes(g.numpy()) for k, g in zip(keys, garbage)}
    print("\nattack matrix (tenant A's blocks)")
    for surface, who, outcome in table:
        print(f"  {surface:<28} {who:<20} {outcome}")
    assert len(table) >= 30


def test_a_tenants_file_that_breaks_keeps_the_tenants_it_had(cluster):
    tenants = Tenants(ADMIN, TENANTS_FILE)
    assert tenants.authenticate(B_TOKEN).name == "b"
    with open(TENANTS_FILE) as f:
        good = f.read()
    try:
        with open(TENANTS_FILE, "w") as f:
            f.write("tenants: [{name: b, token: short}]\n")
        time.sleep(RELOAD_EVERY_S + 0.2)
        assert tenants.authenticate(B_TOKEN).name == "b"  # the bad file is logged and not taken
        assert tenants.authenticate(ADMIN).is_admin
    finally:
        with open(TENANTS_FILE, "w") as f:
            f.write(good)


def test_a_tenant_over_its_quota_evicts_only_its_own_blocks(cluster, http):
    """B's host quota (read from the tenants file without a restart) is 4 blocks: ten puts keep B
    at or under it on the node, A's blocks there stay, and the usage shows in stats and metrics."""
    _, client = cluster
    address = sorted(n["address"] for n in client.nodes())[0]
    a_keys = block_keys(list(range(2 * LAYOUT.block_tokens)), LAYOUT, "a-quota")
    a_blocks = payload(11, 2)
    peer_a = DataPlaneClient(address, A_ROTATED, timeout_s=10)
    assert peer_a.put(LAYOUT, a_keys, a_blocks)["stored"] == 2
    peer_a.close()
    write_tenants(A_ROTATED, b_quota=str(4 * LAYOUT.block_nbytes))
    time.sleep(RELOAD_EVERY_S + 0.2)
    peer_b = DataPlaneClient(address, B_TOKEN, timeout_s=10)
    b_keys = block_keys(list(range(10 * LAYOUT.block_tokens)), LAYOUT, "b-quota")
    b_blocks = payload(12, 10)
    try:
        for i in range(0, 10, 2):  # each put over the quota makes room with B's own oldest blocks
            assert peer_b.put(LAYOUT, b_keys[i:i + 2], b_blocks[i:i + 2])["stored"] == 2
    finally:
        peer_b.close()
    assert pull(address, A_ROTATED, a_keys) == {k: bytes(b.numpy()) for k, b in zip(a_keys, a_blocks)}
    held = pull(address, B_TOKEN, b_keys)
    assert set(held) == set(b_keys[6:])  # the newest four: B's older ones made the room
    status, text = _http(http + "/v1/stats", token=ADMIN)
    node = next(n for n in json.loads(text)["nodes"].values() if n.get("address") == address)
    assert node["store"]["tenants"]["b"]["host"] == {"bytes": 4 * LAYOUT.block_nbytes, "quota": 4 * LAYOUT.block_nbytes}
    assert "a" not in node["store"]["tenants"] or node["store"]["tenants"]["a"]["host"]["quota"] is None
    status, text = _http(http + "/metrics", token=ADMIN)
    assert 'kvstore_tenant_quota_bytes{' in text and 'tenant="b",tier="host"} 8192' in text
    status, text = _http(http + "/", token=ADMIN)
    assert status == 200 and "Tenants" in text
