"""The prefill/decode handoff: how one worker's KV reaches another through the store.

Prefill side (producer), per request:

    session = SaveSession(client, layout, token_ids, namespace)
    for each layer i as the model finishes it:  session.save_layer(i, k_i, v_i)
    handle = session.finish()          # commits, leases, returns what the decode side needs

`save_layer` queues the copy of layer i into the request's reserved arena slots on a worker
thread and returns at once, so the copy overlaps the computation of layer i+1. Blocks already
in the store (a shared prefix) are not written again. The reservation is a hold with a TTL: a
long prefill renews it as it goes, and every copy first checks that the hold was not fenced (had
it expired, its slots may already hold other blocks; `finish` then raises LeaseError and nothing
of the request becomes visible).

Decode side (consumer):

    loaded = load(client, handle)      # or load(client, token_ids=..., layout=..., namespace=...)
    loaded.num_tokens                  # the prefix it may use; everything after is recomputed
    k_i, v_i = loaded.layer(i)         # [num_tokens, kv_heads, head_dim] each

or layer by layer while the blocks arrive (they come layer-major), so building the engine's cache
overlaps the transfer:

    loading = start_load(client, handle)
    k_i, v_i = loading.layer(i)        # as soon as layer i of every block is here, unchecked
    loaded = loading.result()          # checked: use only loaded.num_tokens of what layer() gave

Only the leading run of blocks that arrived whole is usable: a block missing (evicted, its node
dead, its lease expired) ends the usable prefix there, and `loaded.missing` names every block
from that point on, so the engine recomputes exactly those tokens. A decode never runs on wrong
or partial data. Loading releases the handle's lease (the blocks stay cached, now unpinned).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from kvstore.cluster.pulled import Landing
from kvstore.errors import KVStoreError, LeaseError, PayloadError
from kvstore.keys import block_keys, chain_parents, check_keys
from kvstore.layout import Layout

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Handle:
    """What a prefill worker gives a decode worker (JSON-safe via to_dict/from_dict)."""

    namespace: str
    layout: Layout
    keys: list[bytes]
    num_tokens: int  # tokens the blocks cover: full blocks only
    node_id: str  # where they were saved
    lease_id: str | None  # pins them there until loaded or expired

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "layout": self.layout.to_dict(), "keys": [k.hex() for k in self.keys],
                "num_tokens": self.num_tokens, "node_id": self.node_id, "lease_id": self.lease_id}

    @classmethod
    def from_dict(cls, data: dict) -> "Handle":
        try:
            keys = check_keys([bytes.fromhex(k) for k in data["keys"]])
            layout = Layout.from_dict(data["layout"])
            handle = cls(str(data["namespace"]), layout, keys, int(data["num_tokens"]), str(data["node_id"]),
                         None if data.get("lease_id") is None else str(data["lease_id"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KVStoreError(f"not a kvstore handoff handle: {e}") from None
        if handle.num_tokens != len(keys) * layout.block_tokens:
            raise KVStoreError(f"handle covers {handle.num_tokens} tokens but names {len(keys)} blocks "
                               f"of {layout.block_tokens}")
        return handle


class SaveSession:
    """The producer side of one request: fills reserved blocks layer by layer, in the background."""

    def __init__(self, client, layout: Layout, token_ids: Sequence[int], namespace: str = "default") -> None:
        self.client = client
        self.layout = layout
        self.namespace = namespace
        self.keys = block_keys(token_ids, layout, namespace)
        self.num_tokens = len(self.keys) * layout.block_tokens
        self.hold = client.reserve(layout, self.keys, chain_parents(self.keys))
        self._renewed = time.monotonic()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-save")
        self._pending: list[Future] = []
        self._saved: set[int] = set()

    def save_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queues layer `layer`'s keys and values, [tokens, kv_heads, head_dim] each (at least
        num_tokens tokens; a partial tail block is not stored). The tensors must not change
        until `finish`: the copy runs while the caller computes the next layer."""
        lay = self.layout
        want = (lay.num_kv_heads, lay.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or tuple(t.shape[1:]) != want or t.shape[0] < self.num_tokens:
                raise PayloadError(f"layer {layer} {name} has shape {tuple(t.shape)}; need "
                                   f"[>= {self.num_tokens}, {want[0]}, {want[1]}]")
            if t.dtype != lay.torch_dtype:
                raise PayloadError(f"layer {layer} {name} has dtype {t.dtype}; the layout says {lay.dtype}")
        if not 0 <= layer < lay.num_layers or layer in self._saved:
            raise PayloadError(f"layer={layer} is out of range [0, {lay.num_layers}) or saved twice")
        self._saved.add(layer)
        if any(view is not None for view in self.hold.views):
            self._keep_hold()
            self._pending.append(self._writer.submit(self._copy_layer, layer, k, v))

    def _keep_hold(self) -> None:
        """Renews the hold once a third of its TTL has passed, so a long prefill keeps its slots."""
        if time.monotonic() - self._renewed > self.client.config.lease_ttl_s / 3:
            self.client.renew(self.hold)
            self._renewed = time.monotonic()

    def _copy_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        lay = self.layout
        T, L = lay.block_tokens, lay.layer_nbytes
        k = k[:self.num_tokens].to("cpu", non_blocking=False)
        v = v[:self.num_tokens].to("cpu", non_blocking=False)
        self.client.check_hold(self.hold)  # the copy below ends well within the fence's grace
        for j, view in enumerate(self.hold.views):
            if view is None:
                continue
            part = view[layer * L:(layer + 1) * L].view(lay.torch_dtype).view(2, T, lay.num_kv_heads, lay.head_dim)
            part[0].copy_(k[j * T:(j + 1) * T])
            part[1].copy_(v[j * T:(j + 1) * T])

    def finish(self, lease_ttl_s: float | None = None) -> Handle:
        """Waits for the copies, makes the blocks visible, and leases them for the decode side."""
        try:
            for future in self._pending:
                future.result()
            if len(self._saved) != self.layout.num_layers:
                missing = sorted(set(range(self.layout.num_layers)) - self._saved)
                raise PayloadError(f"finish before layers {missing} were saved")
        except BaseException:
            self.abort()
            raise
        self._writer.shutdown()
        # Visible in the index before this returns (the decode side may look them up at once),
        # and leased for it, in one call to this node.
        lease_id = None
        if self.keys:
            lease_id = self.client.commit_leased(self.layout, self.hold, lease_ttl_s)[1].lease_id
        else:
            self.client.abort(self.hold)
        return Handle(self.namespace, self.layout, list(self.keys), self.num_tokens, self.client.node_id, lease_id)

    def abort(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        try:
            self.client.abort(self.hold)
        except LeaseError as e:  # it expired: the node gave its slots back already
            log.info("%s", e)


@dataclasses.dataclass
class Loaded:
    """What the decode side got: a usable prefix, and precisely what it must recompute."""

    layout: Layout
    keys: list[bytes]
    blocks: torch.Tensor  # [usable blocks, block_nbytes] uint8
    sources: list[tuple[str, str] | None]  # per key: (node, "local"/"remote") or None

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.layout.block_tokens

    @property
    def missing(self) -> list[bytes]:
        """Every block past the usable prefix (even ones that arrived: they follow a gap)."""
        return self.keys[self.num_blocks:]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values over the usable prefix: [num_tokens, kv_heads, head_dim] each."""
        return _layer(self.layout, self.blocks, i)


def _layer(layout: Layout, blocks: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's keys and values of `blocks` (uint8 rows): [blocks x block_tokens, kv_heads, head_dim] each."""
    size = layout.layer_nbytes
    parts = blocks[:, i * size:(i + 1) * size].contiguous().view(layout.torch_dtype)
    parts = parts.view(blocks.shape[0], 2, layout.block_tokens, layout.num_kv_heads, layout.head_dim)
    tokens = blocks.shape[0] * layout.block_tokens
    return (parts[:, 0].reshape(tokens, layout.num_kv_heads, layout.head_dim),
            parts[:, 1].reshape(tokens, layout.num_kv_heads, layout.head_dim))


class Loading:
    """A load in flight (start_load): its blocks arrive layer-major in the background."""

    def __init__(self, layout: Layout, keys: list[bytes], out: torch.Tensor, landing: Landing | None) -> None:
        self.layout = layout
        self.keys = keys
        self.seconds = 0.0  # how long the pull took, once it is over
        self._out = out
        self._landing = landing
        self._result: Future = Future()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values over every block asked for, [len(keys) x block_tokens,
        kv_heads, head_dim] each, as soon as layer i of every block is here (or the load is
        over). Not yet checked, and a block may be missing: only the first
        `result().num_tokens` tokens may be used, once `result()` has returned."""
        if self._landing is not None:
            self._landing.wait_layer(i)
        return _layer(self.layout, self._out, i)

    def result(self) -> Loaded:
        """Waits for the whole load: what arrived whole and right, as `load` returns it."""
        return self._result.result()


_LOADS = ThreadPoolExecutor(4, thread_name_prefix="kvstore-load")  # the pulls of start_load


def load(client, handle: Handle | None = None, *, token_ids: Sequence[int] | None = None,
         layout: Layout | None = None, namespace: str = "default", max_tokens: int | None = None) -> Loaded:
    """Loads a handle's blocks, or the longest stored prefix of `token_ids`, from anywhere in the
    cluster. `max_tokens` caps the prefix (an engine must compute at least one prompt token).

    A handle's blocks are not cached on this node (whatever `cache_pulled_blocks` says): the
    decode side of a handoff does not prefill, so a local copy would cost a copy and a slot on
    the TTFT path and serve no one. A prefix load follows the setting (the next request with
    that prefix may come here)."""
    return start_load(client, handle, token_ids=token_ids, layout=layout, namespace=namespace,
                      max_tokens=max_tokens).result()


def start_load(client, handle: Handle | None = None, *, token_ids: Sequence[int] | None = None,
               layout: Layout | None = None, namespace: str = "default", max_tokens: int | None = None) -> Loading:
    """`load`, returning as soon as the pull has started: the blocks arrive layer-major, and
    `Loading.layer(i)` gives layer i while later layers are still on the way."""
    if handle is not None:
        keys, layout = handle.keys, handle.layout
    elif token_ids is not None and layout is not None:
        keys = block_keys(token_ids, layout, namespace)
        keys = keys[:client.longest_prefix(keys)]
    else:
        raise KVStoreError("load needs a handle, or token_ids with a layout")
    if max_tokens is not None:
        keys = keys[:max(0, max_tokens) // layout.block_tokens]
    keys = list(keys)
    out = torch.empty((len(keys), layout.block_nbytes), dtype=torch.uint8)
    # A handle's blocks are pulled from its node without a lookup, and the pull ends its lease.
    owner, lease = (handle.node_id, handle.lease_id) if handle is not None else (None, None)
    loading = Loading(layout, keys, out, Landing(keys, layout.layer_nbytes, layout.num_layers) if keys else None)
    if not keys:
        if lease is not None:
            try:
                client.release_lease(lease)
            except Exception as e:  # LeaseError (expired already), or its node is gone: nothing is pinned
                log.info("lease %s: %s", lease, e)
        loading._result.set_result(Loaded(layout, keys, out, []))
        return loading
    cache = False if handle is not None else None
    started = time.perf_counter()

    def pull() -> Loaded:
        result = client.get(layout, keys, out, cache=cache, owner=owner, lease=lease, landing=loading._landing)
        loading.seconds = time.perf_counter() - started
        found = result.found
        usable = next((i for i, ok in enumerate(found) if not ok), len(found))
        if usable < len(keys):
            log.info("loaded %d of %d blocks; %d tokens from block %d on are recomputed", usable, len(keys),
                     (len(keys) - usable) * layout.block_tokens, usable)
        return Loaded(layout, keys, out[:usable], result.sources)

    loading._result = _LOADS.submit(pull)
    return loading
