"""kvstore against its peers (Redis, Mooncake Store, LMCache), on the same blocks, in one run.

    bash scripts/peers-env.sh                                # the peers, each in .venv-peers-* (idempotent)
    python -m bench.peers --json bench-results/peers.json    # ~4-6 min

Every system gets the same blocks (64 KiB, 2 MiB, 32 MiB; the bytes of every get are checked)
and every figure is also given as a ratio to one raw TCP stream measured in the same rounds
(bench.common.TcpBound: a sender process, this process receiving into a touched buffer).

- cross-node batch get: 64 blocks (32 MiB: --blocks-32m, 16 by default, see below) written by one
  process and read by another into a preallocated buffer.
  kvstore: a two-node RayTestCluster; a writer actor on node B puts the blocks, this driver on
  node A gets them (over Arrow Flight); A's cached copies are deleted before each round, as in
  bench.cluster. The cluster's slot_bytes is the block size (kvstore's controller and node
  actors are restarted per size, Ray is not).
  Peers: the server (or master) in one process, a writer client and a reader client in two
  more; for Mooncake the writer's segment holds the blocks (preferred_segment), the reader
  mounts none, so a get moves them between the two clients.
- same-node batch get: kvstore: blocks already in A's shared-memory arena (the last cross-node
  get cached them). Peers: the writer process reading back what it wrote (Redis: over loopback
  from the server; Mooncake: from its own segment; LMCache: its LocalCPUBackend hot cache).
- single-block get latency p50/p99 (64 KiB and 2 MiB), cross-node and same-node likewise, each
  get verified; the TCP bound is one request/response of the block's size on a warm connection.
- kvstore's transport floor: its cross-node batches and 64 KiB / 2 MiB gets also over one bare
  pyarrow Flight session from B's address (bench.common.FlightBound, no kvstore code), in the
  same rounds: `flight_floor_gbps_*`, `kv_vs_flight_floor_*`, `flight_floor_get_p50_us_64k`.

32 MiB blocks: 64 of them are 2 GiB per batch, resident several times over per system (the
writer's source, the store, the reader's buffer, kvstore's cached copy, the TCP bound's buffers)
on a 24 GiB machine shared with other work, so by default a 32 MiB batch is 16 blocks (512 MiB);
`--blocks-32m 64` runs the full batch. The JSON says which was used.

Peers run from their own virtual environments (.venv-peers-redis, -mooncake, -lmcache, made by
scripts/peers-env.sh), as worker processes of this module driven over a pipe. A peer that is not
installed or does not start is reported as such, with the reason, and the run goes on.
Mooncake's transfer engine listens on 0.0.0.0 and [::] whatever it is told, so its master and
clients run in a private network namespace (`unshare -rn`, only loopback, brought up by us). The
run checks every process it started (and their children) for sockets listening beyond
127.0.0.0/8 or ::1: a peer found listening beyond loopback outside such a namespace is stopped
and reported; what kvstore's Ray cluster listens on is reported (Ray binds some of its gRPC
servers on every interface).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

KiB, MiB = 1024, 1024**2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (block bytes, layers, tokens per block) for a Llama-3-8B-like layout (8 KV heads x 128, fp16)
SIZES = {"64k": (64 * KiB, 1, 16), "2m": (2 * MiB, 32, 16), "32m": (32 * MiB, 32, 256)}
LATENCY_SIZES = ("64k", "2m")
BATCH = 64
PEERS = ("redis", "mooncake", "lmcache")
VENVS = {name: os.path.join(ROOT, f".venv-peers-{name}") for name in PEERS}
SPREAD = 64 * KiB  # blocks are windows of one random buffer at different offsets, each with a header
MAGIC = b"KVPEERS\0"


class Blocks:
    """The benchmark's blocks of one size: deterministic from (seed, index), the same in every
    process and for every system. Block i is a 16-byte header (magic, seed, i) followed by a window
    of one random buffer starting at an offset that depends on i, so blocks all differ, need only
    one block's worth of memory to make or check, and a misplaced or stale block fails the check."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size = seed, size
        self.base = np.frombuffer(np.random.default_rng(seed).bytes(size + SPREAD), dtype=np.uint8)

    def header(self, i: int) -> np.ndarray:
        return np.frombuffer(MAGIC + struct.pack("<II", self.seed, i), dtype=np.uint8)

    def _body(self, i: int) -> np.ndarray:
        off = (i * 4099) % SPREAD
        return self.base[off:off + self.size - 16]

    def fill(self, row: np.ndarray, i: int) -> None:
        row[:16] = self.header(i)
        row[16:] = self._body(i)

    def check(self, row: np.ndarray, i: int) -> bool:
        return bool(np.array_equal(row[:16], self.header(i)) and np.array_equal(row[16:], self._body(i)))


def touched(count: int, size: int) -> np.ndarray:
    """A (count, size) uint8 buffer whose pages are all faulted in (fresh pages cost ~10x a copy here)."""
    buf = np.empty((count, size), dtype=np.uint8)
    buf.fill(0)
    return buf


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


# ==================================================================================================
# Worker side: runs in a peer's own virtual environment, so it imports only numpy, the standard
# library and that peer's client library (never kvstore, Ray or bench.common).
# ==================================================================================================

class RedisClient:
    def __init__(self, cfg: dict) -> None:
        import redis

        self.r = redis.Redis(host=cfg["host"], port=cfg["port"], socket_timeout=120)
        self.r.ping()

    def versions(self) -> dict:
        import hiredis
        import redis

        return {"server": self.r.info("server")["redis_version"], "redis-py": redis.__version__,
                "hiredis": hiredis.__version__, "parser": type(self.r.connection_pool.get_connection("PING")._parser).__name__}

    def register(self, buf: np.ndarray) -> None:
        pass

    def put(self, keys: list[str], rows) -> None:
        pipe = self.r.pipeline(transaction=False)
        for key, row in zip(keys, rows):
            pipe.set(key, memoryview(row))
        assert all(pipe.execute())

    def get(self, keys: list[str], rows) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        ok = []
        for value, row in zip(pipe.execute(), rows):
            if value is None or len(value) != len(row):
                ok.append(False)
                continue
            row[:] = np.frombuffer(value, dtype=np.uint8)
            ok.append(True)
        return ok

    def get_one(self, key: str, row) -> bool:
        value = self.r.get(key)
        if value is None or len(value) != len(row):
            return False
        row[:] = np.frombuffer(value, dtype=np.uint8)
        return True

    def exists(self, key: str) -> bool:
        return bool(self.r.exists(key))

    def remove(self, keys: list[str]) -> None:
        self.r.delete(*keys)

    def close(self) -> None:
        self.r.close()


