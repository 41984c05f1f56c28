"""The data plane: an Arrow Flight server per node, and the client that pulls from and pushes to it.

A client pulls over a *session*: one do_exchange stream per peer, kept open and reused, on which
each get is a request message answered by the blocks' record batches and an end message. That
is one round trip per get, without a new gRPC call's setup (half the cost of a small get here).
do_get answers the same request as a one-shot ticket, for plain Flight clients.

Gets stream blocks straight out of the host arena: each record batch wraps a pinned slot
without copying, and the pin lives exactly as long as Arrow (and gRPC, which serializes
zero-copy) hold that memory, so a slot is never reused while its bytes are still on the way
out. A get may name a hold (a handoff's lease) to give back once its blocks are out. do_put
writes incoming blocks into slots reserved in the store and commits them at the end of the
stream; a stream that does not end within `put_deadline_s` has its slots fenced and is refused.
Every block travels with its checksum, and the receiving side (the client for a get, the server
for a put) checks it: a block that arrives damaged is not delivered, never data.
Every call must carry `authorization: Bearer <token>`: the admin token or a tenant's (checked in
a middleware, kvstore/tenants.py). A tenant's gets and puts name keys in its own scope only, so
another tenant's block is a miss like any absent one. A malformed, oversize or unauthorised
request gets a Flight error that says why, and the server goes on serving. Sessions are bounded in number (MAX_SESSIONS, and MAX_SESSIONS_PER_PEER
from one address, so one client cannot take them all) and in age (the client's
transfer deadline), so a stalled peer ends a get within that deadline.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable, Sequence

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import torch

from kvstore.cluster.protocol import (BLOCK_SCHEMA, SESSION_COMMAND, ProtocolError, decode_reply, decode_request,
                                     encode_reply, encode_request)
from kvstore.errors import KVStoreError, TransferError
from kvstore.integrity import checksum, copy_with_checksum
from kvstore.layout import Layout
from kvstore.store import BlockHandle, TieredStore
from kvstore.tenants import Tenant, Tenants
from kvstore.tls import TLS

log = logging.getLogger(__name__)

ACQUIRE_CHUNK = 16  # blocks pinned at a time per do_get stream
PACK_BELOW = 1024 * 1024  # blocks smaller than this travel several per record batch
PACK_BYTES = 4 * 1024 * 1024  # of one such batch
MIN_LAYER_PIECE = 64 * 1024  # a get by layer sends a block's layers in pieces of at least this much
# Larger blocks travel in pieces of this much, one per batch: the receiver checks and copies a
# piece while the next arrives, instead of waiting for (and gRPC reassembling) a 32 MiB message.
PIECE_BYTES = 4 * 1024 * 1024
DEADLINE_SCALE_BYTES = 256 * 1024 * 1024  # a transfer's deadline grows with each this much it moves
MAX_SESSIONS = 256  # open sessions per server: each holds one of gRPC's threads while it is open
MAX_SESSIONS_PER_PEER = 64  # from one address: a client opens one per get in flight to this server
SESSION_IDLE_S = 2.0  # a client closes a session unused this long (a server's shutdown waits for open ones)
# A large initial HTTP/2 window, without BDP probing: gRPC would otherwise start each channel at
# 64 KiB and grow it over the first few hundred MiB, halving the first pulls' throughput.
_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", 32 * 1024 * 1024), ("grpc.http2.bdp_probe", 0)]
_KEY_TYPE, _U64, _DATA_TYPE = (BLOCK_SCHEMA.field(i).type for i in (0, 1, 3))


def transfer_deadline(base_s: float, nbytes: int) -> float:
    """Seconds one transfer of nbytes may take: base_s (transfer_timeout_s) up to
    DEADLINE_SCALE_BYTES, proportionally more beyond (a peer slower than that is failing)."""
    return base_s * max(1.0, nbytes / DEADLINE_SCALE_BYTES)


class _Caller(flight.ServerMiddleware):
    """Who made a call: the tenant (or admin) its credential belongs to."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant


class _TokenAuth(flight.ServerMiddlewareFactory):
    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    def start_call(self, info, headers):
        for value in headers.get("authorization", []):
            value = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            if value.startswith(b"Bearer "):
                tenant = self._tenants.authenticate(value[len(b"Bearer "):])
                if tenant is not None:
                    return _Caller(tenant)
        raise flight.FlightUnauthenticatedError("missing or wrong token (send 'authorization: Bearer <token>')")


