"""A real multi-node Ray cluster on one machine, for tests, benchmarks and trying kvstore out.

Each node is a `ray start --block` process in its own process group, with its own loopback
address (127.0.0.2, .3, ...: Ray replaces 127.0.0.1 with the eth0 address), temp dir, explicit
block of ports (so nothing collides with other work on the machine), one CPU, a bounded object
store, and a custom resource `node_<letter>` for placing work on it. Only the processes started
here are ever stopped; never `ray stop`.

Each node has a stable name (`node_names`, passed to the node as KVSTORE_NODE_NAME: its NVMe
directory), so a node restarted with `restart_node`, or the whole cluster with `stop` then
`start`, finds its NVMe tier again, as a real host or pod would.

A node's processes are the members of its `ray start`'s session: the raylet starts Ray's workers
(the node actors among them) in process groups of their own, but they keep the session.
`kill_node` and `stop` end every member (checked by pid and start time, so a reused pid is never
signalled), then remove the shared-memory arenas of this cluster's nodes.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_initial_delay_ms": "1000",
}
PORTS_PER_NODE = 64


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in clock ticks since boot) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[3]), int(fields[19])


def _session_members(sessions: set[int]) -> set[tuple[int, int]]:
    """(pid, start time) of every live process (zombies are not) in one of these sessions."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] != "Z" and st[1] in sessions:
                found.add((int(name), st[2]))
    return found


