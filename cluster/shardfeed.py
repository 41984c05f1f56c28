"""A node's block events on their way to the index shards: routed, chunked, numbered, retried.

The store's events, and snapshots of its content, queue in an outbox (the store's listener only
enqueues). Each `flush` routes them to one stream per shard (each key to its shard, see
cluster/shardmap.py; consecutive removals of one medium merged, so an eviction round is one
event), cuts each stream's backlog into chunks of at most `chunk_limit()` bytes and sends one
chunk to every shard that has one, all at once, then waits for the answers.

A chunk that fails (the shard is restarting, a timeout) is sent again later, the same chunk
under the same number, after a backoff that doubles up to BACKOFF_MAX_S; the shard applies it
once. Nothing else is ever resent: only a shard that answers "resync" (it restarted and lost the
stream) gets a snapshot, and only of its own share, as a new stream whose last snapshot chunk
is marked synced. An idle stream sends an empty chunk every HEARTBEAT_S, so a shard that
restarted while this node had nothing to say still gets its share. A shard unreachable for long
does not make the node hoard events: past MAX_BACKLOG_KEYS its backlog is dropped and a
snapshot taken once it answers again.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np
import ray

from kvstore import events as event_wire
from kvstore.cluster.index import keys_array
from kvstore.cluster.shardmap import shard_actor_name, shards_of
from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, Event, coalesce, encode_batch

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024  # one message's bound (and events.MAX_EVENT_BATCH_BYTES, if smaller)
KEY_WIRE_BYTES = 18  # msgpack bin8 header + 16 bytes
EVENT_WIRE_BYTES = 64  # an event's tag, medium, parent and array headers, generously
MAX_BACKLOG_KEYS = 4_000_000
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 5.0
SEND_TIMEOUT_S = 10.0  # a shard restarting elsewhere after its node died takes seconds; then the chunk goes again
DRAIN_TIMEOUT_S = 30.0
ALL = None  # snapshot targets: every shard
HEARTBEAT_S = 1.0  # an idle stream sends an empty chunk this often
EMPTY_CHUNK = encode_batch([], ts=0.0)
OK, RESYNC, DROPPED = "ok", "resync", "dropped"  # a shard's answers to a chunk (see cluster/shards.py)


def chunk_limit() -> int:
    return min(CHUNK_BYTES, event_wire.MAX_EVENT_BATCH_BYTES)


class ShardTransport(Protocol):
    def count(self) -> int | None:
        """How many shards the cluster has; None while that is not known yet."""

    def send(self, shard: int, node_id: str, stream: str, seq: int, payload: bytes, synced: bool) -> object:
        """Starts delivering one chunk; returns something `wait` resolves."""

    def wait(self, pending: Sequence[object], timeout_s: float) -> list[object]:
        """Per sent chunk, the shard's answer or the exception that ended the attempt."""


@dataclasses.dataclass
class _Chunk:
    seq: int
    payload: bytes
    synced: bool
    first_entry: int | None  # the outbox entry its first event came from (None: an empty chunk)


_SYNCED = object()  # in a stream's backlog: the snapshot before it is complete


@dataclasses.dataclass
class _Stream:
    id: str = ""
    next_seq: int = 0
    backlog: list = dataclasses.field(default_factory=list)  # (outbox entry, event or _SYNCED), in order
    backlog_keys: int = 0
    inflight: _Chunk | None = None
    retry_at: float = 0.0
    backoff: float = BACKOFF_MIN_S
    snapshot_when_back: bool = False
    superseded: int | None = None  # oldest outbox entry of events dropped for a snapshot not yet applied
    answered_at: float = 0.0  # when the shard last answered a chunk

    def restart(self) -> None:
        """A new stream: whatever was queued is superseded by the snapshot that starts it."""
        self.supersede()
        self.id, self.next_seq = secrets.token_hex(8), 0
        self.snapshot_when_back = False

    def supersede(self) -> None:
        """Drops what is queued and in flight: a snapshot will carry it (drain waits for that)."""
        self.superseded = self.oldest_entry()
        self.backlog, self.backlog_keys, self.inflight = [], 0, None

    @property
    def busy(self) -> bool:
        return self.inflight is not None or bool(self.backlog)

    def oldest_entry(self) -> int | None:
        """The outbox entry of the oldest event the shard has not applied; None: none left."""
        pending = (self.superseded, self.inflight.first_entry if self.inflight else None,
                   self.backlog[0][0] if self.backlog else None)
        return min((e for e in pending if e is not None), default=None)


