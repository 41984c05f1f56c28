"""What every benchmark suite shares: timing, the machine's description, the report.

Every figure is a ratio to a bound measured in the same run, on the same data, interleaved with
the measurement itself (bound, store, bound, store, ...), so a noisy neighbour slows both sides
alike. Medians, not means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(pairs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
                repeats: int) -> dict[str, float]:
    """Median seconds of each named (fn, setup), the runs of all of them interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, (fn, setup) in pairs.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per figure (median taken)")
    return p


def report(suite: str, figures: dict, targets: dict[str, tuple[str, float]], json_path: str | None,
           notes: dict | None = None) -> int:
    """Prints a table, writes JSON; returns 0 (a missed target is reported, not an error)."""
    checks = {}
    for key, (op, bound) in targets.items():
        value = figures[key]
        checks[key] = {"target": f"{op} {bound}", "met": value >= bound if op == ">=" else value <= bound}
    width = max(len(k) for k in figures)
    print(f"\n{suite} benchmark ({machine()['cpus']} CPUs, torch threads {torch.get_num_threads()})")
    for key, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        mark = ""
        if key in checks:
            mark = f"  target {checks[key]['target']}: {'met' if checks[key]['met'] else 'MISSED'}"
        print(f"  {key:<{width}}  {shown:>16}{mark}")
    if json_path:
        out = {"suite": suite, "machine": machine(), **figures, "targets": checks, "notes": notes or {}}
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {json_path}")
    return 0


# -- one raw TCP stream, the bound every network figure is a ratio to -----------------------------

_TCP_SENDER = r"""
import os, socket, struct, sys
ip, size = sys.argv[1], int(sys.argv[2])
chunk = os.urandom(1 << 20)
buf = bytearray(chunk * (size // len(chunk) + 1))[:size]  # touched, not the zero page
view = memoryview(buf)
server = socket.create_server((ip, 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                break
            (n,) = struct.unpack("<Q", head)
            while n:
                k = min(n, size)
                conn.sendall(view[:k])
                n -= k
"""


class TcpBound:
    """One raw TCP stream from a sender process listening on `sender_ip` into a caller's
    preallocated buffer in this process: the bound for moving the same bytes between two
    processes over this machine's loopback.

    The sender keeps `max_bytes` of touched data and answers each 8-byte request (a length)
    with that many bytes on one persistent connection (TCP_NODELAY), so `stream` times one
    request's bytes arriving and `roundtrips` times request/response pairs (a latency bound).
    Stop it with `close` (it is killed by its pid).
    """

    def __init__(self, sender_ip: str = "127.0.0.1", max_bytes: int = 64 * 1024**2) -> None:
        import socket
        import subprocess

        self.max_bytes = max_bytes
        self.proc = subprocess.Popen([sys.executable, "-c", _TCP_SENDER, sender_ip, str(max_bytes)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"the TCP bound's sender did not start on {sender_ip}")
        self.address = (sender_ip, int(line))
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _receive(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionError("the TCP bound's sender closed early")
            got += k

    def stream(self, buf) -> float:
        """Seconds to receive len(buf) bytes (one request) into buf (a touched buffer)."""
        import struct

        view = memoryview(buf).cast("B")
        start = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", len(view)))
        self._receive(view)
        return time.perf_counter() - start

    def roundtrips(self, buf, count: int) -> list[float]:
        """Seconds of each of `count` request/response pairs of len(buf) bytes."""
        import struct

        view = memoryview(buf).cast("B")
        head = struct.pack("<Q", len(view))
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.sock.sendall(head)
            self._receive(view)
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "TcpBound":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
