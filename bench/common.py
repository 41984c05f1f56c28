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

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
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


def _start_sender(program: str, what: str, sender_ip: str, max_bytes: int):
    """A bound's sender process (`program` run with its IP and byte count), and the port it
    printed once listening."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", program, sender_ip, str(max_bytes)], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the {what} bound's sender did not start on {sender_ip}")
    return proc, int(line)


_FLIGHT_SENDER = r"""
import os, struct, sys
import numpy as np, pyarrow as pa, pyarrow.flight as fl
ip, size = sys.argv[1], int(sys.argv[2])
chunk = os.urandom(1 << 20)
data = np.frombuffer(chunk * (size // len(chunk) + 1), dtype=np.uint8)[:size]  # touched
SCHEMA = pa.schema([("data", pa.large_binary())])
PIECE = 4 << 20  # as kvstore's data plane: small blocks packed up to this much a batch, large ones cut
class Sender(fl.FlightServerBase):
    def do_exchange(self, context, descriptor, reader, writer):
        writer.begin(SCHEMA)
        while True:
            try:
                count, block = struct.unpack("<QQ", reader.read_chunk().app_metadata.to_pybytes())
            except StopIteration:
                return
            if block < PIECE:
                per = max(1, PIECE // block)
                lengths = [min(per, count - i) * block for i in range(0, count, per)]
            else:
                lengths = [min(PIECE, block - o) for _ in range(count) for o in range(0, block, PIECE)]
            for i, n in enumerate(lengths):
                offsets = pa.py_buffer(np.array([0, n], dtype=np.int64))
                batch = pa.RecordBatch.from_arrays(
                    [pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data[:n])])], schema=SCHEMA)
                if i == len(lengths) - 1:
                    writer.write_with_metadata(batch, pa.py_buffer(b"end"))
                else:
                    writer.write_batch(batch)
server = Sender(f"grpc+tcp://{ip}:0")
print(server.port, flush=True)
server.serve()
"""


class FlightBound:
    """The same bytes over a bare Arrow Flight session (pyarrow, no kvstore code): a sender
    process on `sender_ip` answers each request for `count` blocks of `block` bytes with them
    packed (or cut) into 4 MiB record batches, as kvstore's data plane sends them; the caller
    copies each batch into its buffer. What any Python server behind Flight costs at least, the
    floor under kvstore's cross-node figures. Stop it with `close`."""

    def __init__(self, sender_ip: str = "127.0.0.1", max_bytes: int = 64 * 1024**2) -> None:
        self.proc, port = _start_sender(_FLIGHT_SENDER, "Flight", sender_ip, max_bytes)
        self._client = flight.FlightClient(f"grpc+tcp://{sender_ip}:{port}")
        self._writer, self._reader = self._client.do_exchange(flight.FlightDescriptor.for_command(b"bound"))
        self._writer.begin(pa.schema([("data", pa.large_binary())]))

    def _get(self, view: np.ndarray, block: int) -> None:
        import struct

        self._writer.write_metadata(pa.py_buffer(struct.pack("<QQ", len(view) // block, block)))
        got = 0
        while True:
            chunk = self._reader.read_chunk()
            data = chunk.data.column(0)
            _, offsets, payload = data.buffers()
            start, end = np.frombuffer(offsets, dtype=np.int64, count=2)
            piece = np.frombuffer(payload, dtype=np.uint8, count=int(end - start), offset=int(start))
            view[got:got + len(piece)] = piece
            got += len(piece)
            if chunk.app_metadata is not None:
                return

    def stream(self, buf, block: int) -> float:
        """Seconds to receive len(buf) bytes as blocks of `block` bytes into buf (touched)."""
        view = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        start = time.perf_counter()
        self._get(view, block)
        return time.perf_counter() - start

    def roundtrips(self, buf, count: int) -> list[float]:
        """Seconds of each of `count` gets of one block of len(buf) bytes."""
        view = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self._get(view, len(view))
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        try:
            self._writer.done_writing()
            self._writer.close()
            self._client.close()
        except Exception:  # noqa: BLE001 - the sender is killed below either way
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)


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

        self.max_bytes = max_bytes
        self.proc, port = _start_sender(_TCP_SENDER, "TCP", sender_ip, max_bytes)
        self.address = (sender_ip, port)
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
