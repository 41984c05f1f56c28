"""Fixtures shared across test folders."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def kv_cluster(request, tmp_path_factory):
    """A real multi-node Ray cluster on this machine with kvstore connected: (RayTestCluster, client).

    A test module sizes it with `KV_CLUSTER = {"nodes": N, "settings": {...}}` (connect()'s
    settings, passed to every node; an NVMe tier gets a temporary directory). The cluster is
    stopped, by its own processes' ids, when the module is done.
    """
    import kvstore
    from kvstore.cluster.localcluster import RayTestCluster

    spec = getattr(request.module, "KV_CLUSTER", {})
    settings = dict(spec.get("settings", {}))
    if settings.get("nvme_tier_bytes"):
        settings.setdefault("nvme_path", str(tmp_path_factory.mktemp("nvme")))
    rc = RayTestCluster(spec.get("nodes", 3)).start()
    try:
        client = kvstore.connect(rc.gcs_address, **settings)
        client.wait_ready(rc.num_nodes)
    except BaseException:
        rc.stop()
        raise
    try:
        yield rc, client
    finally:
        try:
            client.close(shutdown_cluster=True)
        finally:
            rc.stop()
