"""Which index shard holds a key, and how the shards' answers about one prompt combine.

A key's shard is its first 8 bytes (little-endian) modulo the shard count: keys are content
hashes, so shards fill evenly, and the same on every node and the controller. (A shard's own
table uses the last 8 bytes: see cluster/index.py.) The count is fixed for a cluster's life.

A lookup splits the prompt into one `Part` per shard (the shard's keys, in prompt order, and
their positions in the prompt), asks every shard at once, and combines the answers here. A shard
that did not answer (restarting, unreachable) counts as knowing none of its keys: answers only
get shorter, never name a node that does not hold a key.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kvstore.cluster.index import keys_array

SHARD_ACTOR_PREFIX = "kvstore-index"


def shard_actor_name(shard: int) -> str:
    return f"{SHARD_ACTOR_PREFIX}-{shard}"


def default_shard_count(nodes: int) -> int:
    """One shard per eight nodes, at least two (so a shard restart never blinds the whole index)."""
    return max(2, nodes // 8)


def shards_of(keys: np.ndarray, count: int) -> np.ndarray:
    """Per key row (see index.keys_array), its shard."""
    return (keys[:, 0] % np.uint64(count)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Part:
    shard: int
    positions: np.ndarray  # where its keys are in the prompt, ascending
    keys: bytes  # its keys, concatenated, in prompt order

    def __len__(self) -> int:
        return len(self.positions)


def split(keys: list[bytes] | bytes, count: int) -> list[Part]:
    """The prompt's keys grouped by shard (only shards with keys get a part)."""
    rows = keys_array(keys)
    shard = shards_of(rows, count)
    order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[order], np.arange(count + 1))
    parts = []
    for s in range(count):
        positions = order[bounds[s]:bounds[s + 1]]
        if len(positions):
            parts.append(Part(s, positions, rows[positions].tobytes()))
    return parts


def longest_prefix(parts: list[Part], answers: list[int | None], total: int) -> int:
    """Combines each shard's count of leading keys it knows of (None: did not answer)."""
    return min([total] + [_stop(part, answer) for part, answer in zip(parts, answers)])


def prefix_by_node(parts: list[Part], answers: list[dict[str, int] | None], nodes, total: int) -> dict[str, int]:
    """Per node in `nodes`, its leading keys: the earliest position, over all shards, of a key of
    that shard it does not hold (a shard's answer names the nodes holding its first keys)."""
    return {node: min([total] + [_stop(part, (answer or {}).get(node, 0)) for part, answer in zip(parts, answers)])
            for node in nodes}


def locate(parts: list[Part], answers: list[list | None], total: int) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = [[] for _ in range(total)]
    for part, answer in zip(parts, answers):
        if answer is not None:
            for position, holders in zip(part.positions.tolist(), answer):
                out[position] = [tuple(h) for h in holders]
    return out


def _stop(part: Part, held: int | None) -> int:
    """The prompt position of the first of the part's keys past its `held` leading ones."""
    held = held or 0
    return int(part.positions[held]) if held < len(part) else 1 << 62
