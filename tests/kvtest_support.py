"""Shared helpers and fixtures of the single-node core tests (not collected: no test_ prefix).

Test modules import the fixtures they use by name (`from kvtest_support import make_store`),
so this file is no conftest.py and cannot clash with other suites' conftests.

Sizes are tiny on purpose: a 2 KiB block (2 layers x K|V x 16 tokens x 2 heads x 8 dims, fp16)
in slots of 4 KiB stride, tiers of a handful of slots, so eviction, demotion and promotion
happen within a few puts.
"""
from __future__ import annotations

import glob
import hashlib
import os
import time
import uuid
from typing import Iterable

import pytest
import torch

from kvstore.integrity import ReadVerifier
from kvstore.layout import Layout
from kvstore.store import TieredStore
from kvstore.tiers.base import round_up
from kvstore.tiers.hbm import HBMTier
from kvstore.tiers.host import SHM_DIR, HostTier
from kvstore.tiers.nvme import NVMeTier, file_bytes as nvme_file_bytes

LAYOUT = Layout("test/model@r1", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
NBYTES = LAYOUT.block_nbytes  # 2048
SLOT = NBYTES
SHM_PREFIX = "kvtest"


def wait_for(predicate, timeout_s: float, what: str):
    """Polls predicate until it returns something truthy (returned), or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def shm_name(tag: str = "") -> str:
    """A shared-memory name no other process or test uses."""
    return f"{SHM_PREFIX}-{os.getpid()}-{tag}{uuid.uuid4().hex[:12]}"


def mem_capacity(slots: int, slot_nbytes: int = SLOT) -> int:
    return slots * round_up(slot_nbytes)


def nvme_capacity(slots: int, slot_nbytes: int = SLOT) -> int:
    return nvme_file_bytes(slots, slot_nbytes)


def rand_key() -> bytes:
    return os.urandom(16)


def payload(key: bytes, version: int = 0, nbytes: int = NBYTES) -> torch.Tensor:
    """Bytes that name their key and version: any mix-up between blocks shows in a compare."""
    seed = hashlib.blake2b(key + version.to_bytes(8, "little"), digest_size=64).digest()
    reps = -(-nbytes // len(seed))
    return torch.frombuffer(bytearray((seed * reps)[:nbytes]), dtype=torch.uint8)


def batch(keys: Iterable[bytes], version: int = 0) -> torch.Tensor:
    rows = [payload(k, version) for k in keys]
    return torch.stack(rows) if rows else torch.empty((0, NBYTES), dtype=torch.uint8)


def empty_out(n: int) -> torch.Tensor:
    return torch.full((n, NBYTES), 0xAB, dtype=torch.uint8)


def used_slots(store: TieredStore) -> int:
    return sum(t["used_slots"] for t in store.stats()["tiers"])


def assert_consistent(store: TieredStore) -> None:
    """Quiescent invariants: every block owns one slot, no tier over capacity."""
    stats = store.stats()
    for t in stats["tiers"]:
        assert 0 <= t["used_slots"] <= t["slots"], t
    assert sum(t["used_slots"] for t in stats["tiers"]) == stats["blocks"], stats


class StoreFactory:
    """Builds stores out of small tiers and closes every one of them at teardown."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self._tiers: list = []
        self._count = 0

    def tiers(self, spec: Iterable[str] = ("host",), *, hbm_slots: int = 4, host_slots: int = 8,
              nvme_slots: int = 16, nvme_dir=None, slot_nbytes: int = SLOT, direct_io: bool = True,
              io_threads: int = 2) -> list:
        out = []
        for kind in spec:
            if kind == "hbm":
                out.append(HBMTier(slot_nbytes, mem_capacity(hbm_slots, slot_nbytes), device="cpu"))
            elif kind == "host":
                out.append(HostTier(shm_name(), slot_nbytes, mem_capacity(host_slots, slot_nbytes)))
            elif kind == "nvme":
                directory = nvme_dir or (self.tmp_path / f"nvme{self._count}")
                self._count += 1
                out.append(NVMeTier(str(directory), slot_nbytes, nvme_capacity(nvme_slots, slot_nbytes),
                                    io_threads=io_threads, direct_io=direct_io))
            else:
                raise AssertionError(kind)
        self._tiers.extend(out)
        return out

    def __call__(self, spec: Iterable[str] = ("host",), *, listener=None, policy: str = "lru",
                 prefix_aware: bool = True, promote_on_hit: bool = True, verify_reads: str = "sampled",
                 fence_grace_s: float = 10.0, quota_of=None, **tier_kw) -> TieredStore:
        return TieredStore(self.tiers(spec, **tier_kw), listener=listener, policy=policy,
                           prefix_aware=prefix_aware, promote_on_hit=promote_on_hit,
                           verifier=ReadVerifier(verify_reads), fence_grace_s=fence_grace_s, quota_of=quota_of)

    def close(self) -> None:
        """Closes every tier, even when one fails to close (the first failure is raised)."""
        tiers, self._tiers = self._tiers, []
        errors = []
        for tier in tiers:
            try:
                tier.close()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]


def leftover_arenas(remove: bool = False) -> list[str]:
    """This process's test arenas still in /dev/shm (removed as well when asked)."""
    found = glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}-{os.getpid()}-*"))
    if remove:
        for path in found:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return found


@pytest.fixture
def make_store(tmp_path):
    factory = StoreFactory(tmp_path)
    yield factory
    factory.close()
    left = leftover_arenas(remove=True)
    assert not left, f"host arenas left in {SHM_DIR}: {left}"


class EventLog:
    """A store listener that keeps every event and, per key, the medium it is in now."""

    def __init__(self) -> None:
        self.events: list = []
        self.where: dict[bytes, str] = {}

    def __call__(self, events) -> None:
        from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored

        for e in events:
            self.events.append(e)
            if isinstance(e, BlockStored):
                for k in e.block_hashes:
                    assert k not in self.where, f"BlockStored for {k.hex()} on {e.medium} while on {self.where[k]}"
                    self.where[k] = e.medium
            elif isinstance(e, BlockRemoved):
                for k in e.block_hashes:
                    assert self.where.get(k) == e.medium, (
                        f"BlockRemoved for {k.hex()} from {e.medium}, but it is on {self.where.get(k)}")
                    del self.where[k]
            elif isinstance(e, AllBlocksCleared):
                self.where.clear()

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def http_call(url: str, body=None, token: str | None = None) -> tuple[int | None, str]:
    """(status, text) of a GET (or a POST of `body`: JSON, or bytes as they are) with a Bearer
    token; (None, "") if nothing listens there yet."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def http_service(backend, credentials):
    """The HTTP service over `backend` on a loopback port, in a thread: yields its base URL
    (a generator for a fixture to `yield from`)."""
    import asyncio
    import socket
    import threading

    from kvstore.service import Service, serve

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete,
                              args=(serve(Service(backend, credentials), "127.0.0.2", port, stop),), daemon=True)
    thread.start()
    base = f"http://127.0.0.2:{port}"
    wait_for(lambda: http_call(base + "/healthz")[0] == 200, 10, "the HTTP service")
    yield base
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=10)


# Prepended to a `python -c` program: makes Ray unimportable in that process, as in an engine
# outside Ray (an ImportError for `ray` and every `ray.*`, whether installed or not).
NO_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not importable in this process (test)")
sys.meta_path.insert(0, NoRay())
"""
