"""Block events, in the shape of vLLM's KV events, encoded with msgpack.

A store announces what it stores and drops as `BlockStored` / `BlockRemoved` /
`AllBlocksCleared` (block hashes are our 16-byte keys, `medium` the tier's). Between a node and
the index shards they travel as `[ts, [event, ...]]` with each event a tagged array,
`["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]`,
`["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]` (vLLM's older array shape:
compact, and bounded when decoded). For routers, cluster/kvevents.py publishes the same events
as vLLM's current classes encode them. A block moving between tiers is a BlockRemoved from one
medium and a BlockStored on the other, as vLLM reports its own CPU offloading.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence, Union

import msgpack

from kvstore.errors import KVStoreError

MAX_EVENT_BATCH_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BlockStored:
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    medium: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    block_size: int = 0
    lora_id: int | None = None

    def to_wire(self) -> list:
        return ["BlockStored", self.block_hashes, self.parent_block_hash, self.token_ids,
                self.block_size, self.lora_id, self.medium]


@dataclasses.dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[bytes]
    medium: str

    def to_wire(self) -> list:
        return ["BlockRemoved", self.block_hashes, self.medium]


@dataclasses.dataclass(frozen=True)
class AllBlocksCleared:
    def to_wire(self) -> list:
        return ["AllBlocksCleared"]


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


def stored_events(keys: Sequence[bytes], parents: Sequence[bytes | None], medium: str) -> list[BlockStored]:
    """One BlockStored per run of keys that form a chain (each the parent of the next)."""
    events: list[BlockStored] = []
    run: list[bytes] = []
    run_parent: bytes | None = None
    for key, parent in zip(keys, parents):
        if run and parent == run[-1]:
            run.append(key)
            continue
        if run:
            events.append(BlockStored(run, run_parent, medium))
        run, run_parent = [key], parent
    if run:
        events.append(BlockStored(run, run_parent, medium))
    return events


def coalesce(events: Sequence[Event]) -> list[Event]:
    """The same events in fewer: consecutive BlockRemoved of one medium become one (the store
    announces each evicted block on its own; a round of evictions travels as one event), and a
    BlockStored that continues the chain of the one before (its parent is that one's last block,
    same medium, no token ids) joins it. Order, and so meaning, is kept."""
    out: list[Event] = []
    owned = False  # out[-1]'s list of hashes is a copy made here, so it may grow in place
    for event in events:
        last = out[-1] if out else None
        if _continues(last, event):
            if not owned:
                out[-1] = last = dataclasses.replace(last, block_hashes=list(last.block_hashes))
                owned = True
            last.block_hashes.extend(event.block_hashes)
        else:
            out.append(event)
            owned = False
    return out


def _continues(last: Event | None, event: Event) -> bool:
    if isinstance(event, BlockRemoved):
        return isinstance(last, BlockRemoved) and last.medium == event.medium
    return (isinstance(event, BlockStored) and isinstance(last, BlockStored) and last.medium == event.medium
            and bool(last.block_hashes) and event.parent_block_hash == last.block_hashes[-1]
            and not last.token_ids and not event.token_ids and last.lora_id == event.lora_id)


def encode_batch(events: Sequence[Event], ts: float | None = None) -> bytes:
    """msgpack of `[ts, [event, ...]]`, vLLM's EventBatch shape."""
    return msgpack.packb([time.time() if ts is None else ts, [e.to_wire() for e in events]], use_bin_type=True)


class EventDecodeError(KVStoreError, ValueError):
    """An event batch is not msgpack in the shape encode_batch writes."""


def decode_batch(data: bytes) -> tuple[float, list[Event]]:
    if len(data) > MAX_EVENT_BATCH_BYTES:
        raise EventDecodeError(f"event batch of {len(data)} bytes exceeds {MAX_EVENT_BATCH_BYTES}")
    try:
        ts, raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        events: list[Event] = []
        for item in raw:
            tag = item[0]
            if tag == "BlockStored":
                _, hashes, parent, token_ids, block_size, lora_id, medium = item
                events.append(BlockStored(list(hashes), parent, medium, list(token_ids), block_size, lora_id))
            elif tag == "BlockRemoved":
                _, hashes, medium = item
                events.append(BlockRemoved(list(hashes), medium))
            elif tag == "AllBlocksCleared":
                if len(item) != 1:
                    raise EventDecodeError(f"AllBlocksCleared carries {len(item) - 1} unexpected fields")
                events.append(AllBlocksCleared())
            else:
                raise EventDecodeError(f"unknown event tag {tag!r}")
        return float(ts), events
    except EventDecodeError:
        raise
    except (ValueError, TypeError, LookupError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise EventDecodeError(f"malformed event batch ({len(data)} bytes): {e}") from None