def _tenant(context) -> Tenant:
    return context.get_middleware("auth").tenant


class DataPlaneServer(flight.FlightServerBase):
    """Serves one store's blocks over Flight. Start with `start()`, stop with `shutdown()`."""

    def __init__(self, store: TieredStore, host: str, port: int, token: "str | Tenants", max_request_bytes: int,
                 put_deadline_s: float = 30.0, release_hold: Callable[[str], None] | None = None,
                 tls: TLS | None = None) -> None:
        # With TLS the server listens for TLS only: a plaintext client's handshake fails.
        tenants = token if isinstance(token, Tenants) else Tenants(token)  # the admin's token alone
        super().__init__(f"grpc+tls://{host}:{port}" if tls else f"grpc+tcp://{host}:{port}",
                         tls_certificates=[flight.CertKeyPair(tls.cert_chain, tls.private_key)] if tls else None,
                         middleware={"auth": _TokenAuth(tenants)})
        self.host = host
        self.tls = tls is not None
        self._tenants = tenants
        self._store = store
        self._max_request_bytes = max_request_bytes
        self._put_deadline_s = put_deadline_s
        self._release_hold = release_hold  # gives back a hold named by a get (the node's holds)
        self._pack_pool = _BufferPool(PACK_BYTES)
        self._open: dict[str, int] = {}  # peer address -> its open sessions
        self._counters_lock = threading.Lock()
        self.counters = dict.fromkeys(("requests", "errors", "sessions_opened", "sessions_refused", "blocks_sent",
                                       "bytes_sent", "blocks_received", "bytes_received", "corrupt_received",
                                       "puts_expired"), 0)
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

    def _get_request(self, data: bytes):
        """A checked get request; ProtocolError naming what is wrong."""
        self._count(requests=1)
        try:
            req = decode_request(data, "get", self._max_request_bytes)
            self._store.check_layout(req.layout)
            return req
        except KVStoreError as e:
            self._count(errors=1)
            raise ProtocolError(f"bad get request: {e}") from None

    def do_get(self, context, ticket):
        try:
            req = self._get_request(ticket.ticket)
        except ProtocolError as e:
            raise flight.FlightServerError(str(e)) from None
        return flight.GeneratorStream(BLOCK_SCHEMA, self._stream(req, _tenant(context)))

    def do_exchange(self, context, descriptor, reader, writer):
        """A session: gets one after another, each a metadata-only request answered by its
        blocks' batches and an end message (cluster/protocol.py). A bad request is answered with
        an error message and the session goes on; the client ends it by closing its side."""
        if descriptor.command != SESSION_COMMAND:
            self._count(errors=1)
            raise flight.FlightServerError(f"bad session: command {descriptor.command[:64]!r} is not "
                                           f"{SESSION_COMMAND!r}")
        peer = context.peer().rsplit(":", 1)[0]  # "ipv4:10.0.0.5:41234": the address, not the port
        refused = self._open_session(peer)
        if refused:
            self._count(sessions_refused=1)
            raise flight.FlightServerError(f"{refused}; try again later")
        self._count(sessions_opened=1)
        try:
            writer.begin(BLOCK_SCHEMA)
            while not context.is_cancelled():
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    return
                try:
                    if chunk.data is not None or chunk.app_metadata is None:
                        self._count(errors=1)
                        raise ProtocolError("a session carries metadata-only get requests, not record batches")
                    req = self._get_request(chunk.app_metadata.to_pybytes())
                except ProtocolError as e:
                    writer.write_metadata(pa.py_buffer(encode_reply(error=str(e))))
                    continue
                self._write(writer, req, _tenant(context))
        finally:
            with self._counters_lock:
                self._open[peer] -= 1
                if not self._open[peer]:
                    del self._open[peer]

    def _open_session(self, peer: str) -> str | None:
        """Counts a new session of `peer` in, or says why not (too many open, in all or from it)."""
        with self._counters_lock:
            if sum(self._open.values()) >= MAX_SESSIONS:
                return f"more than {MAX_SESSIONS} sessions open"
            if self._open.get(peer, 0) >= MAX_SESSIONS_PER_PEER:
                return f"more than {MAX_SESSIONS_PER_PEER} sessions open from {peer}"
            self._open[peer] = self._open.get(peer, 0) + 1
        return None

    def _write(self, writer, req, tenant: Tenant) -> None:
        """Writes one get's batches to a session, the end message riding on the last one (one
        message fewer per get). Its own frame, so no reference to the last batch, which owns a
        pin, outlives the get."""
        sent, previous = 0, None
        for batch in self._stream(req, tenant):
            if previous is not None:
                writer.write_batch(previous)
            sent += batch.num_rows
            previous = batch
        reply = pa.py_buffer(encode_reply(sent=sent))
        if previous is None:
            writer.write_metadata(reply)
        else:
            writer.write_with_metadata(previous, reply)

    def _stream(self, req, tenant: Tenant):
        """The blocks of a get request this node has, as record batches; then gives back the hold
        `req.release` (a lease the get ends; the admin's gets only), whether or not its blocks
        were all sent. A tenant's
        keys are looked up in its scope, then in shared tenants' (kvstore/tenants.py), and its
        blocks go out under the keys it asked for."""
        stored = self._tenants.readable(tenant, req.keys, self._store.contains)
        asked = None if tenant.is_admin else dict(zip(stored, req.keys))
        try:
            if req.by_layer:
                batches = self._by_layer(req.layout, stored)
            elif req.layout.block_nbytes < PACK_BELOW:
                batches = self._packed(req.layout, stored)
            else:
                batches = self._whole(req.layout, stored)
            for batch in batches:
                yield batch if asked is None else _renamed(batch, asked)
        finally:
            # Only the admin ends a lease here: a tenant's would be anyone's it could name (its
            # own it ends over HTTP, where the service knows who took it: cluster/leases.py).
            if req.release is not None and self._release_hold is not None and tenant.is_admin:
                self._release_hold(req.release)

    def _whole(self, layout: Layout, keys: list[bytes]):
        """Large blocks, each in pieces straight out of its pinned slot (no copy)."""
        for start in range(0, len(keys), ACQUIRE_CHUNK):
            pending = [h for h in self._store.acquire(layout, keys[start:start + ACQUIRE_CHUNK]) if h is not None]
            try:
                while pending:
                    pieces = self._pieces(pending[0])
                    pending.pop(0)  # the pieces' buffers own the pin now
                    self._count(blocks_sent=1, bytes_sent=layout.block_nbytes)
                    yield from pieces
            finally:
                self._store.release(pending)

    def _packed(self, layout: Layout, keys: list[bytes]):
        """Small blocks, several per record batch: each costs gRPC and Python about as much as a
        large one, so they are copied out of the arena, and unpinned at once."""
        n = layout.block_nbytes
        per = max(1, PACK_BYTES // n)
        for start in range(0, len(keys), per):
            handles = [h for h in self._store.acquire(layout, keys[start:start + per]) if h is not None]
            try:
                batches = list(self._pack((h.key, h.checksum, h.view.numpy(), 0, n) for h in handles))
            finally:
                self._store.release(handles)
            self._count(blocks_sent=len(handles))
            yield from batches

    def _by_layer(self, layout: Layout, keys: list[bytes]):
        """Layer-major (cluster/protocol.py): layer 0 of every block, then layer 1, ...; a layer
        of a block is a small piece, so the pieces of several blocks share a batch. Layers
        smaller than MIN_LAYER_PIECE travel a few at a time (each piece costs the receiver as
        much as its bytes). Every block stays pinned until the stream ends."""
        handles = [h for h in self._store.acquire(layout, keys) if h is not None]
        try:
            views = [(h.key, h.checksum, h.view.numpy()) for h in handles]
            size = layout.layer_nbytes
            per = -(-MIN_LAYER_PIECE // size)  # layers per piece
            groups = [(first * size, min(first + per, layout.num_layers) * size)
                      for first in range(0, layout.num_layers, per)]
            yield from self._pack((key, block_sum, view, start, min(start + PACK_BYTES, group_end))
                                  for group_start, group_end in groups for key, block_sum, view in views
                                  for start in range(group_start, group_end, PACK_BYTES))
            self._count(blocks_sent=len(handles))
        finally:
            self._store.release(handles)

    def _pack(self, parts):
        """Parts of pinned blocks, (key, checksum, bytes, start, end), copied one after another
        into pooled buffers of up to PACK_BYTES, a record batch per buffer (a row per part). A
        buffer goes back to the pool when gRPC lets go of it."""
        rows: list[tuple[bytes, int, int, int]] = []  # (key, checksum, start in the block, start in the buffer)
        buffer, used = None, 0
        for key, block_sum, view, start, end in parts:
            if buffer is not None and used + end - start > PACK_BYTES:
                yield self._packed_batch(buffer, rows, used)
                buffer = None
            if buffer is None:
                buffer, rows, used = self._pack_pool.take(), [], 0
            buffer[used:used + end - start] = view[start:end]
            rows.append((key, block_sum, start, used))
            used += end - start
        if buffer is not None:
            yield self._packed_batch(buffer, rows, used)

    def _packed_batch(self, buffer: np.ndarray, rows: list[tuple[bytes, int, int, int]], used: int) -> pa.RecordBatch:
        payload = buffer[:used]
        weakref.finalize(payload, self._pack_pool.give_back, buffer)
        self._count(bytes_sent=used)
        n = len(rows)
        # The columns straight from buffers: a third of the cost of pa.array on lists, per batch.
        numbers = np.empty((3, n + 1), dtype=np.uint64)  # checksums, offsets in the block, in the buffer
        numbers[:, :n] = [[r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]]
        numbers[2, n] = used
        return pa.RecordBatch.from_arrays([
            pa.Array.from_buffers(_KEY_TYPE, n, [None, pa.py_buffer(b"".join([r[0] for r in rows]))]),
            pa.Array.from_buffers(_U64, n, [None, pa.py_buffer(numbers[0])]),
            pa.Array.from_buffers(_U64, n, [None, pa.py_buffer(numbers[1])]),
            pa.Array.from_buffers(_DATA_TYPE, n, [None, pa.py_buffer(numbers[2]), pa.py_buffer(payload)]),
        ], schema=BLOCK_SCHEMA)

    def _pieces(self, handle: BlockHandle) -> list[pa.RecordBatch]:
        """A pinned block as batches of up to PIECE_BYTES, each wrapping its part of the slot
        without a copy. The pin goes when the last of them is let go: each part is a view of
        the one array the release is tied to."""
        view = handle.view.numpy()
        weakref.finalize(view, self._store.release, [handle])
        key, block_sum = pa.array([handle.key], pa.binary(16)), pa.array([handle.checksum], pa.uint64())
        batches = []
        for start in range(0, len(view), PIECE_BYTES):
            part = view[start:start + PIECE_BYTES]
            offsets = pa.py_buffer(np.array([0, len(part)], dtype=np.int64))
            data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(part)])
            batches.append(pa.RecordBatch.from_arrays([key, block_sum, pa.array([start], pa.uint64()), data],
                                                      schema=BLOCK_SCHEMA))
        return batches

    def do_action(self, context, action):
        raise flight.FlightServerError(f"no action {action.type!r}: this server offers do_get, do_exchange "
                                       "and do_put only")

    def list_actions(self, context):
        return []

    def do_put(self, context, descriptor, reader, writer):
        """Writes a stream of blocks into reserved slots; replies {stored, present, rejected,
        corrupt}: present already, no room (rejected), or arrived damaged (corrupt)."""
        req = self._request(descriptor.command, "put")
        tenant = _tenant(context)  # its blocks are stored in its scope (kvstore/tenants.py)
        stored = tenant.stored(req.keys)
        parents = None if req.parents is None else [None if p is None else tenant.stored([p])[0] for p in req.parents]
        try:
            handles = self._store.reserve(req.layout, stored, parents, owner=None if tenant.is_admin else tenant.name)
        except KVStoreError as e:
            self._count(errors=1)
            raise flight.FlightServerError(f"bad put request: {e}") from None
        wanted = {key: h for key, h in zip(req.keys, handles) if h is not None}  # by the key the stream names
        present = sum(h is None and here for h, here in zip(handles, self._store.contains(stored)))
        # A stalled sender must not hold its slots forever: past the deadline they are fenced, and
        # the copy below checks the fence before writing each block.
        put_deadline_s = transfer_deadline(self._put_deadline_s, len(req.keys) * req.layout.block_nbytes)
        deadline = threading.Timer(put_deadline_s, self._store.fence, [list(wanted.values())])
        deadline.daemon = True
        deadline.start()  # a fence that races the commit or abort below is a no-op (store.fence)
        expected = set(req.keys)
        filled: dict[bytes, tuple[BlockHandle, int]] = {}
        corrupt = 0
        try:
            if reader.schema != BLOCK_SCHEMA:
                raise ProtocolError(f"put stream schema {reader.schema} is not {BLOCK_SCHEMA}")
            for chunk in reader:
                for key, block_sum, offset, data in _rows(chunk.data, req.layout.block_nbytes):
                    if offset != 0 or len(data) != req.layout.block_nbytes:
                        raise ProtocolError(f"put stream carries a piece of block {key.hex()} ({len(data)} bytes at "
                                            f"{offset}); puts send whole blocks")
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
                                            f"{put_deadline_s:.1f} s (transfer_timeout_s={self._put_deadline_s}, more for "
                                            "large puts); its slots were given back")
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


