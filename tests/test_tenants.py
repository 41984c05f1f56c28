"""The tenants file and key scopes (kvstore/tenants.py), without a cluster."""
from __future__ import annotations

import os

import pytest
import torch

from kvstore.errors import ConfigError
from kvstore.tenants import Tenant, Tenants, load_tenants

ADMIN = "admin-token-0123456789"


@pytest.mark.parametrize("text, message", [
    ("tenants: {a: 1}", "'tenants' must be a list"),
    ("other: []", "one key, 'tenants'"),
    ("tenants: [{name: a, token: short}]", "at least 16 characters"),
    ("tenants: [{name: 'a b', token: aaaaaaaaaaaaaaaaaaaa}]", "must be 1-64 letters"),
    ("tenants: [{name: admin, token: aaaaaaaaaaaaaaaaaaaa}]", "is taken"),
    ("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa}, {name: a, token: bbbbbbbbbbbbbbbbbbbb}]", "is taken"),
    ("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa}, {name: b, token: aaaaaaaaaaaaaaaaaaaa}]", "another's"),
    (f"tenants: [{{name: a, token: {ADMIN}}}]", "another's"),
    ("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa, limit: 1}]", "mapping of name, token"),
    ("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa, quota: 1}]", r"quota=1 must map some of hbm, host, nvme"),
    ("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa, shared: 1}]", "must be true or false"),
    ("tenants: [unclosed", "not valid YAML"),
])
def test_a_bad_tenants_file_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        load_tenants(text, ADMIN)


def test_scopes_keep_tenants_apart_and_a_key_secret_keeps_a_scope_across_tokens():
    keys = [os.urandom(16) for _ in range(3)]
    a, b = Tenant.make("a", "token-a-0123456789"), Tenant.make("b", "token-b-0123456789")
    assert a.stored(keys) != b.stored(keys) and a.stored(keys) != keys
    assert all(len(k) == 16 for k in a.stored(keys)) and a.stored(keys) == Tenant.make("a", "token-a-0123456789").stored(keys)
    assert Tenant.make("a", "rotated-token-0123").stored(keys) != a.stored(keys)  # a fresh cache, without a key secret
    kept = Tenant.make("a", "token-a-0123456789", "secret"), Tenant.make("a", "rotated-token-0123", "secret")
    assert kept[0].stored(keys) == kept[1].stored(keys)
    assert Tenant.make("b", "token-a-0123456789", "secret").stored(keys) != kept[0].stored(keys)  # the name counts too


def test_credentials_resolve_to_their_tenant_or_none(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: [{name: a, token: aaaaaaaaaaaaaaaaaaaa}]\n")
    tenants = Tenants(ADMIN, str(path))
    assert tenants.authenticate(ADMIN).is_admin and tenants.authenticate(ADMIN).stored([b"k" * 16]) == [b"k" * 16]
    assert tenants.authenticate("aaaaaaaaaaaaaaaaaaaa").name == "a"
    for wrong in ("", "aaaaaaaaaaaaaaaaaaab", "\udcff" * 20, b"\xff" * 20):
        assert tenants.authenticate(wrong) is None
    assert tenants.names() == ["a"]
    with pytest.raises(ConfigError, match="cannot be read"):
        Tenants(ADMIN, str(tmp_path / "absent.yaml"))


def test_a_shared_tenant_is_read_by_all_but_written_only_in_each_caller_s_own_scope(tmp_path):
    """Over a real Flight server: `shared: true` lets every tenant read (own scope first), never write."""
    import numpy as np

    from kvstore.cluster.dataplane import DataPlaneClient, DataPlaneServer
    from kvstore.store import TieredStore
    from kvstore.tiers.host import HostTier
    from kvtest_support import LAYOUT, NBYTES, shm_name

    tokens = {n: f"{n}-token-0123456789" for n in ("public", "b", "c")}
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n"
                    f"  - {{name: public, token: {tokens['public']}, shared: true}}\n"
                    f"  - {{name: b, token: {tokens['b']}}}\n  - {{name: c, token: {tokens['c']}}}\n")
    store = TieredStore([HostTier(shm_name(), NBYTES, 16 * NBYTES)])
    server = DataPlaneServer(store, "127.0.0.1", 0, Tenants(ADMIN, str(path)), 1 << 30).start()
    rng = np.random.default_rng(3)
    rows = {n: [torch.from_numpy(rng.integers(0, 256, NBYTES, dtype=np.uint8)) for _ in range(3)] for n in tokens}
    keys = [os.urandom(16) for _ in range(3)]
    clients = {n: DataPlaneClient(server.address, t, timeout_s=10) for n, t in tokens.items()}

    def read(who: str) -> dict[bytes, bytes]:
        got: dict[bytes, bytes] = {}
        clients[who].get(LAYOUT, keys, lambda k, data, s, offset: got.__setitem__(k, bytes(data)))
        return got

    def bytes_of(who: str, i: int) -> bytes:
        return bytes(rows[who][i].numpy())

    try:
        assert clients["public"].put(LAYOUT, keys, rows["public"])["stored"] == 3
        assert read("b") == read("c") == {k: bytes_of("public", i) for i, k in enumerate(keys)}  # readable by all
        assert clients["b"].put(LAYOUT, keys[:1], rows["b"][:1])["stored"] == 1  # into b's own scope only
        assert read("b")[keys[0]] == bytes_of("b", 0) and read("b")[keys[1]] == bytes_of("public", 1)
        assert read("public")[keys[0]] == bytes_of("public", 0) and read("c")[keys[0]] == bytes_of("public", 0)
    finally:
        for c in clients.values():
            c.close()
        server.shutdown()
        store.close()


def test_a_tenant_s_http_lookup_finds_a_shared_tenant_s_blocks_and_no_other_s(tmp_path):
    import json

    from kvtest_support import http_call, http_service

    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: [{name: public, token: public-token-0123456, shared: true},"
                    " {name: a, token: a-token-0123456789}, {name: b, token: b-token-0123456789}]\n")
    tenants = Tenants(ADMIN, str(path))
    key = os.urandom(16)
    held = {tenants.authenticate("public-token-0123456").stored([key])[0]}

    class Backend:  # the index holds the key in public's scope only
        def where(self, keys):
            return [[("n1", "CPU")] if k in held else [] for k in keys]

        def best_node(self, keys):
            return {"node_id": None, "prefix_blocks": 0, "per_node": {}}

        def nodes(self):
            return [{"node_id": "n1", "address": "10.0.0.1:8471", "tls": False}]

    service = http_service(Backend(), tenants)
    base = next(service)
    try:
        for token in ("b-token-0123456789", "public-token-0123456"):
            status, text = http_call(base + "/v1/lookup", {"keys": [key.hex()]}, token)
            assert status == 200 and json.loads(text)["prefix_blocks"] == 1, (token, text)
        held.clear()  # gone from the shared scope: a miss for everyone
        assert json.loads(http_call(base + "/v1/lookup", {"keys": [key.hex()]}, "b-token-0123456789")[1])[
            "prefix_blocks"] == 0
    finally:
        next(service, None)