def _ticks_since_boot() -> int:
    """Now, in the clock ticks that /proc/<pid>/stat counts process start times in."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def _alive(member: tuple[int, int]) -> bool:
    """Whether this very process (same pid and start time) still runs (a zombie does not)."""
    st = _stat(member[0])
    return st is not None and st[0] != "Z" and st[2] == member[1]


def _kill_members(members: set[tuple[int, int]], timeout_s: float = 15.0) -> None:
    """SIGKILLs these processes and waits until they are gone; a pid that now names another
    process is left alone."""
    for member in members:
        if _alive(member):
            try:
                os.kill(member[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while any(_alive(m) for m in members):
        if time.monotonic() > deadline:
            left = sorted(m[0] for m in members if _alive(m))
            raise RuntimeError(f"processes {left} of the test cluster survived SIGKILL for {timeout_s} s")
        time.sleep(0.05)


def _remove_arenas(node_ids: set[str]) -> list[str]:
    """Unlinks the host arenas (`<prefix>-<node id[:12]>-<pid>`) of these nodes; call it only
    once every process of theirs is gone."""
    from kvstore.tiers.host import SHM_DIR

    shorts = {n[:12] for n in node_ids}
    removed = []
    for name in os.listdir(SHM_DIR):
        parts = name.rsplit("-", 2)
        if len(parts) != 3 or parts[1] not in shorts or not parts[2].isdigit():
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                if f.read(8) != b"KVSTHOST":  # a kvstore host arena, nothing else
                    continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _free_block(ip: str, count: int) -> int:
    """A base port such that base..base+count-1 are all free on ip right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((ip, port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports on {ip}")


class RayTestCluster:
    def __init__(self, num_nodes: int = 3, first_ip: int = 2, extra_env: dict | None = None,
                 object_store_bytes: int = 100_000_000, node_names: list[str] | None = None,
                 num_cpus: int = 1) -> None:
        self.num_nodes = num_nodes
        self.num_cpus = num_cpus  # logical CPUs each node offers Ray (what actors and Serve replicas ask for)
        self.ips = [f"127.0.0.{first_ip + i}" for i in range(num_nodes)]
        self.resources = [f"node_{string.ascii_lowercase[i]}" for i in range(num_nodes)]
        # Stable across restarts of this cluster (Ray's node ids are not): each node's NVMe directory.
        self.node_names = list(node_names or self.resources)
        if len(self.node_names) != num_nodes or len(set(self.node_names)) != num_nodes:
            raise ValueError(f"node_names={node_names!r} must name each of the {num_nodes} nodes once")
        self.procs: list[subprocess.Popen | None] = [None] * num_nodes  # the `ray start` of each node now
        self.temp_dirs: list[str | None] = [None] * num_nodes
        self.extra_env = extra_env or {}
        self.object_store_bytes = object_store_bytes
        self.gcs_address = ""
        self.node_ids: set[str] = set()  # every Ray node id this cluster's nodes have had

    def _env(self, i: int) -> dict:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS, **self.extra_env,
               "KVSTORE_NODE_NAME": self.node_names[i]}  # the node actor's stable name (Ray workers inherit it)
        env.pop("RAY_ADDRESS", None)
        return env

    def _start_node(self, i: int) -> None:
        ip = self.ips[i]
        base = _free_block(ip, PORTS_PER_NODE)
        temp_dir = tempfile.mkdtemp(prefix=f"kvr{i}-", dir="/tmp")  # short: Ray's socket paths are capped
        self.temp_dirs[i] = temp_dir
        args = [
            _ray_bin(), "start", "--block", f"--node-ip-address={ip}", f"--temp-dir={temp_dir}",
            f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_bytes}", f'--resources={{"{self.resources[i]}": 1}}',
            f"--node-manager-port={base + 1}", f"--object-manager-port={base + 2}",
            f"--metrics-export-port={base + 3}", f"--dashboard-agent-grpc-port={base + 4}",
            f"--dashboard-agent-listen-port={base + 5}", f"--runtime-env-agent-port={base + 6}",
            f"--min-worker-port={base + 10}", f"--max-worker-port={base + PORTS_PER_NODE - 1}",
        ]
        if i == 0:
            args += ["--head", f"--port={base}", "--include-dashboard=false"]
            if importlib.util.find_spec("grpc") is not None:  # Ray Client installed: keep it off 10001
                args.append(f"--ray-client-server-port={base + 7}")
            self.gcs_address = f"{ip}:{base}"
        else:
            args += [f"--address={self.gcs_address}"]
        with open(os.path.join(temp_dir, "ray-start.log"), "w") as log:
            self.procs[i] = subprocess.Popen(args, env=self._env(i), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)

    def start(self, timeout_s: float = 90.0) -> "RayTestCluster":
        """Starts every node (again, after `stop`: same names, addresses and resources) and
        connects this process to the cluster."""
        import ray

        if any(p is not None for p in self.procs):
            raise RuntimeError("the cluster is running; stop() it first")
        self._start_node(0)
        self._wait_port(self.gcs_address, timeout_s)
        for i in range(1, self.num_nodes):
            self._start_node(i)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=self.gcs_address, _node_ip_address=self.ips[0], namespace="kvstore",
                 log_to_driver=False)
        self._wait_nodes(lambda alive: len(alive) >= self.num_nodes, timeout_s, f"all {self.num_nodes} Ray nodes")
        return self

    def _wait_nodes(self, predicate, timeout_s: float, what: str) -> None:
        """Waits until predicate({ip: node id} of the live nodes) holds; records the node ids."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            alive = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes()
                     if n["Alive"] and n["NodeManagerAddress"] in self.ips}
            self.node_ids.update(alive.values())
            if predicate(alive):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; live: {alive}")
            time.sleep(0.2)

    def _wait_port(self, address: str, timeout_s: float) -> None:
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray head exited: see {self.temp_dirs[0]}/ray-start.log")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"ray head at {address} did not come up")

    def node_id(self, i: int) -> str:
        import ray

        for n in ray.nodes():
            if n["Alive"] and n["NodeManagerAddress"] == self.ips[i]:
                return n["NodeID"]
        raise LookupError(f"no live Ray node at {self.ips[i]}")

    def processes(self, i: int | None = None) -> set[tuple[int, int]]:
        """(pid, start time) of every live process of node i (of all nodes when None)."""
        procs = self.procs if i is None else [self.procs[i]]
        return _session_members({p.pid for p in procs if p is not None})

    def kill_node(self, i: int) -> None:
        """SIGKILLs every process of node i at once (raylet, workers and the node actor among them,
        the `ray start` that watched them), as when its machine dies; returns once all are gone."""
        proc = self.procs[i]
        if proc is None:
            return
        import ray

        if ray.is_initialized():
            try:
                self.node_ids.add(self.node_id(i))
            except LookupError:
                pass
        _kill_members(self.processes(i))  # the `ray start` leads the session: it is one of them
        proc.wait(timeout=10)
        self.procs[i] = None
        shutil.rmtree(self.temp_dirs[i], ignore_errors=True)

    def restart_node(self, i: int, timeout_s: float = 90.0) -> str:
        """Kills node i (not the head: it holds the cluster's GCS; restart everything with `stop`
        and `start`), waits until Ray has declared it dead, and starts it again under the same
        name, address and resource. Returns the new Ray node id."""
        if i == 0:
            raise ValueError("the head node cannot restart alone; stop() and start() the whole cluster")
        old = self.node_id(i)
        self.kill_node(i)
        self._wait_nodes(lambda alive: alive.get(self.ips[i]) != old, timeout_s, f"node {i} ({old[:12]}) to be dead")
        self._start_node(i)
        self._wait_nodes(lambda alive: alive.get(self.ips[i]) not in (None, old), timeout_s, f"node {i} to restart")
        return self.node_id(i)

    def stop(self) -> None:
        """Stops every node and every process of theirs, then removes their shared-memory arenas.

        Each node's process group gets SIGTERM first (raylet, GCS, agents); what is left of its
        session afterwards (Ray's workers and the node actors, in process groups of their own,
        which would otherwise linger and keep their arenas) gets SIGKILL. Returns once none is
        left; the cluster can `start` again.
        """
        import ray

        if ray.is_initialized():
            try:
                self.node_ids.update(n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] in self.ips)
            except Exception:  # the head is gone already: the ids seen at start and restarts remain
                pass
            ray.shutdown()
        stopping_since = time.monotonic()
        started_before = _ticks_since_boot()
        live = [p for p in self.procs if p is not None]
        members = self.processes()  # before any leader is reaped: its session id stays unique till then
        for proc in reversed(live):  # workers first, the head last
            if proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(1.0, 20 - (time.monotonic() - stopping_since)))
            except subprocess.TimeoutExpired:
                pass
        # Everything still running: the snapshot, and whatever the sessions gained since (never a
        # process that started after the stop began: a pid reused by someone else).
        members |= {m for m in _session_members({p.pid for p in live})
                    if m[1] <= started_before}
        _kill_members(members)
        for proc in live:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs = [None] * self.num_nodes
        for d in self.temp_dirs:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self.temp_dirs = [None] * self.num_nodes
        _remove_arenas(self.node_ids)