def _renamed(batch: pa.RecordBatch, names: dict[bytes, bytes]) -> pa.RecordBatch:
    """The batch with each row's key replaced by names[key] (the same payload, not copied)."""
    keys = pa.array([names[k] for k in batch.column(0).to_pylist()], pa.binary(16))
    return pa.RecordBatch.from_arrays([keys, *batch.columns[1:]], schema=BLOCK_SCHEMA)


def _rows(batch: pa.RecordBatch, block_nbytes: int):
    """(key, checksum, offset, memoryview of the bytes) per row, checked to fit the block; no copy."""
    if batch.schema != BLOCK_SCHEMA:
        raise ProtocolError(f"batch schema {batch.schema} is not {BLOCK_SCHEMA}")
    keys, sums, places, data = (batch.column(i) for i in range(4))
    if keys.null_count or sums.null_count or places.null_count or data.null_count:
        raise ProtocolError("batch has null keys, checksums, offsets or payloads")
    sums, places = sums.to_numpy(), places.to_numpy()
    _, offsets_buf, data_buf = data.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=len(data) + 1, offset=data.offset * 8)
    key_bytes = keys.buffers()[1]
    for i in range(len(batch)):
        start, end, place = int(offsets[i]), int(offsets[i + 1]), int(places[i])
        if not 0 < end - start <= block_nbytes - place:
            raise ProtocolError(f"payload of {end - start} bytes at offset {place} does not fit a block of "
                                f"{block_nbytes}")
        k0 = (keys.offset + i) * 16
        yield key_bytes[k0:k0 + 16].to_pybytes(), int(sums[i]), place, memoryview(data_buf)[start:end]


