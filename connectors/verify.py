"""Verified restores: right KV or a clean miss.

Checksums prove that a block's bytes did not change after they were committed. They cannot tell
KV that was wrong when it was written (a writer bug, an engine or kernel change, blocks of one
prompt committed under another prompt's keys) from right KV. The only proof of that is the
model itself: recompute the prefix and compare. A `Verifier` does that on a sample of loads:

- **When.** A load is checked if a coin with probability `fraction` says so, or if any source
  it read from is still within its first `first_n` loads seen by this process. A source is a
  (writer node, medium) pair, so a new node, a new tier (blocks now restored from NVMe, say) or
  a restarted engine (a new version starts a new process: every source is new to it) is checked
  on its first loads, and steady traffic on 1 load in 1/fraction.
- **Compare.** The connector recomputes the loaded prefix on the model. Per block, layer, K/V and
  KV head: `max|loaded - recomputed| <= atol + rtol * max|recomputed|`, the max on the right
  taken over that head's whole loaded prefix (see `VerifySettings`). NaN fails.
- **Mismatch.** The blocks that failed are deleted from the store (everywhere), every source
  they came from is quarantined for new loads in this process (its blocks are a miss: the
  engine recomputes), the engine goes on with the recomputed KV (its tokens stay right), and the
  mismatch is counted, logged (block key, medium, writer node, versions) and reported to the
  controller (`report_verification`, shown in /v1/stats and /metrics).

`admit` runs right after `handoff.load`; when it says so, the engine recomputes the prefix and
passes the result to `check`. The engine side is in connectors/hf.py. An engine that decides
before it loads and compares layer by layer (connectors/vllm.py) uses the parts: `admit_blocks`,
`compare`, `record` and `quarantine`.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys
import threading
import time
from collections import Counter
from typing import Callable, Sequence

import torch

from kvstore.connectors.handoff import Loaded

log = logging.getLogger(__name__)

# How far a right recompute may land from the stored KV, relative to the head's largest |value|.
# Measured on the tiny Llama (CPU, one thread): the same prefix computed in one pass against in
# several chunks (what a prefix-reusing writer does) differs by 2e-6 (float32), 7e-3 (float16)
# and 0.05 (bfloat16) at 32 layers, growing with depth; with the same chunking, dtype and thread
# count it is bit-identical. Wrong KV differs by O(1): one token changed in a block gives >= 0.46,
# another prompt's KV ~1.7. The defaults sit between, with room for deeper models and for
# writers on other kernels (TF32 matmuls behave like float16).
DEFAULT_RTOL = {"float32": 0.05, "float16": 0.05, "bfloat16": 0.2}
DEFAULT_ATOL = 1e-6  # a head whose values are all ~0 must not fail on rounding noise


@dataclasses.dataclass(frozen=True)
class VerifySettings:
    """How often, and how strictly, restores are verified.

    fraction: share of loads checked at random. A check costs one prefill of the loaded prefix
      (what the load saved), so 0.01 costs ~1% of the saving, and a source that serves wrong KV
      steadily is caught within ~100 of its loads.
    first_n: every load is checked while a source it reads from is within its first `first_n`
      loads in this process. Wrong KV usually comes with something new (a node, a tier, an
      engine version); 8 catches that early at the price of 8 prefills per source and process.
    rtol, atol: the tolerance (see DEFAULT_RTOL; rtol None: by the layout's dtype).
    seed: the sampling coin's seed (None: random).
    """

    fraction: float = 0.01
    first_n: int = 8
    rtol: float | None = None
    atol: float = DEFAULT_ATOL
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in [0, 1]")
        if self.first_n < 0:
            raise ValueError(f"first_n={self.first_n} must be >= 0")
        if (self.rtol is not None and not self.rtol >= 0) or not self.atol >= 0:
            raise ValueError(f"rtol={self.rtol}, atol={self.atol} must be >= 0")

    def rtol_for(self, dtype: str) -> float:
        return self.rtol if self.rtol is not None else DEFAULT_RTOL.get(dtype, 0.2)


Source = tuple[str, str]  # (node id, medium)


@dataclasses.dataclass
class Admission:
    """A load as the verifier let it through: `loaded` is cut before the first block from a
    quarantined source; `verify` says whether the engine must recompute and `check` it."""

    loaded: Loaded
    sources: list[Source]  # per usable block (empty when not looked up)
    verify: bool
    skipped_blocks: int  # blocks dropped because their source is quarantined


@dataclasses.dataclass
class Mismatch:
    block: int
    key: bytes
    source: Source
    layer: int
    part: str  # "k" or "v"
    error: float
    bound: float


@dataclasses.dataclass
class CheckResult:
    ok: bool
    mismatches: list[Mismatch]  # the first failure of each failed block
    seconds: float = 0.0


def compare(loaded: Sequence[tuple[torch.Tensor, torch.Tensor]], recomputed: Sequence[tuple[torch.Tensor, torch.Tensor]],
            block_tokens: int, rtol: float, atol: float) -> list[tuple[int, int, str, float, float]]:
    """Per layer (k, v) pairs of [tokens, kv_heads, head_dim] each: (block, layer, part, error,
    bound) of the first failing layer/part of every block that fails, in block order."""
    failed: dict[int, tuple[int, int, str, float, float]] = {}
    for layer, (got, want) in enumerate(zip(loaded, recomputed)):
        for part, x, y in (("k", got[0], want[0]), ("v", got[1], want[1])):
            n = y.shape[0] // block_tokens
            y = y[:n * block_tokens].float().reshape(n, block_tokens, *y.shape[1:])
            x = x[:n * block_tokens].to(y.device).float().reshape(n, block_tokens, *x.shape[1:])
            error = (x - y).abs().amax(dim=(1, 3))  # [blocks, heads]
            bound = atol + rtol * y.abs().amax(dim=(0, 1, 3))  # [heads]
            bad = ~(error <= bound)  # NaN fails
            for block in bad.any(dim=1).nonzero().flatten().tolist():
                if block not in failed:
                    head = int(bad[block].nonzero()[0])
                    failed[block] = (block, layer, part, float(error[block, head]), float(bound[head]))
    return [failed[b] for b in sorted(failed)]


class Verifier:
    """Per process: the sampling state, the quarantine and the counters. Thread-safe."""

    def __init__(self, settings: VerifySettings | dict | None = None) -> None:
        if isinstance(settings, dict):
            settings = VerifySettings(**settings)
        self.settings = settings or VerifySettings()
        self._rng = random.Random(self.settings.seed)
        self._lock = threading.Lock()
        self._seen: Counter[Source] = Counter()  # loads per source
        self.quarantined: dict[Source, dict] = {}
        self.counters = Counter()
        self._controller = None

    # -- before the engine uses a load -----------------------------------------------------

    def admit(self, client, loaded: Loaded) -> Admission:
        """Cuts the load before the first block from a quarantined source (a miss: the engine
        computes from there), counts the load against its sources, and decides on a check."""
        n = loaded.num_blocks
        if n == 0:
            return Admission(loaded, [], False, 0)
        cut, sources, verify = self.admit_blocks(n, lambda: self._sources(client, loaded))
        if cut < n:
            loaded = Loaded(loaded.layout, loaded.keys, loaded.blocks[:cut], loaded.sources)
        return Admission(loaded, sources, verify, n - cut)

    def admit_blocks(self, n: int, sources: "Callable[[], list[Source]]") -> tuple[int, list[Source], bool]:
        """The decision of `admit` for a load of n blocks whose sources (one per block) `sources()`
        names; it is called only when sampling or the quarantine needs it (one controller call).
        Returns (usable blocks before the first from a quarantined source, their sources, check)."""
        if n == 0:
            return 0, [], False
        s = self.settings
        with self._lock:
            sampled = s.fraction > 0 and self._rng.random() < s.fraction
            need_sources = sampled or s.first_n > 0 or bool(self.quarantined)
        # One controller call per load (not per block), skipped when nothing depends on it.
        srcs = sources() if need_sources else []
        with self._lock:
            cut = next((j for j, src in enumerate(srcs) if src in self.quarantined), n)
            fresh = any(self._seen[src] < s.first_n for src in set(srcs[:cut]))
            self._seen.update(set(srcs[:cut]))
            self.counters["loads"] += 1
            self.counters["quarantine_skipped_blocks"] += n - cut
        if cut < n:
            log.warning("verify: %d of %d loaded blocks come from quarantined %s on; recomputing them", n - cut, n,
                        srcs[cut])
        return cut, srcs[:cut], cut > 0 and (sampled or fresh)

    def _sources(self, client, loaded: Loaded) -> list[Source]:
        n = loaded.num_blocks
        where = client.where(loaded.keys[:n])
        out = []
        for j in range(n):
            node = loaded.sources[j][0] if j < len(loaded.sources) and loaded.sources[j] else "?"
            media = dict(where[j]) if j < len(where) else {}
            # The medium it was held in on the node it came from; "?" if the index does not
            # (yet) say, e.g. a copy cached here by this very load whose commit is in flight.
            out.append((node, media.get(node, "?")))
        return out

    # -- after the engine recomputed the prefix --------------------------------------------

    def check(self, client, admission: Admission, recomputed: Sequence[tuple[torch.Tensor, torch.Tensor]],
              seconds: float = 0.0) -> CheckResult:
        """Compares the loaded KV with the recomputed one ([tokens, kv_heads, head_dim] per layer)
        and acts on a mismatch: delete, quarantine, count, log, report."""
        loaded = admission.loaded
        lay = loaded.layout
        failed = compare([loaded.layer(i) for i in range(lay.num_layers)], recomputed, lay.block_tokens,
                         self.settings.rtol_for(lay.dtype), self.settings.atol)
        return self.record(client, loaded.keys[:loaded.num_blocks], admission.sources, failed, lay, seconds)

    def record(self, client, keys: Sequence[bytes], sources: Sequence[Source],
               failed: Sequence[tuple[int, int, str, float, float]], layout, seconds: float = 0.0) -> CheckResult:
        """Acts on a finished check of the blocks `keys` (read from `sources`, one per key; empty:
        unknown) whose `compare` found `failed`: deletes the failed blocks, quarantines their
        sources, counts, logs and reports (every check, passed or not, goes to the controller)."""
        lay = layout
        rtol = self.settings.rtol_for(lay.dtype)
        sources = list(sources) or [("?", "?")] * len(keys)
        mismatches = [Mismatch(b, keys[b], sources[b], layer, part, err, bound)
                      for b, layer, part, err, bound in failed]
        bad_sources = {m.source for m in mismatches}
        with self._lock:
            self.counters["checks"] += 1
            self.counters["checked_blocks"] += len(keys)
            self.counters["recompute_seconds"] += seconds
            if mismatches:
                self.counters["mismatches"] += 1
                self.counters["mismatched_blocks"] += len(mismatches)
                for src in bad_sources:
                    self.quarantined.setdefault(src, {"since": time.time(), "blocks": 0})
                    self.quarantined[src]["blocks"] += sum(m.source == src for m in mismatches)
        if mismatches:
            versions = _versions()
            for m in mismatches:
                log.error("verify: block %s (#%d) from node %s medium %s does not match its recompute: layer %d %s "
                          "max|diff| %.3g > bound %.3g (rtol %g, dtype %s, model %s, %s); deleting it, "
                          "quarantining the source", m.key.hex(), m.block, m.source[0], m.source[1], m.layer, m.part,
                          m.error, m.bound, rtol, lay.dtype, lay.model_id, versions)
            self._delete(client, [m.key for m in mismatches])
        self._report(client, sources, mismatches, lay)
        return CheckResult(not mismatches, mismatches, seconds)

    def quarantine(self, source: Source, blocks: int = 0) -> None:
        """Quarantines a source another process's check found wrong (e.g. a vLLM worker's, for its
        scheduler): new loads from it are cut like this process's own finds."""
        with self._lock:
            entry = self.quarantined.setdefault(tuple(source), {"since": time.time(), "blocks": 0})
            entry["blocks"] += blocks

    def _delete(self, client, keys: list[bytes]) -> None:
        try:
            if hasattr(client, "flush"):
                client.flush()  # a copy this load cached here must be indexed, so the delete reaches it
            if hasattr(client, "sync"):
                client.sync()  # ... and the index must have it (puts reach it with the next event batch)
            deleted = client.delete(keys)
            log.warning("verify: deleted %d copies of %d mismatched blocks", deleted, len(keys))
        except Exception as e:  # the engine still goes on with the recomputed KV
            log.error("verify: deleting mismatched blocks failed: %s", e)

    def _report(self, client, sources: list[Source], mismatches: list[Mismatch], layout) -> None:
        per: dict[Source, dict] = {}
        for src in sources:
            entry = per.setdefault(src, {"node_id": src[0], "medium": src[1], "checks": 1, "mismatches": 0,
                                         "blocks": 0, "keys": []})
            entry["blocks"] += 1
        for m in mismatches:
            entry = per[m.source]
            entry["mismatches"] = 1
            entry["keys"].append(m.key.hex())
        if mismatches:
            for entry in per.values():
                entry["detail"] = f"model {layout.model_id} dtype {layout.dtype}; reporter {_versions()}"
        try:
            reporter = getattr(client, "node_id", "?")
            if hasattr(client, "report_verification"):
                client.report_verification(reporter, list(per.values()))
                return
            import ray

            from kvstore.cluster.node import CONTROLLER_NAME

            if self._controller is None:
                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=client.config.ray_namespace)
            ray.get(self._controller.report_verification.remote(reporter, list(per.values())), timeout=10)
        except Exception as e:  # counted here anyway; the controller's view is for operators
            self._controller = None
            log.warning("verify: could not report to the controller: %s", e)

    def stats(self) -> dict:
        with self._lock:
            return {**{k: self.counters.get(k, 0) for k in ("loads", "checks", "checked_blocks", "mismatches",
                                                             "mismatched_blocks", "quarantine_skipped_blocks",
                                                             "recompute_seconds")},
                    "quarantined": [{"node_id": n, "medium": m, **info} for (n, m), info in self.quarantined.items()],
                    "settings": dataclasses.asdict(self.settings)}


def _versions() -> str:
    import kvstore

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "-"
    engine = sys.modules.get("vllm")  # the vLLM connector's checks name the engine's version too
    vllm = f", vllm {engine.__version__}" if getattr(engine, "__version__", None) else ""
    return f"kvstore {kvstore.__version__}, torch {torch.__version__}, transformers {tf}{vllm}"


_default: Verifier | None = None
_default_lock = threading.Lock()


def verifier(verify: "Verifier | VerifySettings | dict | None" = None) -> Verifier:
    """A Verifier from what a caller gave: itself, settings (a new one), or None: this process's
    shared one with the default settings (so its quarantine covers every load here)."""
    global _default
    if isinstance(verify, Verifier):
        return verify
    if verify is not None:
        return Verifier(verify)
    with _default_lock:
        if _default is None:
            _default = Verifier()
        return _default
