"""Lookups of many callers at once, sent to each index shard as one call per round.

Every lookup asks every shard holding part of its prompt, and a Ray call costs about a
millisecond of the caller's and the shard's time whatever it carries: one process fanning out
each lookup on its own runs out of calls long before the shards run out of work
(docs/scale.md). So each shard has one dispatcher thread here: it takes every request queued for
its shard, sends them as one `batch` call, hands each caller its answer, and goes again. A lone
lookup costs one call per shard, as before; under load the rounds carry more requests, not more
calls. A caller waits at most `timeout_s`; a shard that failed or did not answer in time gives
None (cluster/shardmap.py reads that as "knows nothing": shorter answers, never a wrong node).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from kvstore.cluster import shardmap
from kvstore.cluster.shardmap import Part

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    method: str
    keys: bytes
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    answer: object = None


class ShardLookups:
    def __init__(self, call: Callable[[int, list[tuple[str, bytes]]], list], count: int, timeout_s: float) -> None:
        """`call(shard, [(method, keys), ...])` runs one shard's `batch` and returns its answers
        (for the actors: `ray.get(actor.batch.remote(requests), timeout=...)`)."""
        self._call = call
        self.timeout_s = timeout_s
        self._queues: list[list[_Request]] = [[] for _ in range(count)]
        self._ready = [threading.Condition() for _ in range(count)]
        self._stopping = threading.Event()
        self.counters = {"calls": 0, "requests": 0}
        for shard in range(count):
            threading.Thread(target=self._dispatch, args=(shard,), name=f"kvstore-lookups-{shard}", daemon=True).start()

    def ask(self, parts: list[Part], method: str) -> list:
        """Each part's shard's answer to `method` (None where it failed or was late)."""
        requests = []
        for part in parts:
            request = _Request(method, part.keys)
            with self._ready[part.shard]:
                self._queues[part.shard].append(request)
                self._ready[part.shard].notify()
            requests.append(request)
        deadline = time.monotonic() + self.timeout_s
        return [r.answer if r.done.wait(max(deadline - time.monotonic(), 0)) else None for r in requests]

    def stop(self) -> None:
        self._stopping.set()
        for ready in self._ready:
            with ready:
                ready.notify()

    def _dispatch(self, shard: int) -> None:
        while not self._stopping.is_set():
            with self._ready[shard]:
                while not self._queues[shard] and not self._stopping.is_set():
                    self._ready[shard].wait()
                batch, self._queues[shard] = self._queues[shard], []
            if not batch:
                continue
            try:
                answers = self._call(shard, [(r.method, r.keys) for r in batch])
            except Exception as e:  # restarting or gone: every request of the round knows nothing
                log.info("index shard %d did not answer %d lookups (%s)", shard, len(batch), type(e).__name__)
                answers = [None] * len(batch)
            self.counters["calls"] += 1
            self.counters["requests"] += len(batch)
            for request, answer in zip(batch, answers):
                request.answer = answer
                request.done.set()


class IndexReader:
    """The cluster index as a reader sees it: a prompt split by shard, every shard asked at once
    (one call per shard per round, through ShardLookups), the answers combined (shardmap). The
    controller uses one, and so does every client, which asks the shards directly: lookups do
    not all pass through the one controller."""

    def __init__(self, call: Callable[[int, list[tuple[str, bytes]]], list], count: int, timeout_s: float) -> None:
        self.count = count
        self._lookups = ShardLookups(call, count, timeout_s)

    def locate(self, keys: list[bytes]) -> list[list[tuple[str, str]]]:
        """Per key, the (node id, medium) pairs holding it, the fastest medium first."""
        parts = shardmap.split(keys, self.count)
        return shardmap.locate(parts, self._lookups.ask(parts, "locate"), len(keys))

    def longest_prefix(self, keys: list[bytes]) -> int:
        """Leading keys present somewhere in the cluster."""
        parts = shardmap.split(keys, self.count)
        return shardmap.longest_prefix(parts, self._lookups.ask(parts, "first_missing"), len(keys))

    def prefix_by_node(self, keys: list[bytes], nodes) -> dict[str, int]:
        """Per node of `nodes`, how many leading keys of the prompt it holds itself."""
        parts = shardmap.split(keys, self.count)
        return shardmap.prefix_by_node(parts, self._lookups.ask(parts, "prefix_by_node"), nodes, len(keys))

    def hbm_prefix_by_engine(self, keys: list[bytes], engines) -> dict[str, int]:
        """Per engine of `engines`, how many leading keys of the prompt it holds in its HBM."""
        parts = shardmap.split(keys, self.count)
        return shardmap.prefix_by_node(parts, self._lookups.ask(parts, "hbm_prefix_by_engine"), engines, len(keys))

    @property
    def counters(self) -> dict:
        return self._lookups.counters

    def stop(self) -> None:
        self._lookups.stop()
