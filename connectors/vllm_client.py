"""Which kvstore cluster the vLLM connector joins, and the one client per process its sides share.

An engine's core and workers are often processes Ray did not start (vLLM spawns them), where
`kvstore.connect(None)` would quietly start a kvstore of their own that no other engine shares:
the connector never does that unasked (`join_address`). An engine outside any Ray cluster gives
the HTTP service's `kvstore://HOST:PORT` (or `kvstores://`) address and a token file instead: its
processes then use the remote client (cluster/remote.py) and never import Ray.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import kvstore
from kvstore.errors import KVStoreError

if TYPE_CHECKING:
    from kvstore.connectors.vllm_settings import Settings

EMBEDDED = "embedded"  # kvstore_address asking for a kvstore private to this process (tests, demos)

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client(settings: "Settings"):
    """One kvstore client per process and address (the scheduler and a worker may share a process).
    Raises KVStoreError, naming what to set, where there is no kvstore cluster to join."""
    key = (settings.address, settings.token_file)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            overrides = {"auth_token_file": settings.token_file} if settings.token_file else {}
            client = _CLIENTS[key] = kvstore.connect(join_address(settings.address), **overrides)
        return client


def join_address(address: str) -> str | None:
    """The address the connector's client joins (None: this process's own Ray cluster, or with
    EMBEDDED a private one): the setting (a Ray address, or a kvstore:// URL), else the Ray
    cluster this process is in, else RAY_ADDRESS, else the cluster of the Ray worker that spawned
    this process. Raises KVStoreError, naming what to set, when there is nothing to join."""
    if address == EMBEDDED:
        return None
    if address:
        return address
    import ray  # only to find a Ray cluster: a kvstore:// address needs no Ray in the engine

    if ray.is_initialized():
        return None
    found = os.environ.get("RAY_ADDRESS") or _spawners_cluster()
    if not found:
        raise KVStoreError(
            "the kvstore connector has no kvstore cluster to join: this process is in no Ray cluster, RAY_ADDRESS "
            "is unset and no Ray worker spawned it; set kv_connector_extra_config.kvstore_address to the cluster's "
            "Ray address (or RAY_ADDRESS), or to its HTTP service's kvstore://HOST:PORT with kvstore_token_file "
            f"(no Ray in the engine), or run the engine inside it ({EMBEDDED!r} starts a private one: tests and "
            "demos only)")
    return found


def _spawners_cluster() -> str | None:
    """The GCS address of the Ray cluster whose worker spawned this process: Ray's workers carry
    RAY_RAYLET_PID, which the processes they start inherit, and the raylet's command line names
    its GCS."""
    pid = os.environ.get("RAY_RAYLET_PID", "")
    try:
        args = open(f"/proc/{int(pid)}/cmdline", "rb").read().split(b"\0")
    except (ValueError, OSError):
        return None
    return next((a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"--gcs-address=")), None)