class _Session:
    """One open do_exchange stream to a peer, used by one get at a time. Its gRPC deadline is
    twice the deadline of the get that opened it; a get uses a session only if what is left of
    it lies between the get's own deadline and twice that, so a get on a stalled peer ends
    within its deadline, and within twice it at worst."""

    def __init__(self, client: flight.FlightClient, options: flight.FlightCallOptions, lifetime_s: float) -> None:
        self.expires = time.monotonic() + lifetime_s
        self.last_used = time.monotonic()
        self.writer, self.reader = client.do_exchange(flight.FlightDescriptor.for_command(SESSION_COMMAND), options)
        self.writer.begin(BLOCK_SCHEMA)

    def chunks(self, request: bytes):
        """Sends one get request; yields its record batches up to the one carrying the end message."""
        self.writer.write_metadata(pa.py_buffer(request))
        while True:
            chunk = self.reader.read_chunk()
            if chunk.data is not None:
                yield chunk.data
            if chunk.app_metadata is not None:
                decode_reply(chunk.app_metadata.to_pybytes())
                return

    def close(self) -> None:
        """Ends the session cleanly (the server's handler returns)."""
        try:
            self.writer.done_writing()
            self.writer.close()
        except (flight.FlightError, pa.ArrowException, OSError):
            self.cancel()

    def cancel(self) -> None:
        """Drops a session in an unknown state (a get on it failed midway)."""
        try:
            self.reader.cancel()
            self.writer.close()
        except (flight.FlightError, pa.ArrowException, OSError):
            pass


