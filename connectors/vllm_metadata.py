"""What the vLLM connector's instances tell each other.

- scheduler -> workers, each step: `KVStoreConnectorMetadata` (loads, saves, preempted requests
  whose saves must finish, and verified-restore checks), which vLLM sends to every worker;
- workers -> scheduler, each step: `KVStoreWorkerMetadata` (sources a check found wrong), which
  vLLM aggregates over the workers;
- producer -> consumer, once per request: the handoff in the request's `kv_transfer_params`
  (`HANDOFF_KEYS`, described in the module docstring of kvstore.connectors.vllm).
"""
from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvstore.connectors.verify import Source

HANDOFF_VERSION = 1
HANDOFF_KEYS = ("kvstore_version", "kvstore_keys", "kvstore_node", "kvstore_lease", "kvstore_leases",
                "kvstore_namespace", "kvstore_layout", "kvstore_tp_size", "num_tokens")


@dataclasses.dataclass
class Transfer:
    """One request's blocks to move this step: vLLM block ids and, per TP rank, their keys."""

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]              # [tp_rank][i]
    parents: list[bytes | None] = dataclasses.field(default_factory=list)  # [tp_rank]: key before keys[r][0]
    is_async: bool = False
    # A handoff's load: the producer's node, pulled from without a lookup and not cached here
    # (a decode worker does not prefill: a local copy would cost TTFT and serve no one).
    handoff_node: str | None = None


@dataclasses.dataclass
class Check:
    """Blocks a request's forward completes this step, to compare with what the store holds
    under their keys (verified restores): the scheduler did not load them."""

    req_id: str
    block_ids: list[int]
    keys: list[list[bytes]]              # [tp_rank][i]
    sources: list[Source]                # [i]: (node, medium) a load would have read block i from


@dataclasses.dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """One step's work for the workers, built by the scheduler's `build_connector_meta`."""

    loads: list[Transfer] = dataclasses.field(default_factory=list)
    saves: list[Transfer] = dataclasses.field(default_factory=list)
    flush: set[str] = dataclasses.field(default_factory=set)  # preempted requests with saves in flight
    checks: list[Check] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """What a worker's checks found this step: the sources to quarantine, [(node, medium,
    mismatched blocks)] (vLLM aggregates the workers' and hands it to the scheduler's connector)."""

    quarantine: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVStoreWorkerMetadata":
        """vLLM's output aggregator, in the engine core, once per worker output after the first:
        the quarantines of both."""
        if isinstance(other, KVStoreWorkerMetadata):
            return KVStoreWorkerMetadata(self.quarantine + other.quarantine)
        return self
