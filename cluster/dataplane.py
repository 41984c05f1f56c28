"""The data plane: an Arrow Flight server per node, and the client that pulls from and pushes to it.

do_get streams blocks straight out of the host arena: each record batch wraps a pinned slot
without copying, and the pin lives exactly as long as Arrow (and gRPC, which serializes
zero-copy) hold that memory, so a slot is never reused while its bytes are still on the way
out. do_put writes incoming blocks into slots reserved in the store and commits them at the end
of the stream; a stream that does not end within `put_deadline_s` has its slots fenced and is
refused. Every block travels with its checksum, and the receiving side (the client for a get,
the server for a put) checks it: a block that arrives damaged is not delivered, never data.
Every call must carry `authorization: Bearer <token>` (checked in a middleware, in constant
time); a malformed, oversize or unauthorised request gets a Flight error that says why, and the
server goes on serving.
"""
from __future__ import annotations

import hmac
import logging
import threading
import weakref
from typing import Callable, Sequence

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from kvstore.cluster.protocol import BLOCK_SCHEMA, ProtocolError, decode_request, encode_request
from kvstore.errors import AuthError, KVStoreError, TransferError
from kvstore.integrity import checksum, copy_with_checksum
from kvstore.layout import Layout
from kvstore.store import BlockHandle, TieredStore

log = logging.getLogger(__name__)

ACQUIRE_CHUNK = 16  # blocks pinned at a time per do_get stream
PACK_BELOW = 1024 * 1024  # blocks smaller than this travel several per record batch
PACK_BYTES = 4 * 1024 * 1024  # of one such batch
# A large initial HTTP/2 window, without BDP probing: gRPC would otherwise start each channel at
# 64 KiB and grow it over the first few hundred MiB, halving the first pulls' throughput.
_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", 32 * 1024 * 1024), ("grpc.http2.bdp_probe", 0)]


class _TokenAuth(flight.ServerMiddlewareFactory):
    def __init__(self, token: str) -> None:
        if not token:
            raise AuthError("the data plane needs a non-empty token")
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):
        for value in headers.get("authorization", []):
            if hmac.compare_digest(value.encode() if isinstance(value, str) else value, self._expected):
                return None
        raise flight.FlightUnauthenticatedError("missing or wrong token (send 'authorization: Bearer <token>')")


