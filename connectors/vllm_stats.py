"""The vLLM connector's counters: per step for vLLM's stats logger, and per process (TOTALS).

Each side of the connector counts into its own `Counters`; vLLM collects them after each step
(`get_kv_connector_stats`), sums the workers' with the scheduler's, and logs them.
"""
from __future__ import annotations

import dataclasses
import threading

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = ("lookups", "lookup_hit_blocks", "lookup_s", "blocks_loaded", "blocks_load_failed", "blocks_saved",
            "blocks_save_failed", "load_s", "save_s",
            # verified restores: scheduler (requests computed for a check instead of loaded, and the
            # blocks they would have loaded; blocks not loaded because their source is quarantined)
            "verify_requests", "verify_request_blocks", "verify_quarantine_skipped_blocks",
            "verify_quarantined_sources",
            # ... and workers (checks made, blocks compared, checks that failed, blocks that failed)
            "verify_checks", "verify_checked_blocks", "verify_mismatches", "verify_mismatched_blocks", "verify_s")

# Totals per process since start, for tests and debugging (the worker's and the scheduler's).
TOTALS: dict[str, float] = {name: 0 for name in COUNTERS}
_LOCK = threading.Lock()  # the loader, saver and checker threads count too


@dataclasses.dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counters since the last report (workers' transfers; sums when aggregated)."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        """vLLM's stats logger, after it logged an interval: all counters back to 0."""
        self.data = {name: 0 for name in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        """vLLM's output aggregator (the workers' stats of a step, then the scheduler's) and its
        stats logger (the steps of an interval): adds `other` into these counters; returns self."""
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """vLLM's stats logger, once per logging interval: the counters to log, as they are."""
        return dict(self.data)

    def is_empty(self) -> bool:
        """vLLM's stats logger: True when nothing was counted (nothing to log)."""
        return not any(self.data.values())


class Counters:
    """One side's counters since vLLM last collected them."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def add(self, **deltas: float) -> None:
        """Adds to these counters and to the process's TOTALS."""
        with _LOCK:
            for name, value in deltas.items():
                self._since[name] = self._since.get(name, 0) + value
                TOTALS[name] += value

    def take(self) -> KVStoreConnectorStats | None:
        """The counters since the last call, and starts afresh (None when nothing was counted)."""
        with _LOCK:
            if not any(self._since.values()):
                return None
            since, self._since = self._since, {}
        return KVStoreConnectorStats(data=since)