class MooncakeClient:
    """Mooncake Store's Python client: zero-copy put/get from/into registered buffers."""

    def __init__(self, cfg: dict) -> None:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self.store = MooncakeDistributedStore()
        rc = self.store.setup("127.0.0.1", "P2PHANDSHAKE", cfg["segment_bytes"], cfg["local_buffer_bytes"],
                              "tcp", "", cfg["master"])
        if rc != 0:
            raise RuntimeError(f"mooncake setup returned {rc}")
        self.replicate = ReplicateConfig()
        self.replicate.replica_num = 1
        if cfg["segment_bytes"]:  # the writer: blocks stay in its own segment, like a kvstore node's
            self.replicate.preferred_segment = self.store.get_hostname()
        self.registered: list[np.ndarray] = []

    def versions(self) -> dict:
        import importlib.metadata as md

        return {"mooncake-transfer-engine-non-cuda": md.version("mooncake-transfer-engine-non-cuda"), "protocol": "tcp"}

    def register(self, buf: np.ndarray) -> None:
        rc = self.store.register_buffer(buf.ctypes.data, buf.nbytes)
        if rc != 0:
            raise RuntimeError(f"mooncake register_buffer returned {rc}")
        self.registered.append(buf)

    def unregister_all(self) -> None:
        for buf in self.registered:
            self.store.unregister_buffer(buf.ctypes.data)
        self.registered.clear()

    def put(self, keys: list[str], rows) -> None:
        rcs = self.store.batch_put_from(keys, [r.ctypes.data for r in rows], [r.nbytes for r in rows], self.replicate)
        bad = [rc for rc in rcs if rc != 0]
        if bad:
            raise RuntimeError(f"mooncake batch_put_from: {len(bad)} of {len(keys)} failed, e.g. {bad[0]}")

    def get(self, keys: list[str], rows) -> list[bool]:
        got = self.store.batch_get_into(keys, [r.ctypes.data for r in rows], [r.nbytes for r in rows])
        return [n == r.nbytes for n, r in zip(got, rows)]

    def get_one(self, key: str, row) -> bool:
        return self.store.get_into(key, row.ctypes.data, row.nbytes) == row.nbytes

    def exists(self, key: str) -> bool:
        return self.store.is_exist(key) == 1

    def remove(self, keys: list[str]) -> None:
        self.store.batch_remove(keys, True)

    def close(self) -> None:
        self.unregister_all()
        self.store.close()


