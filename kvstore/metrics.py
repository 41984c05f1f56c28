"""Cluster stats -> Prometheus text exposition format (version 0.0.4).

Counters end in `_total`; transfer rates are gauges the service derives from the difference of
two consecutive stats snapshots (so a dashboard without PromQL still sees bytes per second).
"""
from __future__ import annotations

from typing import Iterable

_TIER_GAUGES = {
    "capacity_bytes": "Bytes the tier can hold.",
    "used_bytes": "Bytes of the tier's slots in use.",
    "used_slots": "Blocks resident in the tier.",
}
_TIER_COUNTERS = {
    "hits": "Blocks served from the tier.",
    "evictions": "Blocks dropped from the store out of the tier.",
    "demotions": "Blocks moved from the tier to the one below.",
    "promotions": "Blocks moved into the tier from below.",
    "bytes_written": "Bytes written into the tier.",
    "bytes_read": "Bytes read out of the tier.",
}
_STORE_COUNTERS = {
    "puts": "Blocks offered to the store.",
    "put_present": "Blocks offered that were present already.",
    "put_rejected": "Blocks refused for lack of room (everything pinned).",
    "gets": "Blocks asked for.",
    "hits": "Blocks found.",
    "misses": "Blocks not found.",
    "deletes": "Blocks deleted.",
    "corrupt_dropped": "Blocks dropped because their checksum failed.",
    "io_errors": "Block reads or writes that failed.",
}
_VERIFY_COUNTERS = {
    "checks": "Loads from the source that a connector checked against a recompute of the prefix.",
    "mismatches": "Checked loads from the source whose KV did not match the recompute.",
    "checked_blocks": "Blocks from the source checked against a recompute.",
    "mismatched_blocks": "Blocks from the source that did not match (deleted from the store).",
}
_DATAPLANE_COUNTERS = {
    "requests": "Data-plane (Arrow Flight) requests served.",
    "errors": "Data-plane requests refused as malformed or oversize.",
    "bytes_sent": "Block bytes streamed to peers.",
    "bytes_received": "Block bytes received from peers.",
}


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def sample(self, name: str, kind: str, doc: str, value: float, **labels: str) -> None:
        if name not in self._declared:
            self._declared.add(name)
            self.lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {float(value):.17g}")


def render(stats: dict, rates: dict[str, dict[str, float]] | None = None) -> str:
    """The exposition text for a controller stats snapshot; `rates[node][counter]` are per second."""
    w = _Writer()
    w.sample("kvstore_nodes", "gauge", "Nodes registered with the controller.", stats.get("nodes_registered", 0))
    w.sample("kvstore_nodes_dropped_total", "counter", "Nodes declared dead since the controller started.",
             stats.get("nodes_dropped", 0))
    w.sample("kvstore_index_keys", "gauge", "Distinct blocks in the cluster index.", stats.get("index_keys", 0))
    verification = stats.get("verification", {})
    w.sample("kvstore_verify_quarantined_sources", "gauge",
             "Sources (node, medium) quarantined after their KV did not match a recompute.",
             len(verification.get("quarantined", [])))
    for source in verification.get("sources", []):
        labels = {"node": str(source.get("node_id", "?"))[:12], "medium": str(source.get("medium", "?"))}
        for key, doc in _VERIFY_COUNTERS.items():
            w.sample(f"kvstore_verify_{key}_total", "counter", doc, source.get(key, 0), **labels)
    for source in verification.get("quarantined", []):
        w.sample("kvstore_verify_quarantined", "gauge", "1 for a quarantined source (node, medium).", 1,
                 node=str(source.get("node_id", "?"))[:12], medium=str(source.get("medium", "?")))
    for node_id, node in sorted(stats.get("nodes", {}).items()):
        node_label = node_id[:12]
        if "error" in node:
            w.sample("kvstore_node_up", "gauge", "1 if the node answered the last stats call.", 0, node=node_label)
            continue
        w.sample("kvstore_node_up", "gauge", "1 if the node answered the last stats call.", 1, node=node_label)
        w.sample("kvstore_node_holds", "gauge", "Open holds on the node: writers' reservations, readers' pins and "
                 "handoff leases.", node.get("holds", 0), node=node_label)
        store = node["store"]
        for key, doc in _STORE_COUNTERS.items():
            w.sample(f"kvstore_store_{key}_total", "counter", doc, store.get(key, 0), node=node_label)
        for tier in store.get("tiers", []):
            labels = {"node": node_label, "tier": tier["name"]}
            for key, doc in _TIER_GAUGES.items():
                w.sample(f"kvstore_tier_{key}", "gauge", doc, tier.get(key, 0), **labels)
            for key, doc in _TIER_COUNTERS.items():
                w.sample(f"kvstore_tier_{key}_total", "counter", doc, tier.get(key, 0), **labels)
        for cls in store.get("classes", []):  # size classes (tiers/geometry.py)
            labels = {"node": node_label, "slot_bytes": str(cls["slot_bytes"])}
            w.sample("kvstore_class_blocks", "gauge", "Blocks in a size class, all tiers.", cls["blocks"], **labels)
            w.sample("kvstore_class_block_bytes", "gauge", "Block bytes in a size class, all tiers.",
                     cls["block_bytes"], **labels)
            w.sample("kvstore_class_rounding_loss", "gauge", "Part of a size class's used slot bytes no block fills.",
                     cls["rounding_loss"], **labels)
            for tier_name, row in cls.get("tiers", {}).items():
                w.sample("kvstore_class_chunks", "gauge", "Chunks of a tier held by a size class.", row["chunks"],
                         tier=tier_name, **labels)
        for tenant, tiers in sorted(store.get("tenants", {}).items()):  # quotas (kvstore/quotas.py)
            for tier_name, use in tiers.items():
                labels = {"node": node_label, "tenant": tenant, "tier": tier_name}
                w.sample("kvstore_tenant_bytes", "gauge", "Bytes of a tenant's blocks in a tier of a node.",
                         use["bytes"], **labels)
                if use["quota"] is not None:
                    w.sample("kvstore_tenant_quota_bytes", "gauge", "A tenant's quota in a tier of a node.",
                             use["quota"], **labels)
        for key, doc in _DATAPLANE_COUNTERS.items():
            w.sample(f"kvstore_dataplane_{key}_total", "counter", doc, node.get("dataplane", {}).get(key, 0),
                     node=node_label)
        for key, value in (rates or {}).get(node_id, {}).items():
            w.sample(f"kvstore_dataplane_{key}_per_second", "gauge",
                     f"Rate of {key.replace('_', ' ')} over the last two scrapes.", value, node=node_label)
    return "\n".join(w.lines) + "\n"


def dataplane_rates(before: dict, after: dict, seconds: float) -> dict[str, dict[str, float]]:
    """Per node, bytes sent and received per second between two stats snapshots."""
    if seconds <= 0:
        return {}
    rates = {}
    for node_id, node in after.get("nodes", {}).items():
        old = before.get("nodes", {}).get(node_id, {}).get("dataplane")
        new = node.get("dataplane")
        if old and new:
            rates[node_id] = {k: max(0.0, (new[k] - old[k]) / seconds) for k in ("bytes_sent", "bytes_received")}
    return rates


def names(text: str) -> Iterable[str]:
    """Metric names in an exposition text (for tests and docs)."""
    return sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")})
