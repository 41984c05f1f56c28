"""Per-tenant quotas in one store (kvstore/quotas.py): a tenant over its quota makes room with
its own blocks, least recently used first, and never with another tenant's."""
from __future__ import annotations

import pytest

from kvstore.errors import ConfigError
from kvstore.tenants import Tenants, load_tenants

from kvtest_support import LAYOUT, NBYTES, assert_consistent, batch, empty_out, make_store, rand_key

__all__ = ["make_store"]

TOKEN_A, TOKEN_B = "a" * 32, "b" * 32


def quotas(**per_tenant):
    """A quota_of callable: tenant -> {tier: blocks}, in bytes of NBYTES-long blocks."""
    return lambda name, tier: (None if tier not in per_tenant.get(name, {})
                               else per_tenant[name][tier] * NBYTES)


def keys_of(n: int) -> list[bytes]:
    return [rand_key() for _ in range(n)]


def usage(store, tenant: str, tier: str) -> int:
    return store.stats()["tenants"].get(tenant, {}).get(tier, {}).get("bytes", 0)


def test_a_tenant_over_its_host_quota_demotes_its_own_oldest_blocks_never_anothers(make_store):
    store = make_store(("host", "nvme"), host_slots=8, nvme_slots=16, quota_of=quotas(a={"host": 3}))
    b_keys = keys_of(4)
    assert store.put(LAYOUT, b_keys, batch(b_keys), owner="b").stored == 4  # no quota: b is unbounded
    a_keys = keys_of(6)
    for key in a_keys:  # one at a time: each put over the quota pushes out a's oldest
        assert store.put(LAYOUT, [key], batch([key]), owner="a").stored == 1
        assert usage(store, "a", "host") <= 3 * NBYTES
    assert store.where(b_keys) == ["host"] * 4  # b's blocks never moved
    assert store.where(a_keys) == ["nvme"] * 3 + ["host"] * 3  # a's oldest went down a tier
    assert usage(store, "a", "host") == 3 * NBYTES and usage(store, "a", "nvme") == 3 * NBYTES
    out = empty_out(6)
    assert all(store.get(LAYOUT, a_keys, out).found)  # demoted, not lost
    assert_consistent(store)


def test_blocks_demoted_over_the_nvme_quota_push_out_the_owners_own_there(make_store):
    store = make_store(("host", "nvme"), host_slots=8, nvme_slots=16, promote_on_hit=False,
                       quota_of=quotas(a={"host": 2, "nvme": 2}))
    b_keys = keys_of(3)
    store.put(LAYOUT, b_keys, batch(b_keys), owner="b")
    a_keys = keys_of(7)
    for key in a_keys:
        store.put(LAYOUT, [key], batch([key]), owner="a")
    assert usage(store, "a", "host") <= 2 * NBYTES and usage(store, "a", "nvme") <= 2 * NBYTES
    assert store.where(a_keys) == [None] * 3 + ["nvme"] * 2 + ["host"] * 2
    assert store.where(b_keys) == ["host"] * 3
    assert_consistent(store)


def test_a_put_larger_than_the_quota_stores_what_fits_and_rejects_the_rest(make_store):
    # (A put of over a quarter of the tier goes in chunks, each making room as a put of its own.)
    store = make_store(("host",), host_slots=40, quota_of=quotas(a={"host": 3}))
    b_keys = keys_of(2)
    store.put(LAYOUT, b_keys, batch(b_keys), owner="b")
    a_keys = keys_of(5)
    result = store.put(LAYOUT, a_keys, batch(a_keys), owner="a")
    assert result.stored == 3 and result.rejected == a_keys[3:]
    assert usage(store, "a", "host") == 3 * NBYTES
    assert store.where(b_keys) == ["host"] * 2


def test_pinned_blocks_of_the_owner_are_not_evicted_and_nothing_of_anothers_is(make_store):
    store = make_store(("host",), host_slots=8, quota_of=quotas(a={"host": 2}))
    b_keys = keys_of(4)
    store.put(LAYOUT, b_keys, batch(b_keys), owner="b")
    a_keys = keys_of(2)
    store.put(LAYOUT, a_keys, batch(a_keys), owner="a")
    held = store.acquire(LAYOUT, a_keys)  # a reader holds both of a's blocks
    try:
        extra = keys_of(1)
        assert store.put(LAYOUT, extra, batch(extra), owner="a").rejected == extra
    finally:
        store.release(held)
    assert store.where(b_keys) == ["host"] * 4 and store.where(a_keys) == ["host"] * 2
    extra = keys_of(1)  # unpinned now: a's oldest makes room
    assert store.put(LAYOUT, extra, batch(extra), owner="a").stored == 1
    assert store.where(a_keys) == [None, "host"]


def test_reads_keep_an_owners_block_over_its_newer_unread_ones(make_store):
    store = make_store(("host",), host_slots=8, quota_of=quotas(a={"host": 3}))
    a_keys = keys_of(3)
    for key in a_keys:
        store.put(LAYOUT, [key], batch([key]), owner="a")
    assert store.get(LAYOUT, a_keys[:1], empty_out(1)).found == [True]  # the oldest, read: now the newest
    extra = keys_of(1)
    store.put(LAYOUT, extra, batch(extra), owner="a")
    assert store.where(a_keys) == ["host", None, "host"]


def test_usage_follows_deletes_and_admin_blocks_count_for_no_one(make_store):
    store = make_store(("host", "nvme"), quota_of=quotas(a={"host": 4}))
    a_keys, admin_keys = keys_of(3), keys_of(3)
    store.put(LAYOUT, a_keys, batch(a_keys), owner="a")
    store.put(LAYOUT, admin_keys, batch(admin_keys))
    stats = store.stats()["tenants"]
    assert stats["a"]["host"] == {"bytes": 3 * NBYTES, "quota": 4 * NBYTES}
    assert stats["a"]["nvme"] == {"bytes": 0, "quota": None}
    assert set(stats) == {"a"}
    store.delete(a_keys)
    assert usage(store, "a", "host") == 0


def test_the_tenants_file_takes_quotas_per_tier_and_names_what_is_wrong(tmp_path):
    good = f"""tenants:
  - name: a
    token: {TOKEN_A}
    quota: {{host: 2GiB, nvme: 1TiB}}
  - name: b
    token: {TOKEN_B}
"""
    path = tmp_path / "tenants.yaml"
    path.write_text(good)
    tenants = Tenants("admin-token-" + "x" * 20, str(path))
    assert tenants.quota("a", "host") == 2 * 1024**3 and tenants.quota("a", "nvme") == 1024**4
    assert tenants.quota("a", "hbm") is None and tenants.quota("b", "host") is None
    assert tenants.quota("nobody", "host") is None
    with pytest.raises(ConfigError, match=r"tenants\[0\] \(a\)\.quota=.*disk"):
        load_tenants(good.replace("nvme: 1TiB", "disk: 1TiB"))
    with pytest.raises(ConfigError, match=r"quota\.host='lots'"):
        load_tenants(good.replace("host: 2GiB", "host: lots"))
    with pytest.raises(ConfigError, match=r"quota=\[1\]"):
        load_tenants(good.replace("{host: 2GiB, nvme: 1TiB}", "[1]"))
