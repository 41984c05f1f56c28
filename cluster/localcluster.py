"""A real multi-node Ray cluster on one machine, for tests, benchmarks and trying kvstore out.

Each node is a `ray start --block` process in its own process group, with its own loopback
address (127.0.0.2, .3, ...: Ray replaces 127.0.0.1 with the eth0 address), temp dir, explicit
block of ports (so nothing collides with other work on the machine), one CPU, a bounded object
store, and a custom resource `node_<letter>` for placing work on it. Only the processes started
here are ever stopped, by their process group; never `ray stop`.
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
                 object_store_bytes: int = 100_000_000) -> None:
        self.num_nodes = num_nodes
        self.ips = [f"127.0.0.{first_ip + i}" for i in range(num_nodes)]
        self.resources = [f"node_{string.ascii_lowercase[i]}" for i in range(num_nodes)]
        self.procs: list[subprocess.Popen | None] = []
        self.temp_dirs: list[str] = []
        self.extra_env = extra_env or {}
        self.object_store_bytes = object_store_bytes
        self.gcs_address = ""

    def _env(self) -> dict:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS, **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        return env

    def _start_node(self, i: int) -> None:
        ip = self.ips[i]
        base = _free_block(ip, PORTS_PER_NODE)
        temp_dir = tempfile.mkdtemp(prefix=f"kvr{i}-", dir="/tmp")  # short: Ray's socket paths are capped
        self.temp_dirs.append(temp_dir)
        args = [
            _ray_bin(), "start", "--block", f"--node-ip-address={ip}", f"--temp-dir={temp_dir}",
            "--num-cpus=1", f"--object-store-memory={self.object_store_bytes}", f'--resources={{"{self.resources[i]}": 1}}',
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
        log = open(os.path.join(temp_dir, "ray-start.log"), "w")
        self.procs.append(subprocess.Popen(args, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout_s: float = 90.0) -> "RayTestCluster":
        import ray

        self._start_node(0)
        self._wait_port(self.gcs_address, timeout_s)
        for i in range(1, self.num_nodes):
            self._start_node(i)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=self.gcs_address, _node_ip_address=self.ips[0], namespace="kvstore",
                 log_to_driver=False)
        deadline = time.monotonic() + timeout_s
        while sum(n["Alive"] for n in ray.nodes()) < self.num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(n['Alive'] for n in ray.nodes())} of {self.num_nodes} Ray nodes came up")
            time.sleep(0.2)
        return self

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

    def kill_node(self, i: int) -> None:
        """SIGKILLs node i's whole process group (raylet, workers, the ray start that watched them)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stops this cluster's nodes by their process groups, then removes the shared-memory
        arenas their node actors could not (killed with their node, they never unlink)."""
        import ray

        from kvstore.tiers.host import remove_stale_arenas

        node_ids = []
        if ray.is_initialized():
            node_ids = [n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] in self.ips]
            ray.shutdown()
        for proc in reversed(self.procs):  # workers first, the head last
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for proc in self.procs:  # stragglers that left the group's leader behind
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for node_id in node_ids:
            remove_stale_arenas(f"*-{node_id[:12]}-*")