class DataPlaneServer(flight.FlightServerBase):
    """Serves one store's blocks over Flight. Start with `start()`, stop with `shutdown()`."""

    def __init__(self, store: TieredStore, host: str, port: int, token: str, max_request_bytes: int,
                 put_deadline_s: float = 30.0) -> None:
        super().__init__(f"grpc+tcp://{host}:{port}", middleware={"auth": _TokenAuth(token)})
        self.host = host
        self._store = store
        self._max_request_bytes = max_request_bytes
        self._put_deadline_s = put_deadline_s
        self._pack_pool = _BufferPool(PACK_BYTES)
        self._counters_lock = threading.Lock()
        self.counters = dict.fromkeys(("requests", "errors", "blocks_sent", "bytes_sent", "blocks_received",
                                       "bytes_received", "corrupt_received", "puts_expired"), 0)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "DataPlaneServer":
        self._thread = threading.Thread(target=self.serve, name="kvstore-flight", daemon=True)
        self._thread.start()
        return self

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                self.counters[name] += delta

    def _request(self, data: bytes, op: str):
        self._count(requests=1)
        try:
            return decode_request(data, op, self._max_request_bytes)
        except ProtocolError as e:
            self._count(errors=1)
            raise flight.FlightServerError(f"bad {op} request: {e}") from None

    def do_get(self, context, ticket):
        req = self._request(ticket.ticket, "get")
        try:
            self._store.check_layout(req.layout)
        except KVStoreError as e:
            self._count(errors=1)
            raise flight.FlightServerError(f"bad get request: {e}") from None
        return flight.GeneratorStream(BLOCK_SCHEMA, self._stream(req.layout, req.keys))

    def _stream(self, layout: Layout, keys: list[bytes]):
        if layout.block_nbytes < PACK_BELOW:
            yield from self._packed(layout, keys)
            return
        offsets = pa.py_buffer(np.array([0, layout.block_nbytes], dtype=np.int64))
        for start in range(0, len(keys), ACQUIRE_CHUNK):
            pending = [h for h in self._store.acquire(layout, keys[start:start + ACQUIRE_CHUNK]) if h is not None]
            try:
                while pending:
                    batch = self._batch(pending[0], offsets)
                    pending.pop(0)  # the batch's buffer owns the pin now
                    self._count(blocks_sent=1, bytes_sent=layout.block_nbytes)
                    yield batch
            finally:
                self._store.release(pending)

    def _packed(self, layout: Layout, keys: list[bytes]):
        """Small blocks, several per record batch: each costs gRPC and Python about as much as a
        large one, so they are copied out of the arena (and unpinned at once) into a pooled
        buffer of up to PACK_BYTES, sent as one batch, and the buffer goes back to the pool when
        gRPC lets go of it."""
        n = layout.block_nbytes
        per = max(1, PACK_BYTES // n)
        for start in range(0, len(keys), per):
            handles = [h for h in self._store.acquire(layout, keys[start:start + per]) if h is not None]
            if not handles:
                continue
            buffer = self._pack_pool.take()
            try:
                for j, handle in enumerate(handles):
                    buffer[j * n:(j + 1) * n] = handle.view.numpy()
            finally:
                self._store.release(handles)
            m = len(handles)
            payload = buffer[:m * n]
            weakref.finalize(payload, self._pack_pool.give_back, buffer)
            offsets = pa.py_buffer(np.arange(0, (m + 1) * n, n, dtype=np.int64))
            data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), m, [None, offsets, pa.py_buffer(payload)])
            self._count(blocks_sent=m, bytes_sent=m * n)
            yield pa.RecordBatch.from_arrays([pa.array([h.key for h in handles], pa.binary(16)),
                                              pa.array([h.checksum for h in handles], pa.uint64()), data],
                                             schema=BLOCK_SCHEMA)

    def _batch(self, handle: BlockHandle, offsets: pa.Buffer) -> pa.RecordBatch:
        view = handle.view.numpy()
        store = self._store
        weakref.finalize(view, store.release, [handle])
        data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(view)])
        return pa.RecordBatch.from_arrays([pa.array([handle.key], pa.binary(16)),
                                           pa.array([handle.checksum], pa.uint64()), data], schema=BLOCK_SCHEMA)

    def do_put(self, context, descriptor, reader, writer):
        """Writes a stream of blocks into reserved slots; replies {stored, present, rejected,
        corrupt}: present already, no room (rejected), or arrived damaged (corrupt)."""
        req = self._request(descriptor.command, "put")
        try:
            handles = self._store.reserve(req.layout, req.keys, req.parents)
        except KVStoreError as e:
            self._count(errors=1)
            raise flight.FlightServerError(f"bad put request: {e}") from None
        wanted = {h.key: h for h in handles if h is not None}
        present = sum(h is None and here for h, here in zip(handles, self._store.contains(req.keys)))
        # A stalled sender must not hold its slots forever: past the deadline they are fenced, and
        # the copy below checks the fence before writing each block.
        deadline = threading.Timer(self._put_deadline_s, self._store.fence, [list(wanted.values())])
        deadline.daemon = True
        deadline.start()  # a fence that races the commit or abort below is a no-op (store.fence)
        expected = set(req.keys)
        filled: dict[bytes, tuple[BlockHandle, int]] = {}
        corrupt = 0
        try:
            if reader.schema != BLOCK_SCHEMA:
                raise ProtocolError(f"put stream schema {reader.schema} is not {BLOCK_SCHEMA}")
            for chunk in reader:
                for key, block_sum, data in _rows(chunk.data, req.layout.block_nbytes):
                    if key not in expected:
                        raise ProtocolError(f"put stream carries block {key.hex()}, which the request did not name")
                    expected.discard(key)
                    self._count(blocks_received=1, bytes_received=len(data))
                    handle = wanted.get(key)
                    if handle is None:  # present already, or no room: skip its bytes
                        continue
                    if self._store.fenced(handle):
                        self._count(puts_expired=1)
                        raise TransferError(f"put stream of {len(req.keys)} blocks did not finish within "
                                            f"put_deadline_s={self._put_deadline_s}; its slots were given back")
                    if copy_with_checksum(handle.view, data) != block_sum:
                        corrupt += 1
                        log.warning("put of block %s: the bytes arrived damaged (checksum mismatch); not stored",
                                    key.hex())
                        continue
                    filled[key] = (handle, block_sum)
        except (ProtocolError, TransferError, pa.ArrowException) as e:
            deadline.cancel()
            self._store.abort([h for h in wanted.values() if not self._store.fenced(h)])
            self._count(errors=1)
            raise flight.FlightServerError(f"bad put stream: {e}") from None
        except BaseException:
            deadline.cancel()
            self._store.abort([h for h in wanted.values() if not self._store.fenced(h)])
            raise
        deadline.cancel()
        self._store.abort([h for k, h in wanted.items() if k not in filled and not self._store.fenced(h)])
        stored = self._store.commit([h for h, _ in filled.values()], [s for _, s in filled.values()])
        self._count(corrupt_received=corrupt)
        writer.write(pa.py_buffer(msgpack.packb({"stored": stored, "present": present,
                                                 "rejected": len(req.keys) - len(wanted) - present,
                                                 "corrupt": corrupt})))

    def shutdown(self) -> None:
        super().shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _BufferPool:
    """Touched buffers of one size, reused: a fresh buffer's page faults cost ~10x a copy here."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        buffer = np.empty(self.nbytes, dtype=np.uint8)
        buffer.fill(0)  # fault every page in now, once
        return buffer

    def give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < 16:  # as many as streams in flight; more are let go
                self._free.append(buffer)


def _rows(batch: pa.RecordBatch, block_nbytes: int):
    """(key, checksum, memoryview of the block's bytes) per row, checked; no copy."""
    if batch.schema != BLOCK_SCHEMA:
        raise ProtocolError(f"batch schema {batch.schema} is not {BLOCK_SCHEMA}")
    keys, sums, data = batch.column(0), batch.column(1), batch.column(2)
    if keys.null_count or sums.null_count or data.null_count:
        raise ProtocolError("batch has null keys, checksums or payloads")
    sums = sums.to_numpy()
    _, offsets_buf, data_buf = data.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(data) + 1, offset=data.offset * 8)
    key_bytes = keys.buffers()[1]
    for i in range(len(batch)):
        start, end = int(offsets[i]), int(offsets[i + 1])
        if end - start != block_nbytes:
            raise ProtocolError(f"block payload of {end - start} bytes; the layout's blocks are {block_nbytes}")
        k0 = (keys.offset + i) * 16
        yield key_bytes[k0:k0 + 16].to_pybytes(), int(sums[i]), memoryview(data_buf)[start:end]


