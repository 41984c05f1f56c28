"""kvstore: a distributed, tiered KV-cache store for LLM inference.

The core (this package) and the tiers never import Ray: an engine worker or a GPU test can use
`TieredStore` in one process. The cluster (`kvstore.cluster`) adds Ray on top.
"""
from kvstore.errors import KVStoreError
from kvstore.keys import block_keys, cache_extra, chain_parents
from kvstore.layout import Layout
from kvstore.store import GetResult, PutResult, TieredStore



def connect(address: str | None = None, **kwargs):
    """Connects to a kvstore cluster on Ray, or starts an embedded one (see kvstore.cluster.client).

    `connect("kvstore://HOST:PORT", token=...)` (`kvstores://` for TLS) reaches a cluster from
    outside Ray instead: through its HTTP service and the nodes' Flight data planes, with a
    tenant's (or the admin's) token, and never imports Ray (kvstore.cluster.remote).
    Ray is imported here, on first use and only for a Ray address, so the core stays importable
    without it.
    """
    from kvstore.cluster.remote import connect_remote, is_remote_url

    if is_remote_url(address):
        return connect_remote(address, **kwargs)
    from kvstore.cluster.client import connect as _connect

    return _connect(address, **kwargs)


__all__ = ["connect", "KVStoreError", "Layout", "TieredStore", "PutResult", "GetResult", "block_keys", "cache_extra", "chain_parents"]
__version__ = "0.1.0"
