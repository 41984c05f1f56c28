"""kvstore: a distributed, tiered KV-cache store for LLM inference.

The core (this package) and the tiers never import Ray: an engine worker or a GPU test can use
`TieredStore` in one process. The cluster (`kvstore.cluster`) adds Ray on top.
"""
from kvstore.errors import KVStoreError
from kvstore.keys import block_keys, chain_parents
from kvstore.layout import Layout
from kvstore.store import GetResult, PutResult, TieredStore

__all__ = ["KVStoreError", "Layout", "TieredStore", "PutResult", "GetResult", "block_keys", "chain_parents"]
__version__ = "0.1.0"
