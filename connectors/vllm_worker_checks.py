"""Verified restores, the worker's half: compare the KV the forward computes with what the store holds.

The scheduler sends, instead of a load it picked for a check, the blocks the request's forward
completes this step (`Check`s in the step's metadata). The worker fetches the stored blocks in
the background as the step's metadata is bound (`start`), compares each layer as the forward
hands it over (`on_layer`; `max|stored - computed| <= atol + rtol * max|computed|` per block,
K|V and KV head, `verify.compare`), and at the end of the step, before its saves commit, acts on
every check (`finish`: `Verifier.record` deletes the wrong blocks, counts, logs and reports) and
queues the wrong sources for the scheduler's quarantine (`worker_meta`). A check that cannot run
is dropped with a warning: it must never break the forward or the step.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

import vllm

from kvstore.connectors.verify import Source, Verifier, compare
from kvstore.connectors.vllm_metadata import Check, KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.connectors.vllm_paged_cache import PagedCache
from kvstore.connectors.vllm_stats import Counters

log = logging.getLogger("kvstore.connectors.vllm")  # the connector's one logger, whichever module logs


class WorkerChecks:
    """One worker's checks of the current step, and the sources found wrong since vLLM last asked."""

    def __init__(self, client, tp_rank: int, cache: PagedCache, verifier: Verifier, counters: Counters) -> None:
        self._client = client
        self._tp_rank = tp_rank
        self._cache = cache
        self._layout = cache.layout
        self._verifier = verifier
        self._counters = counters
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-verify")
        # This step's fetch of the stored blocks, per check the blocks found and the failures so
        # far ({position: (position, layer, part, error, bound)}), the layers compared, the time.
        self._fetch: Future | None = None
        self._found: list[list[int]] = []
        self._failed: list[dict[int, tuple]] = []
        self._checked_layers: set[int] = set()
        self._check_s = 0.0
        self._quarantine_out: list[tuple[str, str, int]] = []

    def start(self, meta: object) -> None:
        """The worker, when a step's metadata is bound (before the forward): forgets the last
        step's checks and starts fetching the stored blocks of this step's, on the checker thread
        while the forward runs."""
        self._fetch, self._found, self._failed = None, [], []
        self._checked_layers, self._check_s = set(), 0.0
        if isinstance(meta, KVStoreConnectorMetadata) and meta.checks and self._cache.caches:
            self._fetch = self._checker.submit(self._fetch_checks, meta.checks)

    def _fetch_checks(self, checks: list[Check]) -> tuple[torch.Tensor, list[list[int]]]:
        """The stored blocks of every check of the step, and per check the blocks found."""
        buf = self._cache.buffer("verify", sum(len(c.block_ids) for c in checks))
        found, start = [], 0
        for c in checks:
            keys = c.keys[self._tp_rank]
            try:
                ok = self._client.get(self._layout, keys, buf[start:start + len(keys)]).found
            except Exception as e:  # nothing to compare with: no check
                log.warning("kvstore: fetching %d blocks of request %s to verify them failed: %s", len(keys),
                            c.req_id, e)
                ok = [False] * len(keys)
            found.append([start + i for i, hit in enumerate(ok) if hit])
            start += len(keys)
        return buf, found

    def on_layer(self, meta: KVStoreConnectorMetadata, layer: int, layer_name: str) -> None:
        """The worker's save_kv_layer, after the forward wrote this layer's KV: compares it for
        this step's checks (waiting for the fetch if need be). Never raises."""
        try:
            self._check_layer(meta, layer)
        except Exception as e:  # a check that cannot run must never break the forward
            log.warning("kvstore: verifying layer %s failed, dropping this step's checks: %s", layer_name, e)
            self._fetch = None

    def _check_layer(self, meta: KVStoreConnectorMetadata, layer: int) -> None:
        """Compares one layer of the blocks the forward just computed with the stored ones."""
        if self._fetch is None or layer in self._checked_layers:
            return
        t0 = time.perf_counter()
        self._checked_layers.add(layer)
        try:
            buf, found = self._fetch.result()
        except Exception as e:  # _fetch_checks catches everything; belt and braces
            log.warning("kvstore: verify fetch failed: %s", e)
            buf, found = None, [[] for _ in meta.checks]
        if not self._found:
            self._found = found
            self._failed = [{} for _ in meta.checks]
        rtol, atol = self._verifier.settings.rtol_for(self._layout.dtype), self._verifier.settings.atol
        _, T, H, D = self._layout.block_shape[1:]
        start = 0
        for j, c in enumerate(meta.checks):
            rows = found[j]
            if rows:
                ids = [c.block_ids[r - start] for r in rows]
                computed = torch.empty((len(ids), 2, T, H, D), dtype=self._layout.torch_dtype)
                self._cache.gather_layer(layer, ids, computed)
                stored = buf[rows, layer]
                failed = compare([(stored[:, 0].reshape(-1, H, D), stored[:, 1].reshape(-1, H, D))],
                                 [(computed[:, 0].reshape(-1, H, D), computed[:, 1].reshape(-1, H, D))], T, rtol, atol)
                for pos, _, part, error, bound in failed:
                    self._failed[j].setdefault(pos, (pos, layer, part, error, bound))
            start += len(c.block_ids)
        self._check_s += time.perf_counter() - t0

    def finish(self, meta: KVStoreConnectorMetadata) -> None:
        """The worker's wait_for_save, after the forward and before the step's saves commit (so a
        kv_both engine writes the right KV back): compares any layer the forward did not hand
        over, then acts on each check and queues the wrong sources for the scheduler's quarantine.
        Never raises."""
        try:
            self._finish(meta)
        except Exception as e:  # a check that cannot run must never break the step
            log.warning("kvstore: finishing this step's verification failed: %s", e)
            self._fetch = None

    def _finish(self, meta: KVStoreConnectorMetadata) -> None:
        if self._fetch is None:
            return
        for layer in range(len(self._cache.caches)):
            self._check_layer(meta, layer)
        start = 0
        for j, c in enumerate(meta.checks):
            rows = self._found[j]
            if rows:
                keys = [c.keys[self._tp_rank][r - start] for r in rows]
                sources = [tuple(c.sources[r - start]) if r - start < len(c.sources) else ("?", "?") for r in rows]
                failed = sorted(self._failed[j].values())
                result = self._verifier.record(self._client, keys, sources, failed, self._layout, self._check_s)
                bad: dict[Source, int] = {}
                for m in result.mismatches:
                    bad[m.source] = bad.get(m.source, 0) + 1
                self._quarantine_out += [(node, medium, n) for (node, medium), n in bad.items()]
                self._counters.add(verify_checks=1, verify_checked_blocks=len(keys),
                                   verify_mismatches=int(not result.ok),
                                   verify_mismatched_blocks=len(result.mismatches))
                log.log(logging.INFO if result.ok else logging.ERROR,
                        "kvstore: verified %d stored blocks of request %s against the engine's KV: %s", len(keys),
                        c.req_id, "match" if result.ok else f"{len(result.mismatches)} do not match (deleted; "
                        f"quarantining {sorted(bad)}; vLLM {vllm.__version__})")
            start += len(c.block_ids)
        self._counters.add(verify_s=self._check_s)
        self._fetch = None

    def worker_meta(self) -> KVStoreWorkerMetadata | None:
        """The worker, after each step. Returns the sources found wrong since the last call, for
        the scheduler (None: none)."""
        out, self._quarantine_out = self._quarantine_out, []
        return KVStoreWorkerMetadata(out) if out else None

    def shutdown(self) -> None:
        """The worker, at shutdown: returns once a fetch in flight is done."""
        self._checker.shutdown(wait=True)