class DataPlaneClient:
    """Talks to one node's data-plane server. Thread-safe; reuse it across calls: it keeps the
    sessions its gets opened, one per concurrent get, and `close_idle` ends unused ones."""

    def __init__(self, address: str, token: str, timeout_s: float = 5.0, tls: TLS | None = None) -> None:
        self.address = address
        self.corrupt_received = 0  # blocks that arrived with bytes not matching their checksum
        self._timeout_s = timeout_s
        if tls is None:
            self._client = flight.FlightClient(f"grpc+tcp://{address}", generic_options=_CHANNEL_OPTIONS)
        else:  # the peer's certificate is checked against the CA under the cluster's one name
            self._client = flight.FlightClient(f"grpc+tls://{address}", tls_root_certs=tls.ca,
                                               override_hostname=tls.server_name, generic_options=_CHANNEL_OPTIONS)
        self._headers = [(b"authorization", f"Bearer {token}".encode())]
        self._idle: list[_Session] = []  # most recently used last
        self._idle_lock = threading.Lock()

    def get(self, layout: Layout, keys: Sequence[bytes], sink: Callable[[bytes, memoryview, int, int], None],
            verify: bool = True, release: str | None = None, by_layer: bool = False) -> set[bytes]:
        """Streams the blocks the peer has to `sink(key, bytes, checksum, offset)`; returns the
        keys delivered. With `verify`, each block is checked against its checksum first (a
        damaged one is left out and counted) and reaches the sink whole (offset 0); without, the
        sink gets a block's pieces in order as they arrive and must check the block (the client
        does, fused with its copy, off the thread that reads the stream). `release`: a hold on
        the peer (a handoff's lease) that it gives back once the blocks are out. `by_layer`: the
        blocks come layer-major (cluster/protocol.py), each layer of a block a piece."""
        nbytes = layout.block_nbytes
        requested = set(keys)
        received: set[bytes] = set()
        partial: dict[bytes, int] = {}  # key -> bytes of it received, while its pieces arrive
        assembling: dict[bytes, bytearray] = {}  # with verify: large blocks, while their pieces arrive
        delivered: set[bytes] = set()
        request = encode_request("get", layout, list(keys), release=release, by_layer=by_layer)
        session = None
        try:
            session = self._take_session(transfer_deadline(self._timeout_s, len(keys) * nbytes))
            for batch in session.chunks(request):
                for key, block_sum, offset, data in _rows(batch, nbytes):
                    if key not in requested or key in received or offset != partial.get(key, 0):
                        raise ProtocolError(f"peer {self.address} sent block {key.hex()} (at {offset}) unasked, "
                                            "twice or out of order")
                    end = offset + len(data)
                    if end < nbytes:
                        partial[key] = end
                    else:
                        partial.pop(key, None)
                        received.add(key)
                    if verify:
                        data = _assembled(assembling, key, data, offset, nbytes)
                        if data is None:
                            continue
                        if checksum(data) != block_sum:
                            self.corrupt_received += 1
                            log.warning("block %s from %s arrived damaged (checksum mismatch); it is a miss",
                                        key.hex(), self.address)
                            continue
                        offset = 0
                    sink(key, data, block_sum, offset)
                    if end == nbytes:
                        delivered.add(key)
            if partial:
                raise ProtocolError(f"peer {self.address} ended blocks {[k.hex() for k in partial][:4]} midway")
        except (flight.FlightError, ProtocolError) as e:
            if session is not None:
                session.cancel()
            raise TransferError(f"get of {len(keys)} blocks from {self.address} failed: {_first_line(e)}") from None
        except BaseException:
            if session is not None:
                session.cancel()
            raise
        self._give_back(session)
        return delivered

    def _take_session(self, deadline_s: float) -> _Session:
        """An idle session with between deadline_s and twice that left, else a new one."""
        now = time.monotonic()
        with self._idle_lock:
            for i in range(len(self._idle) - 1, -1, -1):
                left = self._idle[i].expires - now
                if deadline_s <= left <= 2 * deadline_s:
                    return self._idle.pop(i)
                if left < self._timeout_s:  # too old for any get: close it off this thread
                    threading.Thread(target=self._idle.pop(i).close, daemon=True).start()
        return _Session(self._client, self._call_options(2 * deadline_s), 2 * deadline_s)

    def _call_options(self, timeout_s: float) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=self._headers, timeout=timeout_s)

    def _give_back(self, session: _Session) -> None:
        session.last_used = time.monotonic()
        with self._idle_lock:
            self._idle.append(session)

    def close_idle(self, idle_s: float = SESSION_IDLE_S) -> None:
        """Ends the sessions unused for idle_s: a server shutting down waits for open ones."""
        cutoff = time.monotonic() - idle_s
        with self._idle_lock:
            stale = [s for s in self._idle if s.last_used < cutoff]
            self._idle = [s for s in self._idle if s.last_used >= cutoff]
        for session in stale:
            session.close()

    def put(self, layout: Layout, keys: Sequence[bytes], rows: Sequence[torch.Tensor],
            parents: Sequence[bytes | None] | None = None) -> dict:
        """Pushes blocks (uint8 rows of block_nbytes) to the peer's store; returns its counts."""
        descriptor = flight.FlightDescriptor.for_command(
            encode_request("put", layout, list(keys), None if parents is None else list(parents)))
        try:
            options = self._call_options(transfer_deadline(self._timeout_s, len(keys) * layout.block_nbytes))
            writer, meta_reader = self._client.do_put(descriptor, BLOCK_SCHEMA, options)
            with writer:
                for key, row in zip(keys, rows):
                    data = row.cpu().numpy()
                    offsets = pa.py_buffer(np.array([0, data.nbytes], dtype=np.int64))  # the server checks sizes
                    block_sum = checksum(data)
                    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
                    writer.write_batch(pa.RecordBatch.from_arrays(
                        [pa.array([key], pa.binary(16)), pa.array([block_sum], pa.uint64()),
                         pa.array([0], pa.uint64()), data], schema=BLOCK_SCHEMA))
                writer.done_writing()
                reply = meta_reader.read()
        except flight.FlightError as e:
            raise TransferError(f"put of {len(keys)} blocks to {self.address} failed: {_first_line(e)}") from None
        return msgpack.unpackb(reply.to_pybytes()) if reply is not None else {}

    def close(self) -> None:
        self.close_idle(0)
        self._client.close()


