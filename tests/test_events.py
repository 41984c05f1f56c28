"""Block events: vLLM's tagged-array shapes over msgpack; malformed batches are refused."""
from __future__ import annotations

import os

import msgpack
import pytest

from kvstore import events as ev
from kvstore.events import (AllBlocksCleared, BlockRemoved, BlockStored, EventDecodeError, coalesce, decode_batch,
                            encode_batch, stored_events)

A, B, C, D = (os.urandom(16) for _ in range(4))


def test_round_trip():
    batch = [
        BlockStored([A, B], None, "GPU", token_ids=[1, 2, 3], block_size=16, lora_id=7),
        BlockStored([C], B, "CPU"),
        BlockRemoved([A], "GPU"),
        AllBlocksCleared(),
    ]
    ts, decoded = decode_batch(encode_batch(batch, ts=1234.5))
    assert ts == 1234.5
    assert decoded == batch


def test_default_timestamp_is_now():
    import time

    before = time.time()
    ts, decoded = decode_batch(encode_batch([]))
    assert before <= ts <= time.time() and decoded == []


def test_wire_shape_is_vllms_tagged_arrays():
    data = encode_batch([BlockStored([A, B], C, "DISK", [5, 6], 16, None), BlockRemoved([D], "CPU"),
                         AllBlocksCleared()], ts=1.0)
    raw = msgpack.unpackb(data, raw=False)
    assert raw == [
        1.0,
        [
            # tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium
            ["BlockStored", [A, B], C, [5, 6], 16, None, "DISK"],
            ["BlockRemoved", [D], "CPU"],
            ["AllBlocksCleared"],
        ],
    ]
    # Hashes travel as msgpack bin, not str.
    assert isinstance(msgpack.unpackb(data, raw=True)[1][0][1][0], bytes)


def test_stored_events_groups_chains():
    assert stored_events([], [], "GPU") == []
    # One chain: one event with the chain's parent.
    assert stored_events([A, B, C], [D, A, B], "GPU") == [BlockStored([A, B, C], D, "GPU")]
    # A break in the chain starts a new event.
    assert stored_events([A, B, C], [None, A, None], "CPU") == [
        BlockStored([A, B], None, "CPU"), BlockStored([C], None, "CPU")]
    assert stored_events([A, B], [None, None], "DISK") == [
        BlockStored([A], None, "DISK"), BlockStored([B], None, "DISK")]


MALFORMED = {
    "empty": b"",
    "not msgpack": b"\xc1",
    "truncated": encode_batch([BlockRemoved([A], "GPU")], ts=1.0)[:-3],
    "trailing bytes": encode_batch([], ts=1.0) + b"\x00",
    "an int": msgpack.packb(5),
    "one element": msgpack.packb([1.0]),
    "three elements": msgpack.packb([1.0, [], 3]),
    "events not a list": msgpack.packb([1.0, 5]),
    "event not a list": msgpack.packb([1.0, [5]]),
    "event a map": msgpack.packb([1.0, [{"a": 1}]]),
    "empty event": msgpack.packb([1.0, [[]]]),
    "unknown tag": msgpack.packb([1.0, [["BlockEvicted", [A], "GPU"]]]),
    "stored too short": msgpack.packb([1.0, [["BlockStored", [A], None]]]),
    "removed too long": msgpack.packb([1.0, [["BlockRemoved", [A], "GPU", 1]]]),
    "hashes not a list": msgpack.packb([1.0, [["BlockRemoved", 5, "GPU"]]]),
    "ts not a number": msgpack.packb(["yesterday", []]),
    "ts a list": msgpack.packb([[1], []]),
    "bad utf-8": b"\x92\xcb" + b"\0" * 8 + b"\x91\x93\xa5\xff\xfe\xfd\xfc\xfb\x90\xa3GPU",
    "map with int keys": msgpack.packb({1: 2}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_batches_raise_event_decode_error(name):
    with pytest.raises(EventDecodeError) as info:
        decode_batch(MALFORMED[name])
    assert isinstance(info.value, ValueError)


def test_unknown_tag_is_named():
    with pytest.raises(EventDecodeError, match="'BlockEvicted'"):
        decode_batch(MALFORMED["unknown tag"])


def test_oversized_batch_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(ev, "MAX_EVENT_BATCH_BYTES", 64)
    data = encode_batch([BlockRemoved([A, B, C, D], "GPU")], ts=1.0)
    assert len(data) > 64
    with pytest.raises(EventDecodeError, match=f"{len(data)} bytes"):
        decode_batch(data)


def test_all_blocks_cleared_with_extra_fields_is_refused():
    import msgpack

    from kvstore.events import EventDecodeError, decode_batch

    with pytest.raises(EventDecodeError, match="unexpected fields"):
        decode_batch(msgpack.packb([1.0, [["AllBlocksCleared", "extra"]]]))


def test_coalesce_merges_removal_rounds_and_chain_runs_only():
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    events = [BlockRemoved([a], "CPU"), BlockRemoved([b], "CPU"), BlockRemoved([c], "DISK"),
              BlockStored([a], None, "CPU"), BlockStored([b], a, "CPU"),  # one chain: merged
              BlockStored([d], None, "CPU"),  # a new chain: kept apart (its parent says so)
              AllBlocksCleared(), BlockRemoved([d], "CPU")]
    merged = coalesce(events)
    assert [e.to_wire() for e in merged] == [
        ["BlockRemoved", [a, b], "CPU"], ["BlockRemoved", [c], "DISK"],
        ["BlockStored", [a, b], None, [], 0, None, "CPU"], ["BlockStored", [d], None, [], 0, None, "CPU"],
        ["AllBlocksCleared"], ["BlockRemoved", [d], "CPU"]]
    assert events[0].block_hashes == [a], "the caller's events are not changed"