class ShardFeed:
    def __init__(self, node_id: str, transport: ShardTransport, snapshot: Callable[[], None]) -> None:
        """`snapshot` makes the store announce its whole content (AllBlocksCleared, then every
        block) through its listener, which calls `enqueue`, on the calling thread."""
        self.node_id = node_id
        self._transport = transport
        self._snapshot = snapshot
        # (entry number, None for live events | a snapshot's target shards, events)
        self._outbox: list[tuple[int, frozenset | None, list[Event]]] = []
        self._entries = 0  # outbox entries ever queued
        self._routed = 0  # outbox entries routed to the streams
        self._outbox_lock = threading.Lock()
        self._send_lock = threading.Lock()  # one sender at a time: chunks leave in order
        self._snapshot_lock = threading.Lock()
        self._snapshotting: tuple[int, frozenset | None] | None = None  # (thread, targets) of a snapshot now
        self._streams: list[_Stream] = []
        self.counters = {"chunks_sent": 0, "chunks_failed": 0, "snapshots": 0, "backlogs_dropped": 0}

    # -- in --------------------------------------------------------------------------------

    def enqueue(self, events: list[Event]) -> None:
        """The store's listener: queues events (a snapshot's, when one is being taken here)."""
        taking = self._snapshotting
        live = taking is None or taking[0] != threading.get_ident() or not events \
            or not isinstance(events[0], AllBlocksCleared)
        with self._outbox_lock:
            self._outbox.append((self._entries, None if live else taking[1] or frozenset({ALL}), events))
            self._entries += 1

    def resync(self, shards: set[int] | None = ALL) -> None:
        """Sends these shards (all when None) a snapshot of their share, each as a new stream."""
        with self._snapshot_lock:
            self._snapshotting = (threading.get_ident(), None if shards is ALL else frozenset(shards))
            try:
                self._snapshot()
            finally:
                self._snapshotting = None
        self.counters["snapshots"] += 1

    # -- out -------------------------------------------------------------------------------

    def flush(self) -> bool:
        """One round: routes the outbox and sends each shard its next chunk (a failed one again,
        once its backoff has passed). Returns whether anything is still left to deliver."""
        with self._send_lock:
            count = self._transport.count()
            if count is None:
                return True
            if not self._streams:
                self._streams = [_Stream() for _ in range(count)]
            self._route()
            resync = self._send_round()
        if resync:
            self.resync(resync)
        return self.pending()

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Flushes until every event queued before this call has reached its shard (events
        queued meanwhile do not hold it up), or `timeout_s` passes; returns whether they did."""
        deadline = time.monotonic() + timeout_s
        with self._outbox_lock:
            upto = self._entries
        while True:
            self.flush()
            if self._delivered(upto):
                return True
            if time.monotonic() > deadline:
                return False
            waits = [s.retry_at for s in self._streams if s.busy]
            time.sleep(min(max(min(waits, default=0) - time.monotonic(), 0.001), 0.05))

    def _delivered(self, upto: int) -> bool:
        """Whether every event of the first `upto` outbox entries has been applied."""
        with self._send_lock:
            if not self._streams or self._routed < upto:
                return False
            return all(s.oldest_entry() is None or s.oldest_entry() >= upto for s in self._streams)

    def pending(self) -> bool:
        with self._outbox_lock:
            if self._outbox:
                return True
        return not self._streams or any(s.busy for s in self._streams)

    def stats(self) -> dict:
        return {**self.counters, "backlog_keys": sum(s.backlog_keys for s in self._streams),
                "shards_backing_off": sum(s.retry_at > time.monotonic() for s in self._streams)}

    # -- internals ---------------------------------------------------------------------------

    def _route(self) -> None:
        with self._outbox_lock:
            outbox, self._outbox = self._outbox, []
        count = len(self._streams)
        for entry, targets, events in outbox:
            if targets is not None:
                shards = range(count) if ALL in targets else sorted(s for s in targets if s < count)
                for shard in shards:
                    self._streams[shard].restart()
            else:
                shards = range(count)
            for shard, event in split_by_shard(events, count):
                if shard in shards:
                    self._queue(shard, entry, event)
            if targets is not None:
                for shard in shards:
                    self._streams[shard].backlog.append((entry, _SYNCED))
            self._routed = entry + 1

    def _queue(self, shard: int, entry: int, event: Event) -> None:
        stream = self._streams[shard]
        stream.backlog.append((entry, event))
        stream.backlog_keys += len(getattr(event, "block_hashes", ()))
        if stream.backlog_keys > MAX_BACKLOG_KEYS and stream.inflight is not None:
            log.warning("index shard %d unreachable with %d events queued; dropping them and sending a snapshot "
                        "once it answers", shard, stream.backlog_keys)
            inflight, stream.inflight = stream.inflight, None
            stream.supersede()
            stream.inflight = inflight  # still retried: its answer tells when the shard is back
            stream.snapshot_when_back = True
            self.counters["backlogs_dropped"] += 1

    def _send_round(self) -> set[int]:
        """Sends one chunk per ready shard, waits for the answers; returns the shards to resync."""
        now = time.monotonic()
        sent: list[tuple[int, object]] = []
        for shard, stream in enumerate(self._streams):
            if stream.retry_at > now:
                continue
            if not stream.busy:
                if not stream.id or now - stream.answered_at < HEARTBEAT_S:
                    continue
                # An empty chunk now and then: a shard that restarted while this node had nothing
                # to send says "resync" to it, so no idle node leaves a rebuilt shard without its share.
                stream.inflight = _Chunk(stream.next_seq, EMPTY_CHUNK, False, None)
                stream.next_seq += 1
            if stream.inflight is None:
                stream.inflight = self._cut(stream)
            chunk = stream.inflight
            try:
                sent.append((shard, self._transport.send(shard, self.node_id, stream.id, chunk.seq, chunk.payload,
                                                         chunk.synced)))
            except Exception as e:
                self._failed(shard, stream, e)
        if not sent:
            return set()
        resync = set()
        answers = self._transport.wait([p for _, p in sent], SEND_TIMEOUT_S)
        for (shard, _), answer in zip(sent, answers):
            stream = self._streams[shard]
            if isinstance(answer, Exception):
                self._failed(shard, stream, answer)
                continue
            self.counters["chunks_sent"] += 1
            chunk = stream.inflight
            stream.inflight, stream.backoff, stream.retry_at = None, BACKOFF_MIN_S, 0.0
            stream.answered_at = time.monotonic()
            if answer == RESYNC:  # not applied: the snapshot asked for carries it and what follows
                stream.inflight = chunk
                stream.supersede()
                resync.add(shard)
            elif answer == DROPPED:  # this node was declared dead: nothing it sends counts
                stream.backlog, stream.backlog_keys, stream.superseded = [], 0, None
            elif answer != OK:
                log.error("index shard %d answered %r to chunk %d", shard, answer, chunk.seq)
            elif chunk.synced:
                stream.superseded = None
            if stream.snapshot_when_back:
                resync.add(shard)
        return resync

    def _failed(self, shard: int, stream: _Stream, error: BaseException) -> None:
        self.counters["chunks_failed"] += 1
        log.info("index shard %d did not take chunk %d (%s); again in %.2f s", shard, stream.inflight.seq,
                 type(error).__name__, stream.backoff)
        stream.retry_at = time.monotonic() + stream.backoff
        stream.backoff = min(stream.backoff * 2, BACKOFF_MAX_S)
        forget = getattr(self._transport, "forget", None)
        if forget is not None:
            forget(shard)

    def _cut(self, stream: _Stream) -> _Chunk:
        """The next chunk of the stream's backlog: as many events as fit in chunk_limit() bytes
        (a large event is split; what is taken is then coalesced), ending early at the end of a
        snapshot."""
        room = chunk_limit() - EVENT_WIRE_BYTES
        taken: list[Event] = []
        synced = False
        first_entry = stream.backlog[0][0]
        i = 0
        while i < len(stream.backlog) and room > EVENT_WIRE_BYTES:
            entry, item = stream.backlog[i]
            i += 1
            if item is _SYNCED:
                synced = True
                break
            keys = getattr(item, "block_hashes", [])
            fits = (room - EVENT_WIRE_BYTES) // KEY_WIRE_BYTES
            if len(keys) > fits:
                if fits:
                    head, tail = _split_event(item, fits)
                    taken.append(head)
                    stream.backlog[i - 1] = (entry, tail)
                i -= 1
                break
            taken.append(item)
            room -= EVENT_WIRE_BYTES + KEY_WIRE_BYTES * len(keys)
        del stream.backlog[:i]
        stream.backlog_keys -= sum(len(getattr(e, "block_hashes", ())) for e in taken)
        chunk = _Chunk(stream.next_seq, encode_batch(coalesce(taken)), synced, first_entry)
        stream.next_seq += 1
        return chunk


def split_by_shard(events: list[Event], count: int):
    """(shard, event) for each event's share in each shard, in order; AllBlocksCleared goes to all."""
    for event in events:
        if isinstance(event, AllBlocksCleared):
            for shard in range(count):
                yield shard, event
            continue
        keys = event.block_hashes
        if not keys:
            continue
        shard_of = shards_of(keys_array(keys), count)
        for shard in np.unique(shard_of).tolist():
            mine = [keys[i] for i in np.nonzero(shard_of == shard)[0].tolist()]
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash if len(mine) == len(keys) else None
                yield shard, dataclasses.replace(event, block_hashes=mine, parent_block_hash=parent)
            else:
                yield shard, BlockRemoved(mine, event.medium)