class Peers:
    """A client's data-plane clients, one per peer address, made on first use and shared by its
    threads; a reaper thread ends their idle sessions (a peer shutting down waits for open ones)."""

    def __init__(self, token: str, timeout_s: float, tls: TLS | None) -> None:
        self._token, self._timeout_s, self._tls = token, timeout_s, tls
        self._clients: dict[str, DataPlaneClient] = {}
        self._lock = threading.Lock()  # streams to several owners open their channels concurrently
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._close_idle, name="kvstore-sessions", daemon=True)
        self._reaper.start()

    def get(self, address: str) -> DataPlaneClient:
        with self._lock:
            if self._closed.is_set():
                raise KVStoreError("this kvstore client is closed")
            peer = self._clients.get(address)
            if peer is None:
                peer = self._clients[address] = DataPlaneClient(address, self._token, self._timeout_s, self._tls)
            return peer

    def drop(self, address: str) -> None:
        """Forgets a peer whose transfer failed; its sessions end at their deadlines at worst, so
        they are closed off the caller's thread."""
        with self._lock:
            peer = self._clients.pop(address, None)
        if peer is not None:
            threading.Thread(target=peer.close, daemon=True).start()

    def close(self) -> None:
        """Ends every session and connection; calling it again does nothing."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            peers, self._clients = list(self._clients.values()), {}
        self._reaper.join(timeout=5)
        for peer in peers:
            peer.close()

    def _close_idle(self) -> None:
        while not self._closed.wait(SESSION_IDLE_S / 2):
            with self._lock:
                peers = list(self._clients.values())
            for peer in peers:
                peer.close_idle()


def _assembled(assembling: dict[bytes, bytearray], key: bytes, data: memoryview, offset: int,
               nbytes: int) -> memoryview | None:
    """A block from its pieces: whole once its last piece is in (None before)."""
    if offset == 0 and len(data) == nbytes:
        return data
    if offset == 0:
        assembling[key] = bytearray(nbytes)
    assembling[key][offset:offset + len(data)] = data
    return memoryview(assembling.pop(key)) if offset + len(data) == nbytes else None


def _first_line(e: Exception) -> str:
    return str(e).split(". Detail:")[0].split("\n")[0]

