"""The vLLM connector's worker side: moves the scheduler's planned blocks between vLLM's cache and the store.

It runs in each vLLM worker, where the KV cache lives. Each step it receives the scheduler's
`KVStoreConnectorMetadata`: it pulls loads into vLLM's blocks (sync ones before the forward,
async ones on a loader thread), copies saves out layer by layer as the forward computes them and
commits them (sync: before the step ends; async: on a saver thread, vLLM holding the blocks),
runs the step's verified-restore checks (`WorkerChecks`), and reports what finished back to the
scheduler. `KVStoreConnector` (kvstore.connectors.vllm) delegates here.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

import kvstore
from kvstore.cluster.pulled import Landing
from kvstore.connectors.verify import Verifier
from kvstore.connectors.vllm_metadata import KVStoreConnectorMetadata, KVStoreWorkerMetadata, Transfer
from kvstore.connectors.vllm_paged_cache import PagedCache
from kvstore.connectors.vllm_settings import Settings
from kvstore.connectors.vllm_stats import Counters
from kvstore.connectors.vllm_worker_checks import WorkerChecks
from kvstore.layout import Layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvstore.connectors.vllm")  # the connector's one logger, whichever module logs


class KVStoreWorker:
    """The worker side of one engine's connector, in one worker (made by `KVStoreConnector` with
    role WORKER)."""

    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", settings: Settings,
                 layouts: list[Layout], client) -> None:
        self.settings = settings
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = get_tensor_model_parallel_rank() if tp_size > 1 else 0
        except Exception:
            self._tp_rank = 0
        self.layout = layouts[self._tp_rank]
        self._client = client
        self.cache = PagedCache(vllm_config, kv_cache_config, self.layout)
        self.counters = Counters()
        # Verified restores: this one counts the checks it makes (the quarantine is the scheduler's).
        self.verifier = Verifier(settings.verify)
        self._checks = WorkerChecks(client, self._tp_rank, self.cache, self.verifier, self.counters)
        self._lock = threading.Lock()
        # One thread each: the staging buffer of a direction is reused job after job.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-load")
        # The pulls of loads (a sync one and an async one at once at most), while their layers are
        # put into vLLM's cache on the loading thread.
        self._puller = ThreadPoolExecutor(2, thread_name_prefix="kvstore-vllm-pull")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvstore-vllm-save")
        self._loads: dict[str, Future] = {}    # req id -> async load -> failed block ids
        self._saves: dict[str, list[Future]] = {}
        self._finished: set[str] = set()        # finished requests whose async saves we wait for
        self._load_errors: set[int] = set()
        self._saved_layers: set[int] = set()
        self._save_buffer: torch.Tensor | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """For `KVStoreConnector.register_kv_caches`: takes vLLM's per-layer caches
        (`PagedCache.register`, which raises if they cannot be read as this layout's blocks)."""
        self.cache.register(kv_caches)

    def bind_connector_metadata(self, meta: "KVConnectorMetadata") -> None:
        """For `KVStoreConnector.bind_connector_metadata`, once the step's metadata is bound:
        starts fetching what its checks compare with."""
        self._checks.start(meta)

    # -- loads ------------------------------------------------------------------------------------

    def start_load_kv(self, meta: "KVConnectorMetadata") -> None:
        """For `KVStoreConnector.start_load_kv`, with the step's metadata. Returns once the sync
        loads are done; async ones are handed to the loader thread and reported by `get_finished`."""
        assert isinstance(meta, KVStoreConnectorMetadata)
        for load in meta.loads:
            if load.is_async:
                with self._lock:
                    self._loads[load.req_id] = self._loader.submit(self._load, load, "async-load")
            else:
                failed = self._load(load, "sync-load")
                with self._lock:
                    self._load_errors |= failed

    def _load(self, load: Transfer, buffer: str) -> set[int]:
        """Pulls a request's blocks and writes the leading run that arrived into vLLM's cache.
        Returns the vLLM block ids that did not load (from the first missing block on)."""
        t0 = time.perf_counter()
        keys = load.keys[self._tp_rank]
        n = len(keys)
        try:
            if self.settings.test_delete_before_load:
                self._client.delete(keys)
            staging = self.cache.buffer(buffer, n)
            handoff = load.handoff_node is not None
            landing = Landing(keys, self.layout.layer_nbytes, self.layout.num_layers)
            pull = self._puller.submit(self._client.get, self.layout, keys, staging, owner=load.handoff_node,
                                       cache=False if handoff else None, landing=landing)
            # Each layer goes into vLLM's blocks once it has landed in every block, while later
            # layers still arrive (they come layer-major). Blocks that then turn out missing or
            # damaged are reported below as failed, and vLLM recomputes them over what was put there.
            for layer in range(self.layout.num_layers):
                landing.wait_layer(layer)
                self.cache.scatter_layer(layer, load.block_ids[:n], staging[:, layer])
            found = pull.result().found
            usable = next((i for i, ok in enumerate(found) if not ok), n)
        except Exception as e:
            log.warning("kvstore load of %d blocks for request %s failed: %s", n, load.req_id, e)
            usable = 0
        failed = set(load.block_ids[usable:])
        if failed:
            log.warning("kvstore: %d of %d blocks of request %s could not be loaded; vLLM recomputes them",
                        len(failed), n, load.req_id)
        self.counters.add(blocks_loaded=usable, blocks_load_failed=n - usable, load_s=time.perf_counter() - t0)
        return failed

    # -- saves (and checks, which compare the same layers as the forward computes them) -----------

    def save_kv_layer(self, meta: "KVConnectorMetadata", layer_name: str) -> None:
        """For `KVStoreConnector.save_kv_layer`, with the step's metadata: compares this layer for
        the step's checks; in sync save mode copies this layer of the blocks completed this step
        into the step's payload buffer (the commit is in wait_for_save); in async mode the saver
        thread reads the blocks later."""
        if not isinstance(meta, KVStoreConnectorMetadata) or not (meta.saves or meta.checks):
            return
        try:
            layer = self.cache.layer_names.index(layer_name)
        except ValueError:
            return
        if meta.checks:
            self._checks.on_layer(meta, layer, layer_name)
        if not meta.saves or self.settings.save_async:
            return
        block_ids = [b for s in meta.saves for b in s.block_ids]
        if self._save_buffer is None or self._save_buffer.shape[0] != len(block_ids):
            self._save_buffer = self.cache.buffer("sync-save", len(block_ids))
        self.cache.gather_layer(layer, block_ids, self._save_buffer[:, layer])
        self._saved_layers.add(layer)

    def wait_for_save(self, meta: "KVConnectorMetadata") -> None:
        """For `KVStoreConnector.wait_for_save`, with the step's metadata. First acts on the step's
        checks (a wrong block is deleted before the right one is saved). Sync mode: copies any
        layer save_kv_layer did not, and commits the step's blocks to the store before returning.
        Async mode: hands the step's saves to the saver thread."""
        if isinstance(meta, KVStoreConnectorMetadata) and meta.checks:
            self._checks.finish(meta)
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            self._save_buffer, self._saved_layers = None, set()
            return
        if self.settings.save_async:
            for save in meta.saves:
                with self._lock:
                    self._saves.setdefault(save.req_id, []).append(self._saver.submit(self._save, save, None))
            return
        block_ids = [b for s in meta.saves for b in s.block_ids]
        buf = self._save_buffer if self._save_buffer is not None else self.cache.buffer("sync-save", len(block_ids))
        for layer in range(len(self.cache.caches)):
            if layer not in self._saved_layers:
                self.cache.gather_layer(layer, block_ids, buf[:, layer])
        start = 0
        for save in meta.saves:
            n = len(save.block_ids)
            self._save(save, buf[start:start + n])
            start += n
        self._save_buffer, self._saved_layers = None, set()

    def _save(self, save: Transfer, payload: torch.Tensor | None) -> None:
        """Commits one request's blocks; `payload` None: copies them out of vLLM's cache first."""
        t0 = time.perf_counter()
        keys = save.keys[self._tp_rank]
        try:
            if payload is None:
                payload = self.cache.buffer("async-save", len(keys))
                for layer in range(len(self.cache.caches)):
                    self.cache.gather_layer(layer, save.block_ids, payload[:, layer])
            # wait_index: a handoff's reader (or this engine's next lookup) on any node finds them
            # as soon as the save is reported done; one controller call per request and step.
            result = self._client.put(self.layout, keys, payload,
                                      parents=kvstore.chain_parents(keys, save.parents[self._tp_rank]), wait_index=True)
            stored, failed = result.stored + result.present, len(result.rejected)
            if failed:
                log.warning("kvstore had no room for %d of %d blocks of request %s", failed, len(keys), save.req_id)
        except Exception as e:
            log.warning("kvstore save of %d blocks for request %s failed: %s", len(keys), save.req_id, e)
            stored, failed = 0, len(keys)
        self.counters.add(blocks_saved=stored, blocks_save_failed=failed, save_s=time.perf_counter() - t0)

    def handle_preemptions(self, meta: "KVConnectorMetadata") -> None:
        """For `KVStoreConnector.handle_preemptions`: returns once the async saves of the requests
        the scheduler preempted are done."""
        if not isinstance(meta, KVStoreConnectorMetadata):
            return
        for req_id in meta.flush:
            with self._lock:
                futures = list(self._saves.get(req_id, ()))
            for f in futures:
                f.result()

    # -- completions ------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """For `KVStoreConnector.get_finished`. Returns (finished_sending, finished_recving):
        finished requests held for async saves once all their saves are committed, and requests
        whose async load is over (loaded or failed); None for an empty set."""
        sending: set[str] = set()
        recving: set[str] = set()
        with self._lock:
            self._finished |= {r for r in finished_req_ids if r in self._saves}
            for req_id in list(self._finished):
                if all(f.done() for f in self._saves[req_id]):
                    del self._saves[req_id]
                    self._finished.discard(req_id)
                    sending.add(req_id)
            for req_id, future in list(self._loads.items()):
                if future.done():
                    del self._loads[req_id]
                    recving.add(req_id)
                    try:
                        self._load_errors |= future.result()
                    except Exception:  # _load catches everything; belt and braces
                        log.exception("kvstore async load of %s", req_id)
            # Saves of requests that did not finish are dropped from the books once done.
            for req_id in [r for r, fs in self._saves.items() if r not in self._finished]:
                self._saves[req_id] = [f for f in self._saves[req_id] if not f.done()] or self._saves[req_id][-1:]
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """For `KVStoreConnector.get_block_ids_with_load_errors`. Returns the vLLM block ids whose
        load failed since the last call."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVStoreWorkerMetadata | None:
        """For `KVStoreConnector.build_connector_worker_meta`. Returns the sources this worker's
        checks found wrong since the last call (None: none)."""
        return self._checks.worker_meta()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """For `KVStoreConnector.wait_idle` (tests): returns once every load and save handed to
        the threads is done, or raises TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            futures = list(self._loads.values()) + [f for fs in self._saves.values() for f in fs]
        for f in futures:
            f.exception(timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """For `KVStoreConnector.shutdown`: returns once the transfers and checks in flight are done."""
        for pool in (self._loader, self._puller, self._saver):
            pool.shutdown(wait=True)
        self._checks.shutdown()