def _split_event(event: Event, n: int) -> tuple[Event, Event]:
    """The first n keys of an event and the rest, as two events of the same kind."""
    head, tail = event.block_hashes[:n], event.block_hashes[n:]
    if isinstance(event, BlockStored):
        return (dataclasses.replace(event, block_hashes=head),
                dataclasses.replace(event, block_hashes=tail, parent_block_hash=head[-1]))
    return BlockRemoved(head, event.medium), BlockRemoved(tail, event.medium)


class RayShards:
    """The shards as Ray actors, found by name in the cluster's namespace."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._handles: dict[int, object] = {}
        self._count: int | None = None

    def count(self) -> int | None:
        if self._count is None:
            try:
                self._count = int(ray.get(self._handle(0).describe.remote(), timeout=10)["count"])
            except Exception as e:  # the controller has not placed the shards yet
                log.info("index shards not found yet (%s)", type(e).__name__)
                self._handles.pop(0, None)
        return self._count

    def send(self, shard: int, node_id: str, stream: str, seq: int, payload: bytes, synced: bool) -> object:
        return self._handle(shard).apply.remote(node_id, stream, seq, payload, synced)

    def wait(self, pending: Sequence[object], timeout_s: float) -> list[object]:
        deadline = time.monotonic() + timeout_s
        answers = []
        for ref in pending:
            try:
                answers.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001)))
            except Exception as e:
                answers.append(e)
        return answers

    def forget(self, shard: int) -> None:
        """The handle may be stale (the actor was killed for good and placed again): find it anew."""
        self._handles.pop(shard, None)

    def _handle(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = ray.get_actor(shard_actor_name(shard), namespace=self._namespace)
        return handle