class DataPlaneClient:
    """Talks to one node's data-plane server. Thread-safe; reuse it across calls."""

    def __init__(self, address: str, token: str, timeout_s: float = 60.0) -> None:
        self.address = address
        self.corrupt_received = 0  # blocks that arrived with bytes not matching their checksum
        self._client = flight.FlightClient(f"grpc+tcp://{address}", generic_options=_CHANNEL_OPTIONS)
        self._options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())],
                                                 timeout=timeout_s)

    def get(self, layout: Layout, keys: Sequence[bytes], sink: Callable[[bytes, memoryview, int], None],
            verify: bool = True) -> set[bytes]:
        """Streams the blocks the peer has to `sink(key, bytes, checksum)`; returns the keys
        delivered. With `verify`, each block is checked against its checksum first (a damaged one
        is left out and counted); without, the sink must check it (the client does, fused with its
        copy, off the thread that reads the stream)."""
        requested = set(keys)
        received: set[bytes] = set()
        delivered: set[bytes] = set()
        try:
            reader = self._client.do_get(flight.Ticket(encode_request("get", layout, list(keys))), self._options)
            for chunk in reader:
                for key, block_sum, data in _rows(chunk.data, layout.block_nbytes):
                    if key not in requested or key in received:
                        raise ProtocolError(f"peer {self.address} sent block {key.hex()}, unasked or twice")
                    received.add(key)
                    if verify and checksum(data) != block_sum:
                        self.corrupt_received += 1
                        log.warning("block %s from %s arrived damaged (checksum mismatch); it is a miss",
                                    key.hex(), self.address)
                        continue
                    sink(key, data, block_sum)
                    delivered.add(key)
        except flight.FlightError as e:
            raise TransferError(f"get of {len(keys)} blocks from {self.address} failed: {_first_line(e)}") from None
        return delivered

    def put(self, layout: Layout, keys: Sequence[bytes], rows: Sequence[torch.Tensor],
            parents: Sequence[bytes | None] | None = None) -> dict:
        """Pushes blocks (uint8 rows of block_nbytes) to the peer's store; returns its counts."""
        descriptor = flight.FlightDescriptor.for_command(
            encode_request("put", layout, list(keys), None if parents is None else list(parents)))
        try:
            writer, meta_reader = self._client.do_put(descriptor, BLOCK_SCHEMA, self._options)
            with writer:
                for key, row in zip(keys, rows):
                    data = row.cpu().numpy()
                    offsets = pa.py_buffer(np.array([0, data.nbytes], dtype=np.int64))  # the server checks sizes
                    block_sum = checksum(data)
                    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
                    writer.write_batch(pa.RecordBatch.from_arrays(
                        [pa.array([key], pa.binary(16)), pa.array([block_sum], pa.uint64()), data],
                        schema=BLOCK_SCHEMA))
                writer.done_writing()
                reply = meta_reader.read()
        except flight.FlightError as e:
            raise TransferError(f"put of {len(keys)} blocks to {self.address} failed: {_first_line(e)}") from None
        return msgpack.unpackb(reply.to_pybytes()) if reply is not None else {}

    def close(self) -> None:
        self._client.close()


def _first_line(e: Exception) -> str:
    return str(e).split(". Detail:")[0].split("\n")[0]