class LMCacheClient:
    """LMCache's storage layer (StorageManager: LocalCPUBackend + RemoteBackend), with its remote
    connector `lm://HOST:PORT` to the standalone server. The writer keeps a local CPU hot cache
    (its same-node path); the reader has none, so its gets go to the server (location
    RemoteBackend)."""

    def __init__(self, cfg: dict) -> None:
        import logging

        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        logging.getLogger("lmcache").setLevel(logging.WARNING)
        torch.set_num_threads(1)
        self.torch = torch
        self.writer = cfg["role"] == "writer"
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=16, local_cpu=self.writer, max_local_cpu_size=cfg["local_cpu_gb"],
            remote_url=f"lm://{cfg['host']}:{cfg['port']}", remote_serde="naive",
            local_disk=None, max_local_disk_size=0)
        self.metadata = LMCacheMetadata(model_name="bench-peers", world_size=1, local_world_size=1, worker_id=0,
                                        local_worker_id=0, kv_dtype=torch.float16, kv_shape=(32, 2, 16, 8, 128),
                                        chunk_size=16)
        self.sm = StorageManager(self.config, self.metadata, EventManager())
        if "RemoteBackend" not in self.sm.storage_backends:
            raise RuntimeError(f"LMCache made no RemoteBackend (backends: {list(self.sm.storage_backends)})")
        self.remote = self.sm.storage_backends["RemoteBackend"]
        self.keymap: dict[str, object] = {}

    def versions(self) -> dict:
        import importlib.metadata as md

        return {"lmcache": md.version("lmcache"), "torch": self.torch.__version__, "connector": "lm://", "serde": "naive"}

    def key(self, name: str):
        from lmcache.utils import CacheEngineKey

        k = self.keymap.get(name)
        if k is None:
            h = int.from_bytes(__import__("hashlib").blake2b(name.encode(), digest_size=8).digest(), "little") >> 1
            k = self.keymap[name] = CacheEngineKey("bench-peers", 1, 0, h, self.torch.float16)
        return k

    def register(self, buf: np.ndarray) -> None:
        pass

    def _shape(self, nbytes: int):
        # MemoryFormat.KV_2LTD: [2, layers, tokens, hidden] fp16; hidden 1024 (8 KV heads x 128)
        per_token_layer = 2 * 1024 * 2
        layers = 32 if nbytes >= 32 * per_token_layer else 1
        return self.torch.Size([2, layers, nbytes // (per_token_layer * layers), 1024])

    def put(self, keys: list[str], rows) -> None:
        from lmcache.v1.memory_management import MemoryFormat

        objs = []
        for row in rows:
            obj = self.sm.allocate(self._shape(row.nbytes), self.torch.float16, MemoryFormat.KV_2LTD)
            if obj is None:
                raise RuntimeError("LMCache could not allocate a memory object (max_local_cpu_size too small)")
            obj.tensor.view(self.torch.uint8).view(-1).numpy()[:] = row
            objs.append(obj)
        self.sm.batched_put([self.key(k) for k in keys], objs)
        deadline = time.monotonic() + 120
        while self.remote.put_tasks:  # the remote puts are asynchronous; a put is done when they are
            if time.monotonic() > deadline:
                raise TimeoutError("LMCache's remote puts did not finish in 120 s")
            time.sleep(0.0005)

    def _copy_out(self, objs, rows) -> list[bool]:
        ok = []
        for obj, row in zip(objs, rows):
            if obj is None:
                ok.append(False)
                continue
            data = obj.tensor.view(self.torch.uint8).view(-1).numpy()
            good = data.nbytes == row.nbytes
            if good:
                row[:] = data
            obj.ref_count_down()
            ok.append(good)
        return ok

    def get(self, keys: list[str], rows) -> list[bool]:
        if self.writer:  # its hot cache
            return self._copy_out(self.sm.batched_get([self.key(k) for k in keys], location="LocalCPUBackend"), rows)
        # The remote backend itself: StorageManager.get would also write each block back into the
        # reader's LocalCPUBackend (even with local_cpu off, for single gets), filling its memory.
        return self._copy_out(self.remote.batched_get_blocking([self.key(k) for k in keys]), rows)

    def get_one(self, key: str, row) -> bool:
        if self.writer:
            return self._copy_out([self.sm.get(self.key(key), location="LocalCPUBackend")], [row])[0]
        return self._copy_out([self.remote.get_blocking(self.key(key))], [row])[0]

    def exists(self, key: str) -> bool:
        return bool(self.remote.contains(self.key(key)))

    def remove(self, keys: list[str]) -> None:
        # The lm:// server has no delete: its blocks stay until it stops (a few hundred MiB here).
        if self.writer:
            for k in keys:
                self.sm.storage_backends["LocalCPUBackend"].remove(self.key(k))

    def close(self) -> None:
        self.sm.close()


CLIENTS = {"redis": RedisClient, "mooncake": MooncakeClient, "lmcache": LMCacheClient}


def worker_main(kind: str, cfg: dict) -> None:
    """A writer or reader client of one peer, driven by JSON lines on stdin, answering on stdout.

    Library output is sent to stderr so the protocol channel stays clean. Every get is verified.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def answer(obj) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        client = CLIENTS[kind](cfg)
    except BaseException as e:
        answer({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        os._exit(1)
    answer({"ready": True, "versions": client.versions()})
    blocks = src = out = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                client.close()
                answer({"ok": True})
                break
            if op == "prepare":  # buffers and blocks for one size
                if hasattr(client, "unregister_all"):
                    client.unregister_all()
                blocks = src = out = None
                blocks = Blocks(cmd["seed"], cmd["size"])
                count = cmd["count"]
                out = touched(count, cmd["size"])
                client.register(out)
                if cfg["role"] == "writer":
                    src = touched(count, cmd["size"])
                    for i in range(count):
                        blocks.fill(src[i], i)
                    client.register(src)
                answer({"ok": True})
            elif op == "put":
                keys = [f"{cmd['prefix']}-{i}" for i in range(len(src))]
                start = time.perf_counter()
                client.put(keys, list(src))
                answer({"seconds": time.perf_counter() - start})
            elif op == "exists":
                answer({"exists": client.exists(f"{cmd['prefix']}-{cmd['index']}")})
            elif op == "get":
                keys = [f"{cmd['prefix']}-{i}" for i in range(len(out))]
                out[:, :16] = 0  # a get that writes nothing fails the check
                start = time.perf_counter()
                ok = client.get(keys, list(out))
                elapsed = time.perf_counter() - start
                bad = [i for i in range(len(out)) if not (ok[i] and blocks.check(out[i], i))]
                answer({"seconds": elapsed, "bad": bad})
            elif op == "latency":
                times, bad = [], []
                for n in range(cmd["samples"]):
                    i = n % len(out)
                    out[i, :16] = 0
                    start = time.perf_counter()
                    ok = client.get_one(f"{cmd['prefix']}-{i}", out[i])
                    times.append(time.perf_counter() - start)
                    if not (ok and blocks.check(out[i], i)):
                        bad.append(i)
                answer({"times": times, "bad": bad})
            elif op == "remove":
                client.remove([f"{cmd['prefix']}-{i}" for i in range(cmd["count"])])
                answer({"ok": True})
            else:
                answer({"error": f"unknown op {op!r}"})
        except BaseException as e:
            answer({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    channel.close()
    os._exit(0)  # some clients leave non-daemon threads behind


# ==================================================================================================
# Driver side (kvstore's .venv).
# ==================================================================================================

class PeerError(Exception):
    """A peer could not be installed, started or measured: reported, with the reason."""


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def free_port(ip: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, log: str, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"exited with {proc.returncode} before listening on {host}:{port}: {_tail(log, 600)}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise PeerError(f"nothing listened on {host}:{port} after {timeout_s} s")


class Worker:
    """A peer client process (this module's worker_main in the peer's venv), over a pipe."""

    def __init__(self, kind: str, role: str, cfg: dict, logdir: str, prefix: list[str] | None = None) -> None:
        self.name = f"{kind}-{role}"
        self.log = os.path.join(logdir, f"{self.name}.log")
        python = os.path.join(VENVS[kind], "bin", "python")
        args = (prefix or []) + [python, "-m", "bench.peers", "--worker", kind, "--config", json.dumps({**cfg, "role": role})]
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, start_new_session=True)
        hello = self._read(180)
        self.versions = hello["versions"]

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise PeerError(f"{self.name} gave no answer in {timeout_s} s; its log ends: {_tail(self.log, 600)}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise PeerError(f"{self.name} exited ({self.proc.returncode}); its log ends: {_tail(self.log, 800)}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{self.name}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def call(self, op: str, timeout_s: float = 300, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout_s=15)
            except Exception:
                pass
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 10) -> None:
    """Stops a process this module started (its own session: its children too), by pid."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=timeout_s)


# -- what the processes we started listen on ------------------------------------------------------

def _children(pids: set[int]) -> set[int]:
    """pids and all their descendants, now."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                parents[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(pids), set(pids)
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
        found |= frontier
    return {p for p in found if p in parents}


def _address(hexaddr: str) -> tuple[str, int]:
    import ipaddress

    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip).is_loopback


def listening_sockets(pids: set[int]) -> list[dict]:
    """Every TCP socket in LISTEN and every bound UDP socket held by these processes or their
    children: pid, command, protocol, address, port, network namespace, and whether that
    namespace has any interface besides loopback."""
    host_ns = os.readlink("/proc/self/ns/net")
    found = []
    for pid in sorted(_children(pids)):
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
            if not inodes:
                continue
            ns = os.readlink(f"/proc/{pid}/ns/net")
            with open(f"/proc/{pid}/net/dev") as f:
                ifaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            for proto in ("tcp", "tcp6", "udp", "udp6"):
                with open(f"/proc/{pid}/net/{proto}") as f:
                    rows = f.readlines()[1:]
                for row in rows:
                    cols = row.split()
                    if cols[9] not in inodes:
                        continue
                    if proto.startswith("tcp") and cols[3] != "0A":  # only listening TCP sockets
                        continue
                    if proto.startswith("udp") and cols[3] != "07":
                        continue
                    ip, port = _address(cols[1])
                    found.append({"pid": pid, "command": comm, "proto": proto, "address": ip, "port": port,
                                  "private_netns": ns != host_ns, "netns_interfaces": ifaces})
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def exposure(sockets: list[dict]) -> list[dict]:
    """Sockets reachable from beyond this machine's loopback: listening on a non-loopback address
    in a namespace that has an interface other than lo."""
    return [s for s in sockets if not _loopback(s["address"])
            and not (s["private_netns"] and set(s["netns_interfaces"]) <= {"lo"})]


# -- peers (driver side) ---------------------------------------------------------------------------

class Peer:
    name = ""

    def __init__(self, logdir: str, max_batch_bytes: int) -> None:
        self.logdir, self.max_batch_bytes = logdir, max_batch_bytes
        self.procs: list[subprocess.Popen] = []  # servers, namespace holder
        self.writer: Worker | None = None
        self.reader: Worker | None = None
        self.server_version = ""

    def check_installed(self) -> None:
        python = os.path.join(VENVS[self.name], "bin", "python")
        if not os.path.exists(os.path.join(VENVS[self.name], ".kvstore-peer-installed")) or not os.access(python, os.X_OK):
            raise PeerError(f"not installed: {VENVS[self.name]} is missing or incomplete (run `bash scripts/peers-env.sh {self.name}`)")

    def start(self) -> None:  # servers, then the two clients
        raise NotImplementedError

    def pids(self) -> set[int]:
        procs = self.procs + [w.proc for w in (self.writer, self.reader) if w is not None]
        return {p.pid for p in procs if p.poll() is None}

    def stop(self) -> None:
        for w in (self.reader, self.writer):
            if w is not None:
                w.stop()
        for p in reversed(self.procs):
            stop_process(p)

    def describe(self) -> dict:
        versions = dict(self.writer.versions) if self.writer else {}
        return {"name": self.name, "version": self.server_version, **versions}


class RedisPeer(Peer):
    name = "redis"

    def check_installed(self) -> None:
        super().check_installed()
        if shutil.which("redis-server") is None:
            raise PeerError("not installed: no redis-server on PATH (Debian's redis-server; run `bash scripts/peers-env.sh redis`)")

    def start(self) -> None:
        self.port = free_port()
        log = os.path.join(self.logdir, "redis-server.log")
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        self.server_version = out.stdout.strip()
        with open(log, "w") as f:
            proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                     "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no",
                                     "--dir", self.logdir],
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_port("127.0.0.1", self.port, proc, log)
        cfg = {"host": "127.0.0.1", "port": self.port}
        self.writer = Worker("redis", "writer", cfg, self.logdir)
        self.reader = Worker("redis", "reader", cfg, self.logdir)


class MooncakePeer(Peer):
    """Master and both clients inside one private network namespace that has only loopback."""

    name = "mooncake"

    def check_installed(self) -> None:
        super().check_installed()
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                raise PeerError(f"cannot contain it: no `{tool}` here (Mooncake's engine listens on 0.0.0.0, so it "
                                "runs only inside a private network namespace)")
        import ctypes.util

        if not ctypes.util.find_library("ibverbs"):
            raise PeerError("not installed: libibverbs1 is missing (Debian; needed even for TCP; run `bash scripts/peers-env.sh mooncake`)")

    def _namespace(self) -> list[str]:
        """Starts a process holding a new network namespace with lo up; returns the prefix that
        runs a command inside it. A user namespace (`unshare -rn`) first, so root is not needed."""
        errors = []
        for unshare, enter in ((["unshare", "-rn"], ["-U", "-n", "--preserve-credentials"]), (["unshare", "-n"], ["-n"])):
            holder = subprocess.Popen(unshare + ["sh", "-c", "ip link set lo up && echo up && exec sleep 1000000"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            ready, _, _ = select.select([holder.stdout], [], [], 10)
            if ready and holder.stdout.readline().strip() == "up":
                if os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                    stop_process(holder)
                    raise PeerError("the namespace holder is in this process's network namespace")
                self.procs.append(holder)
                return ["nsenter", "-t", str(holder.pid)] + enter + ["--"]
            stop_process(holder)
            errors.append(f"{' '.join(unshare)}: {holder.stderr.read().strip()[:200]}")
        raise PeerError("could not make a private network namespace: " + "; ".join(errors))

    def start(self) -> None:
        enter = self._namespace()
        port = 50051  # inside the private namespace nothing else can hold it
        log = os.path.join(self.logdir, "mooncake_master.log")
        master = os.path.join(VENVS["mooncake"], "bin", "mooncake_master")
        with open(log, "w") as f:
            proc = subprocess.Popen(enter + [master, "--rpc_address=127.0.0.1", f"--rpc_port={port}",
                                             "--enable_http_metadata_server=false", "--metrics_port=19003"],
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not any(s["port"] == port for s in listening_sockets({proc.pid})):
            if proc.poll() is not None:
                raise PeerError(f"mooncake_master exited with {proc.returncode}: {_tail(log, 600)}")
            if time.monotonic() > deadline:
                raise PeerError(f"mooncake_master did not listen on {port} in 30 s: {_tail(log, 600)}")
            time.sleep(0.1)
        cfg = {"master": f"127.0.0.1:{port}", "local_buffer_bytes": self.max_batch_bytes + 16 * MiB}
        self.writer = Worker("mooncake", "writer", {**cfg, "segment_bytes": self.max_batch_bytes + 64 * MiB}, self.logdir, enter)
        self.reader = Worker("mooncake", "reader", {**cfg, "segment_bytes": 0}, self.logdir, enter)
        self.server_version = "mooncake_master " + self.writer.versions["mooncake-transfer-engine-non-cuda"]


class LMCachePeer(Peer):
    name = "lmcache"

    def start(self) -> None:
        self.port = free_port()
        log = os.path.join(self.logdir, "lmcache-server.log")
        python = os.path.join(VENVS["lmcache"], "bin", "python")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "w") as f:
            proc = subprocess.Popen([python, "-m", "lmcache.v1.server", "127.0.0.1", str(self.port), "cpu"],
                                    stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        wait_port("127.0.0.1", self.port, proc, log, timeout_s=120)
        gb = self.max_batch_bytes / 1024**3
        cfg = {"host": "127.0.0.1", "port": self.port}
        # The writer stages a batch for the server and keeps one in its hot cache; the reader
        # receives a batch into LMCache's own memory objects before copying it out.
        self.writer = Worker("lmcache", "writer", {**cfg, "local_cpu_gb": 2 * gb + 0.1}, self.logdir)
        self.reader = Worker("lmcache", "reader", {**cfg, "local_cpu_gb": gb + 0.1}, self.logdir)
        self.server_version = "lmcache.v1.server " + self.writer.versions["lmcache"]


PEER_CLASSES = {"redis": RedisPeer, "mooncake": MooncakePeer, "lmcache": LMCachePeer}


# -- measuring ------------------------------------------------------------------------------------

def _batch_entry(total: int, times: list[float], tcp: list[float]) -> dict:
    get_s, tcp_s = statistics.median(times), statistics.median(tcp)
    return {"gbps": total / get_s / 1e9, "tcp_gbps": total / tcp_s / 1e9, "vs_tcp": tcp_s / get_s,
            "seconds_per_round": [round(t, 5) for t in times]}


def _latency_entry(times: list[float], tcp: list[float]) -> dict:
    p50, p99 = statistics.median(times), percentile(times, 99)
    t50, t99 = statistics.median(tcp), percentile(tcp, 99)
    return {"p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "tcp_p50_us": t50 * 1e6, "tcp_p99_us": t99 * 1e6,
            "p50_vs_tcp": t50 / p50, "p99_vs_tcp": t99 / p99, "samples": len(times)}


def measure_peer(peer: Peer, sizes: dict, args, tcp) -> dict:
    """One peer's table: {size: {cross_node: {...}, same_node: {...}, latency: {...}}}."""
    table: dict = {}
    for tag, (size, count) in sizes.items():
        try:
            table[tag] = measure_peer_size(peer, tag, size, count, args, tcp)
        except PeerError as e:
            table[tag] = {"block_bytes": size, "blocks": count, "not_measured": str(e)}
            print(f"  {peer.name} {tag}: NOT MEASURED: {e}", flush=True)
            try:
                peer.writer.call("remove", prefix=f"kvpeers-{os.getpid()}-{tag}", count=count, timeout_s=60)
            except PeerError:
                pass
    return table


def measure_peer_size(peer: Peer, tag: str, size: int, count: int, args, tcp) -> dict:
    """One peer, one block size: its row of the table."""
    total = size * count
    prefix = f"kvpeers-{os.getpid()}-{tag}"
    seed = 1000 + list(SIZES).index(tag)
    for w in (peer.writer, peer.reader):
        w.call("prepare", size=size, count=count, seed=seed)
    put_s = peer.writer.call("put", prefix=prefix)["seconds"]
    deadline = time.monotonic() + 60
    while not peer.reader.call("exists", prefix=prefix, index=count - 1)["exists"]:
        if time.monotonic() > deadline:
            raise PeerError(f"the reader never saw the writer's blocks ({tag})")
        time.sleep(0.05)
    buf = touched(1, total)[0]
    row: dict = {"block_bytes": size, "blocks": count, "put_gbps": total / put_s / 1e9}
    for where, worker in (("cross_node", peer.reader), ("same_node", peer.writer)):
        times, bound = [], []
        for rnd in range(args.repeats + 1):  # round 0 warms every path up, untimed
            t_tcp = tcp.stream(buf)
            reply = worker.call("get", prefix=prefix)
            if reply["bad"]:
                raise PeerError(f"{where} get of {tag} blocks returned wrong or missing bytes for blocks {reply['bad'][:8]}")
            if rnd:
                times.append(reply["seconds"])
                bound.append(t_tcp)
        row[where] = _batch_entry(total, times, bound)
    if tag in LATENCY_SIZES:
        row["latency"] = {}
        one = touched(1, size)[0]
        for where, worker in (("cross_node", peer.reader), ("same_node", peer.writer)):
            worker.call("latency", prefix=prefix, samples=min(20, args.latency_samples))  # warm-up
            times, bound = [], []
            chunk = max(1, args.latency_samples // 4)
            while len(times) < args.latency_samples:  # interleaved with the bound, in chunks
                bound += tcp.roundtrips(one, chunk)
                reply = worker.call("latency", prefix=prefix, samples=chunk)
                if reply["bad"]:
                    raise PeerError(f"{where} single-block get of {tag} returned wrong bytes for blocks {reply['bad'][:8]}")
                times += reply["times"]
            row["latency"][where] = _latency_entry(times, bound)
    peer.writer.call("remove", prefix=prefix, count=count)
    print(f"  {peer.name} {tag}: cross-node {row['cross_node']['gbps']:.2f} GB/s ({row['cross_node']['vs_tcp']:.2f} of TCP), "
          f"same-node {row['same_node']['gbps']:.2f} GB/s"
          + (f", get p50 cross {row['latency']['cross_node']['p50_us']:.0f} us, same {row['latency']['same_node']['p50_us']:.0f} us"
             if "latency" in row else ""), flush=True)
    return row


def run_peer(name: str, sizes: dict, args, tcp, logdir: str) -> tuple[dict | None, dict]:
    """(its table or None, its report entry: versions, or the reason it was not measured)."""
    max_batch = max(size * count for size, count in sizes.values())
    peer = PEER_CLASSES[name](os.path.join(logdir, name), max_batch)
    os.makedirs(peer.logdir, exist_ok=True)
    entry: dict = {"name": name}
    stage = "install check"
    try:
        peer.check_installed()
        stage = "start"
        peer.start()
        entry.update(peer.describe())
        stage = "loopback check"
        sockets = listening_sockets(peer.pids())
        entry["listening"] = [f"{s['command']}({s['pid']}) {s['proto']} {s['address']}:{s['port']}"
                              + (" [private netns, lo only]" if s["private_netns"] and set(s["netns_interfaces"]) <= {"lo"} else "")
                              for s in sockets]
        exposed = exposure(sockets)
        if exposed:
            raise PeerError("listens beyond loopback: " + ", ".join(f"{s['command']} {s['address']}:{s['port']}" for s in exposed))
        stage = "measurement"
        table = measure_peer(peer, sizes, args, tcp)
        if all("not_measured" in row for row in table.values()):
            raise PeerError("no size measured: " + "; ".join(f"{t}: {r['not_measured']}" for t, r in table.items()))
        stage = "loopback check after the run"
        exposed = exposure(listening_sockets(peer.pids()))
        if exposed:
            raise PeerError("listened beyond loopback during the run: "
                            + ", ".join(f"{s['command']} {s['address']}:{s['port']}" for s in exposed))
        return table, entry
    except PeerError as e:
        entry["not_measured"] = f"{stage}: {e}"
        return None, entry
    except Exception as e:  # a bug here or in a peer: still reported, never skipped silently
        entry["not_measured"] = f"{stage}: {type(e).__name__}: {e}"
        traceback.print_exc()
        return None, entry
    finally:
        peer.stop()


def kv_writer_class():
    import ray

    @ray.remote(num_cpus=0)
    class KvWriter:
        """On node B: a kvstore client putting the benchmark's blocks."""

        def __init__(self, layout_dict: dict, seed: int, count: int) -> None:
            from bench.peers import Blocks
            from kvstore import Layout, connect

            self.layout = Layout.from_dict(layout_dict)
            self.client = connect()
            blocks = Blocks(seed, self.layout.block_nbytes)
            self.src = touched(count, self.layout.block_nbytes)
            for i in range(count):
                blocks.fill(self.src[i], i)

        def put(self, keys: list[bytes]) -> float:
            import torch

            start = time.perf_counter()
            stored = self.client.put(self.layout, keys, torch.from_numpy(self.src)).stored
            elapsed = time.perf_counter() - start
            assert stored == len(keys), stored
            return elapsed

        def close(self) -> None:
            self.client.close()

    return KvWriter


def measure_kvstore(sizes: dict, args) -> tuple[dict, dict]:
    """kvstore's table, on a two-node RayTestCluster (driver on A = 127.0.0.2, writer on B)."""
    import ray
    import torch

    from bench.common import FlightBound, TcpBound
    from kvstore import Layout, block_keys, connect
    from kvstore.cluster.localcluster import RayTestCluster
    from kvstore.cluster.node import node_actor_name

    torch.set_num_threads(args.threads)
    table: dict = {}
    info: dict = {"name": "kvstore"}
    max_batch = max(size * count for size, count in sizes.values())
    rc = RayTestCluster(2, object_store_bytes=256 * MiB).start()
    tcp = floor = None
    try:
        a_id, b_id = rc.node_id(0), rc.node_id(1)
        tcp = TcpBound(rc.ips[1], max_batch)  # B's address to a buffer on A, as in bench.cluster
        floor = FlightBound(rc.ips[1], max_batch)  # the same over bare Flight: what kvstore's transport allows
        KvWriter = kv_writer_class()
        for tag, (size, count) in sizes.items():
            _, layers, tokens = SIZES[tag]
            layout = Layout(f"bench/peers-{tag}", num_layers=layers, num_kv_heads=8, head_dim=128,
                            dtype="float16", block_tokens=tokens)
            assert layout.block_nbytes == size, (layout.block_nbytes, size)
            seed = 1000 + list(SIZES).index(tag)
            client = connect(rc.gcs_address, slot_bytes=size, host_tier_bytes=(count + 8) * size, event_batch_ms=5)
            client.wait_ready(2)
            try:
                node_a = ray.get_actor(node_actor_name(a_id), namespace="kvstore")
                writer = KvWriter.options(resources={rc.resources[1]: 0.01}).remote(layout.to_dict(), seed, count)
                keys = block_keys(np.arange(count * tokens), layout, namespace=f"peers-{os.getpid()}-{tag}")
                put_s = ray.get(writer.put.remote(keys))
                deadline = time.monotonic() + 30
                while client.longest_prefix(keys) < count:
                    assert time.monotonic() < deadline, "blocks put on B never reached the index"
                    time.sleep(0.02)
                blocks = Blocks(seed, size)
                out = torch.zeros((count, size), dtype=torch.uint8)
                out_np = out.numpy()
                buf = touched(1, size * count)[0]
                row: dict = {"block_bytes": size, "blocks": count, "put_gbps": size * count / put_s / 1e9}

                def check(rows, where):
                    bad = [i for i in rows if not blocks.check(out_np[i], i)]
                    if bad:
                        raise AssertionError(f"kvstore {where} get of {tag} returned wrong bytes for blocks {bad[:8]}")

                def batch(where: str, drop: bool) -> dict:
                    times, bound, flight_times = [], [], []
                    for rnd in range(args.repeats + 1):
                        t_tcp = tcp.stream(buf)
                        t_flight = floor.stream(buf, size) if drop else None
                        if drop:
                            ray.get(node_a.delete.remote(keys))
                        out_np[:, :16] = 0
                        start = time.perf_counter()
                        # Cross-node: into the caller's buffer only, as every peer does (no local copy).
                        r = client.get(layout, keys, out, cache=False) if drop else client.get(layout, keys, out)
                        elapsed = time.perf_counter() - start
                        client.flush()  # the cache fill behind a remote get, before anything is timed
                        want = (b_id, "remote") if drop else (a_id, "local")
                        assert r.hits == count and all(s == want for s in r.sources), r.sources[:3]
                        check(range(count), where)
                        if rnd:
                            times.append(elapsed)
                            bound.append(t_tcp)
                            flight_times.append(t_flight)
                    entry = _batch_entry(size * count, times, bound)
                    if drop:
                        entry["flight_floor_gbps"] = size * count / statistics.median(flight_times) / 1e9
                        entry["vs_flight_floor"] = entry["gbps"] / entry["flight_floor_gbps"]
                    return entry

                row["cross_node"] = batch("cross-node", drop=True)
                row["cross_node"]["caches_pulled_blocks"] = False
                # Same node: the blocks in A's arena, put there by a get that caches what it pulls.
                fill = {"cache": True}
                ray.get(node_a.delete.remote(keys))
                client.get(layout, keys, out, **fill)
                client.flush()
                row["same_node"] = batch("same-node", drop=False)
                if tag in LATENCY_SIZES:
                    row["latency"] = {}
                    one = touched(1, size)[0]
                    for where, drop in (("cross_node", True), ("same_node", False)):
                        if not drop:  # all of them in A's arena again
                            client.get(layout, keys, out, **fill)
                            client.flush()
                        times = []
                        warm = min(20, args.latency_samples)
                        for n in range(args.latency_samples + warm):
                            i = n % count
                            if drop:
                                ray.get(node_a.delete.remote([keys[i]]))
                            out_np[i, :16] = 0
                            start = time.perf_counter()
                            r = client.get(layout, [keys[i]], out[i:i + 1], cache=False) if drop \
                                else client.get(layout, [keys[i]], out[i:i + 1])
                            elapsed = time.perf_counter() - start
                            if drop:
                                client.flush()
                            assert r.hits == 1 and r.sources[0] == ((b_id, "remote") if drop else (a_id, "local")), r.sources
                            check([i], where)
                            if n >= warm:
                                times.append(elapsed)
                        bound = tcp.roundtrips(one, args.latency_samples)
                        row["latency"][where] = _latency_entry(times, bound)
                        if drop:
                            row["latency"][where]["flight_floor_p50_us"] = statistics.median(
                                floor.roundtrips(one, args.latency_samples)) * 1e6
                table[tag] = row
                print(f"  kvstore {tag}: cross-node {row['cross_node']['gbps']:.2f} GB/s ({row['cross_node']['vs_tcp']:.2f} of TCP), "
                      f"same-node {row['same_node']['gbps']:.2f} GB/s"
                      + (f", get p50 cross {row['latency']['cross_node']['p50_us']:.0f} us, same {row['latency']['same_node']['p50_us']:.0f} us"
                         if "latency" in row else ""), flush=True)
                ray.get(writer.close.remote())
                ray.kill(writer)
            finally:
                sockets = listening_sockets({pid for pid, _ in rc.processes()})
                info["listening_beyond_loopback"] = sorted(set(info.get("listening_beyond_loopback", [])) | {
                    f"{s['command']} {s['proto']} {s['address']}:{s['port']}" for s in exposure(sockets)})
                client.close(shutdown_cluster=True)  # next size: new controller and node actors, new slot size
        import kvstore

        info["version"] = getattr(kvstore, "__version__", "0.1.0")
        info["ray"] = ray.__version__
    finally:
        for bound in (tcp, floor):
            if bound is not None:
                bound.close()
        rc.stop()
    return table, info


def main(argv=None) -> int:
    import argparse

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        wp = argparse.ArgumentParser()
        wp.add_argument("--worker", choices=list(CLIENTS))
        wp.add_argument("--config", type=json.loads)
        wargs = wp.parse_args()
        worker_main(wargs.worker, wargs.config)
        return 0

    from bench.common import TcpBound, machine, parser, report

    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(repeats=5)
    p.add_argument("--latency-samples", type=int, default=200, help="single-block gets per latency figure")
    p.add_argument("--blocks-32m", type=int, default=16, help="blocks in a 32 MiB batch (64 is 2 GiB per batch)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of " + ",".join(SIZES))
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated, of " + ",".join(PEERS) + " (or none)")
    p.add_argument("--no-kvstore", action="store_true", help="measure the peers only (development)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this driver")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sizes = {}
    for tag in args.sizes.split(","):
        if tag not in SIZES:
            p.error(f"unknown size {tag!r}")
        sizes[tag] = (SIZES[tag][0], args.blocks_32m if tag == "32m" else BATCH)
    peers = [] if args.peers == "none" else args.peers.split(",")
    for name in peers:
        if name not in PEERS:
            p.error(f"unknown peer {name!r}")
    started = time.monotonic()
    tables: dict = {}
    systems: dict = {}
    if not args.no_kvstore:
        print("kvstore (two-node RayTestCluster) ...", flush=True)
        tables["kvstore"], systems["kvstore"] = measure_kvstore(sizes, args)
    logdir = tempfile.mkdtemp(prefix="kvpeers-")
    max_batch = max(size * count for size, count in sizes.values())
    with TcpBound("127.0.0.1", max_batch) as tcp:
        for name in peers:
            print(f"{name} ...", flush=True)
            table, entry = run_peer(name, sizes, args, tcp, logdir)
            systems[name] = entry
            if table is not None:
                tables[name] = table
            else:
                print(f"  {name} NOT MEASURED: {entry['not_measured'][:2000]}", flush=True)
    measured = [n for n in peers if n in tables]

    def row(n: str, tag: str) -> dict | None:
        r = tables.get(n, {}).get(tag)
        return None if r is None or "not_measured" in r else r

    def best_peer(tag: str, path) -> tuple[str | None, float | None]:
        vals = [(path(row(n, tag)), n) for n in measured if row(n, tag)]
        return (None, None) if not vals else (max(vals)[1], max(vals)[0])

    figures: dict = {}
    kv = tables.get("kvstore", {})
    for tag in sizes:
        name, gbps = best_peer(tag, lambda r: r["cross_node"]["gbps"])
        figures[f"kv_vs_best_peer_{tag}"] = (kv[tag]["cross_node"]["gbps"] / gbps) if (tag in kv and gbps) else None
        figures[f"best_peer_gbps_{tag}"] = gbps
        # The same comparison with each side first divided by its own TCP bound (measured in its
        # own rounds): steadier on a shared machine, where systems run minutes apart.
        best_ratio = max((row(n, tag)["cross_node"]["vs_tcp"] for n in measured if row(n, tag)), default=None)
        figures[f"kv_vs_best_peer_{tag}_tcp_normalized"] = (kv[tag]["cross_node"]["vs_tcp"] / best_ratio
                                                            if (tag in kv and best_ratio) else None)
        figures[f"best_peer_{tag}"] = name
    for tag in LATENCY_SIZES:
        if tag in kv:
            figures[f"get_p50_us_same_node_{tag}"] = kv[tag]["latency"]["same_node"]["p50_us"]
            figures[f"get_p50_us_cross_node_{tag}"] = kv[tag]["latency"]["cross_node"]["p50_us"]
        lat = [(row(n, tag)["latency"]["cross_node"]["p50_us"], n) for n in measured if row(n, tag)]
        figures[f"best_peer_get_p50_us_cross_node_{tag}"] = min(lat)[0] if lat else None
        figures[f"best_peer_get_cross_node_{tag}"] = min(lat)[1] if lat else None
    for tag in sizes:  # kvstore over one bare Flight session of the same bytes: its transport's floor
        if tag in kv:
            figures[f"kv_vs_flight_floor_{tag}"] = kv[tag]["cross_node"].get("vs_flight_floor")
            figures[f"flight_floor_gbps_{tag}"] = kv[tag]["cross_node"].get("flight_floor_gbps")
    if "64k" in kv and "latency" in kv["64k"]:
        figures["flight_floor_get_p50_us_64k"] = kv["64k"]["latency"]["cross_node"].get("flight_floor_p50_us")
    if figures.get("get_p50_us_cross_node_64k") and figures.get("best_peer_get_p50_us_cross_node_64k"):
        figures["kv_get_p50_cross_node_64k_over_best_peer"] = (figures["get_p50_us_cross_node_64k"]
                                                              / figures["best_peer_get_p50_us_cross_node_64k"])
    for sysname, table in tables.items():
        for tag in table:
            if row(sysname, tag):
                figures[f"{sysname}_cross_node_gbps_{tag}"] = row(sysname, tag)["cross_node"]["gbps"]
    figures["seconds"] = time.monotonic() - started

    failed = [n for n in peers if n not in tables or any("not_measured" in r for r in tables[n].values())]
    targets = {f"kv_vs_best_peer_{tag}": (">=", 1.0) for tag in sizes}
    targets["get_p50_us_same_node_64k"] = ("<=", 50.0)
    targets["kv_get_p50_cross_node_64k_over_best_peer"] = ("<=", 1.0)
    targets = {k: v for k, v in targets.items() if isinstance(figures.get(k), float)}

    print_tables(tables, systems)
    notes = {
        "blocks_per_batch": {tag: count for tag, (_, count) in sizes.items()},
        "block_bytes": {tag: size for tag, (size, _) in sizes.items()},
        "repeats": args.repeats, "latency_samples": args.latency_samples,
        "cross_node": "kvstore: writer actor on Ray node B (127.0.0.3), reader = driver on node A (127.0.0.2), A's cached "
                      "copies deleted before each round; peers: server + writer process + reader process",
        "same_node": "kvstore: blocks in A's arena; peers: the writer process reading back its own blocks",
        "tcp_bound": "one raw TCP stream (bench.common.TcpBound) interleaved with each system's rounds; latency bound: "
                     "one request/response of the block's size on a warm connection",
        "flight_floor": "kvstore's cross-node figures also over one bare pyarrow Flight session moving the same bytes "
                        "from node B's address, packed in 4 MiB batches as kvstore's data plane sends them "
                        "(bench.common.FlightBound): the most kvstore's transport allows here",
        "32m": ("64 blocks of 32 MiB" if sizes.get("32m", (0, 64))[1] == 64
                else f"{sizes['32m'][1]} blocks of 32 MiB per batch, not 64 (memory; --blocks-32m 64 runs the full batch)")
                if "32m" in sizes else "not run",
        "logs": logdir if failed else "removed (every peer measured)",
        "kvstore_commit": _git("rev-parse", "HEAD"),
        "kvstore_uncommitted": _git("status", "--porcelain", "--", "kvstore", "cluster", "tiers", "connectors").splitlines(),
    }
    if not failed:
        shutil.rmtree(logdir, ignore_errors=True)
    report("peers", figures, targets, None, notes)
    if args.json:
        out = {"suite": "peers", "machine": machine(), **figures,
               "peers_measured": [{k: v for k, v in systems[n].items() if k != "listening"} for n in measured],
               "peers_not_measured": [{"name": n, "reason": systems[n]["not_measured"]} for n in peers if n not in tables]
               + [{"name": n, "size": t, "reason": r["not_measured"]} for n in measured for t, r in tables[n].items()
                  if "not_measured" in r],
               "systems": systems, "tables": tables,
               "targets": {k: {"target": f"{op} {b}", "met": (figures[k] >= b if op == ">=" else figures[k] <= b)}
                           for k, (op, b) in targets.items()},
               "notes": notes}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def print_tables(tables: dict, systems: dict) -> None:
    tags = sorted({t for tb in tables.values() for t in tb}, key=list(SIZES).index)

    def cell(tb: dict, tag: str, where: str) -> str:
        if tag not in tb or "not_measured" in tb[tag]:
            return ("-" if tag not in tb else "failed").rjust(18)
        return f"{tb[tag][where]['gbps']:.2f} ({tb[tag][where]['vs_tcp']:.2f})".rjust(18)

    for where, title in (("cross_node", "cross-node"), ("same_node", "same-node")):
        print(f"\n{title} batch get, GB/s (ratio to one TCP stream in the same rounds)")
        print(f"  {'system':<10}" + "".join(f"{t:>18}" for t in tags))
        for name, tb in tables.items():
            print(f"  {name:<10}" + "".join(cell(tb, t, where) for t in tags))
    print("\nsingle-block get, p50 / p99 us (a TCP round trip of the block's size, p50)")
    for name, tb in tables.items():
        for t in LATENCY_SIZES:
            if t in tb and "latency" in tb[t]:
                c, s = tb[t]["latency"]["cross_node"], tb[t]["latency"]["same_node"]
                print(f"  {name:<10} {t:>4}  cross {c['p50_us']:>8.0f} / {c['p99_us']:>8.0f}   same {s['p50_us']:>8.0f} / {s['p99_us']:>8.0f}"
                      f"   (tcp {c['tcp_p50_us']:.0f})")
    for name, tb in tables.items():
        for t, r in tb.items():
            if "not_measured" in r:
                print(f"  {name} {t}: NOT MEASURED ({r['not_measured'][:300]})")
    for name, entry in systems.items():
        if "not_measured" in entry:
            print(f"  {name}: NOT MEASURED ({entry['not_measured'][:300]})")
        if entry.get("listening_beyond_loopback"):
            print(f"  {name}: its processes listen beyond loopback: {', '.join(entry['listening_beyond_loopback'])}")


if __name__ == "__main__":
    raise SystemExit(main())
