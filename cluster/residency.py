"""Which inference engine holds which prompt blocks in its own GPU memory (HBM), for best_node.

vLLM engines announce their prefix cache's blocks as KV events (BlockStored / BlockRemoved with
medium "GPU", keyed by vLLM's block hashes). The kvstore connector in each engine subscribes to
its own engine's events, maps the hashes to kvstore keys (it knows both for every prompt it has
seen: connectors/vllm_residency.py) and reports them, with a heartbeat, through the controller
to the index shards. The shards keep them apart from the store's holders: an engine's HBM is no
place to pull a block from, only a router's reason to send the request to that engine. An engine
not heard from for ENGINE_TTL_S (it stopped, or its connector did) is forgotten.

`best_node` then weighs both: a node's prefix is the longer of what its store holds and what an
engine on it holds in HBM, and an HBM prefix wins a tie (its blocks need no load at all).
"""
from __future__ import annotations

import time

from kvstore.errors import InvalidKeyError

ENGINE_TTL_S = 30.0
HEARTBEAT_S = 5.0  # how often an engine's connector reports, with or without news
MAX_ENGINE_ID = 128  # characters


def check_engine_id(engine_id: object) -> str:
    if not isinstance(engine_id, str) or not engine_id or len(engine_id) > MAX_ENGINE_ID:
        raise InvalidKeyError(f"engine_id={engine_id!r:.80} must be a non-empty string of at most {MAX_ENGINE_ID} "
                              "characters")
    return engine_id


class Engines:
    """The engines reporting residency: engine id -> (its node, when last heard)."""

    def __init__(self, ttl_s: float = ENGINE_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._seen: dict[str, tuple[str, float]] = {}

    def heard(self, engine_id: str, node_id: str) -> None:
        self._seen[engine_id] = (node_id, time.monotonic())

    def expired(self) -> list[str]:
        """Engines silent for longer than the TTL, forgotten here (the caller clears the shards)."""
        cutoff = time.monotonic() - self._ttl_s
        gone = [e for e, (_, seen) in self._seen.items() if seen < cutoff]
        for engine_id in gone:
            del self._seen[engine_id]
        return gone

    def on_nodes(self, node_ids) -> list[str]:
        """Engines on nodes that left the cluster, forgotten here."""
        gone = [e for e, (node, _) in self._seen.items() if node in node_ids]
        for engine_id in gone:
            del self._seen[engine_id]
        return gone

    def node_of(self) -> dict[str, str]:
        return {engine_id: node for engine_id, (node, _) in self._seen.items()}


def best_node(per_node: dict[str, int], per_engine: dict[str, int], node_of: dict[str, str]) -> dict:
    """best_node's answer from the store's prefix per node and the HBM prefix per engine:
    {"node_id", "prefix_blocks", "per_node", "engine_id" (the engine there holding the longest
    prefix in HBM, when that prefix is what won), "hbm_prefix_blocks", "per_engine" (engines
    holding at least the prompt's first block)}. Ties go to
    HBM, then to the lowest node (and engine) id."""
    # Only engines holding some of the prompt: the others' names are none of the asker's business
    # (a tenant's keys are scoped, so only its own engines can hold them).
    per_engine = {e: n for e, n in per_engine.items() if e in node_of and n}
    candidates = [(-blocks, 1, node, "") for node, blocks in per_node.items()]
    candidates += [(-blocks, 0, node_of[engine], engine) for engine, blocks in per_engine.items() if blocks]
    if not candidates:
        return {"node_id": None, "prefix_blocks": 0, "per_node": {}, "engine_id": None, "hbm_prefix_blocks": 0,
                "per_engine": {}}
    blocks, not_hbm, node, engine = min(candidates)
    return {"node_id": node, "prefix_blocks": -blocks, "per_node": per_node,
            "engine_id": engine or None, "hbm_prefix_blocks": 0 if not_hbm else -blocks, "per_engine": per_engine}
