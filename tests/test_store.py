"""TieredStore on one node: the batched API over one, two and three tiers, demotion, promotion,
prefix-aware eviction, deletes under readers, movers and writers, layouts, and events."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kvstore import Layout, TieredStore, block_keys, chain_parents
from kvstore.config import load_config
from kvstore.errors import InvalidLayoutError, LayoutMismatchError
from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch, encode_batch

from kvtest_support import (LAYOUT, NBYTES, SHM_PREFIX, EventLog, assert_consistent, batch, empty_out,
                            leftover_arenas, make_store, mem_capacity, nvme_capacity, payload, rand_key,
                            used_slots)

__all__ = ["make_store"]  # the fixture, imported for pytest

SPECS = {
    "host": ("host",),
    "host+nvme": ("host", "nvme"),
    "hbm+host+nvme": ("hbm", "host", "nvme"),
}
MEDIUM_OF = {"hbm": "GPU", "host": "CPU", "nvme": "DISK"}


def keys_of(n: int) -> list[bytes]:
    return [rand_key() for _ in range(n)]


def read(store, keys, layout=LAYOUT):
    out = empty_out(len(keys))
    res = store.get(layout, keys, out)
    return res, out


class Gate:
    """Holds one call of a tier method until released, so a test can act in the middle of it."""

    def __init__(self, obj, method: str) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.armed = False
        orig = getattr(obj, method)

        def gated(items, *args):
            if self.armed:
                self.armed = False
                self.entered.set()
                assert self.go.wait(10), "gate never released"
            return orig(items, *args)

        setattr(obj, method, gated)


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # reported by the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


# -- the basic API on every tier stack ------------------------------------------------------

@pytest.mark.parametrize("spec", sorted(SPECS))
def test_put_get_contains_where_delete_clear_stats(make_store, spec):
    log = EventLog()
    store = make_store(SPECS[spec], listener=log)
    top = SPECS[spec][0]
    keys = keys_of(3)
    res = store.put(LAYOUT, keys, batch(keys))
    assert (res.stored, res.present, res.rejected) == (3, 0, [])

    got, out = read(store, keys)
    assert got.tiers == [top] * 3 and got.found == [True] * 3 and got.hits == 3
    assert torch.equal(out, batch(keys))

    missing = rand_key()
    got, out = read(store, [keys[0], missing, keys[2]])
    assert got.tiers == [top, None, top]
    assert torch.equal(out[0], payload(keys[0])) and torch.equal(out[2], payload(keys[2]))
    assert torch.all(out[1] == 0xAB)  # a miss leaves the caller's buffer alone

    assert store.contains(keys + [missing]) == [True, True, True, False]
    assert store.where([missing, keys[1]]) == [None, top]
    assert store.longest_prefix(keys + [missing]) == 3
    assert store.longest_prefix([missing] + keys) == 0
    assert store.longest_prefix([]) == 0

    again = store.put(LAYOUT, keys[:2] + [missing], batch(keys[:2] + [missing], version=1))
    assert (again.stored, again.present) == (1, 2)
    got, out = read(store, keys[:2])
    assert torch.equal(out, batch(keys[:2]))  # a present key is not overwritten

    stats = store.stats()
    assert stats["blocks"] == 4 and stats["slot_bytes"] == NBYTES
    assert (stats["puts"], stats["put_present"], stats["put_rejected"]) == (6, 2, 0)
    assert (stats["gets"], stats["hits"], stats["misses"]) == (8, 7, 1)
    assert [t["name"] for t in stats["tiers"]] == list(SPECS[spec])
    assert stats["tiers"][0]["used_slots"] == 4 and stats["tiers"][0]["hits"] == 7
    assert_consistent(store)

    assert store.delete([keys[0], missing, rand_key()]) == 2
    assert store.delete([keys[0]]) == 0
    assert store.contains(keys) == [False, True, True]
    assert store.longest_prefix(keys) == 0
    assert store.stats()["deletes"] == 2
    assert_consistent(store)

    store.clear()
    assert store.contains(keys + [missing]) == [False] * 4
    assert store.stats()["blocks"] == 0
    assert_consistent(store)
    assert isinstance(log.events[-1], AllBlocksCleared)
    # Usable after clear.
    assert store.put(LAYOUT, keys, batch(keys)).stored == 3
    assert torch.equal(read(store, keys)[1], batch(keys))


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_typed_and_listed_buffers(make_store, spec):
    store = make_store(SPECS[spec])
    keys = keys_of(2)
    data = torch.randn((2, *LAYOUT.block_shape)).to(torch.float16)
    assert store.put(LAYOUT, keys, data).stored == 2
    out = torch.zeros_like(data)
    assert store.get(LAYOUT, keys, out).hits == 2
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))
    outs = [np.zeros(NBYTES, dtype=np.uint8), torch.zeros(LAYOUT.block_shape, dtype=torch.float16)]
    assert store.get(LAYOUT, keys[::-1], outs).hits == 2
    assert outs[0].tobytes() == data[1].numpy().tobytes()
    assert outs[1].numpy().tobytes() == data[0].numpy().tobytes()


def test_empty_batches(make_store):
    store = make_store()
    assert store.put(LAYOUT, [], batch([])).stored == 0
    assert store.get(LAYOUT, [], empty_out(0)).tiers == []
    assert store.contains([]) == [] and store.where([]) == [] and store.delete([]) == 0
    assert_consistent(store)


def test_from_config(tmp_path):
    cfg = load_config(env={}, slot_bytes=NBYTES, hbm_tier_bytes=mem_capacity(2), host_tier_bytes=mem_capacity(4),
                      nvme_tier_bytes=nvme_capacity(8), nvme_path=str(tmp_path / "nv"), shm_prefix=SHM_PREFIX)
    with TieredStore.from_config(cfg) as store:
        assert [t.name for t in store.tiers] == ["hbm", "host", "nvme"]
        assert [t.num_slots for t in store.tiers] == [2, 4, 8]
        assert store.tiers[1].shm_name.startswith(SHM_PREFIX)
        keys = keys_of(10)
        assert store.put(LAYOUT, keys, batch(keys)).stored == 10
        assert read(store, keys)[0].hits == 10
    assert not leftover_arenas(remove=True)


def test_tiers_must_agree():
    with pytest.raises(InvalidLayoutError, match="at least one tier"):
        TieredStore([])


def test_tiers_with_different_slot_sizes(make_store):
    tiers = make_store.tiers(("hbm",)) + make_store.tiers(("hbm",), slot_nbytes=2 * NBYTES)
    with pytest.raises(InvalidLayoutError, match=r"\[2048, 4096\]"):
        TieredStore(tiers)


# -- demotion, promotion, spilling ----------------------------------------------------------

def test_demotion_down_the_tiers_and_drop_at_the_bottom(make_store):
    log = EventLog()
    store = make_store(("hbm", "host", "nvme"), hbm_slots=2, host_slots=2, nvme_slots=4, listener=log)
    keys = keys_of(10)
    for k in keys[:8]:
        assert store.put(LAYOUT, [k], batch([k])).stored == 1
    assert store.where(keys[:8]) == ["nvme"] * 4 + ["host"] * 2 + ["hbm"] * 2
    stats = store.stats()
    assert [t["demotions"] for t in stats["tiers"]] == [6, 4, 0]
    assert [t["evictions"] for t in stats["tiers"]] == [0, 0, 0]
    assert [t["used_slots"] for t in stats["tiers"]] == [2, 2, 4]
    for k in keys[8:]:
        store.put(LAYOUT, [k], batch([k]))
    # Full everywhere: the two oldest fell out of the bottom tier.
    assert store.contains(keys) == [False, False] + [True] * 8
    stats = store.stats()
    assert [t["evictions"] for t in stats["tiers"]] == [0, 0, 2]
    assert stats["blocks"] == 8
    dropped = [e for e in log.of(BlockRemoved) if e.medium == "DISK"]
    assert [e.block_hashes for e in dropped] == [[keys[0]], [keys[1]]]
    got, out = read(store, keys[2:])
    assert got.hits == 8 and torch.equal(out, batch(keys[2:]))
    assert_consistent(store)
    # The event log's idea of where every block is matches the store's.
    assert {k: m for k, m in log.where.items()} == {
        k: MEDIUM_OF[w] for k, w in zip(keys, store.where(keys)) if w is not None}


@pytest.mark.parametrize("promote", [True, False])
def test_promotion_on_hit(make_store, promote):
    store = make_store(("hbm", "host", "nvme"), hbm_slots=2, host_slots=2, nvme_slots=8, promote_on_hit=promote)
    keys = keys_of(6)
    for k in keys:
        store.put(LAYOUT, [k], batch([k]))
    assert store.where(keys[:1]) == ["nvme"]
    got, out = read(store, keys[:1])
    assert got.tiers == ["nvme"] and torch.equal(out[0], payload(keys[0]))
    if promote:
        assert store.where(keys[:1]) == ["hbm"]
        assert store.stats()["tiers"][0]["promotions"] == 1
        # Making room up there pushed the coldest hbm block down a tier.
        assert store.where(keys[4:5]) == ["host"]
        got, out = read(store, keys[:1])
        assert got.tiers == ["hbm"] and torch.equal(out[0], payload(keys[0]))
    else:
        assert store.where(keys[:1]) == ["nvme"]
        assert store.stats()["tiers"][0]["promotions"] == 0
    # A hit in host is promoted too.
    host_key = next(k for k, w in zip(keys, store.where(keys)) if w == "host")
    got, _ = read(store, [host_key])
    assert got.tiers == ["host"]
    assert store.where([host_key]) == (["hbm"] if promote else ["host"])
    assert_consistent(store)
    got, out = read(store, keys)
    assert got.hits == 6 and torch.equal(out, batch(keys))


def test_promotion_from_nvme_erases_the_old_copy(make_store, tmp_path):
    """A block promoted out of NVMe and then deleted must not come back at restart."""
    nvme_dir = tmp_path / "nv"
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=nvme_dir)
    keys = keys_of(4)
    for k in keys:
        store.put(LAYOUT, [k], batch([k]))
    assert store.where(keys[:1]) == ["nvme"]
    read(store, keys[:1])
    assert store.where(keys[:1]) == ["host"]
    assert store.delete(keys[:1]) == 1
    store.close()
    reopened = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=nvme_dir)
    assert reopened.contains(keys[:1]) == [False]
    assert_consistent(reopened)


def test_batch_bigger_than_the_top_tier_spills_down(make_store):
    store = make_store(("hbm", "host", "nvme"), hbm_slots=4, host_slots=8, nvme_slots=16)
    keys = keys_of(20)
    res = store.put(LAYOUT, keys, batch(keys))
    assert (res.stored, res.present, res.rejected) == (20, 0, [])
    where = store.where(keys)
    assert (where.count("hbm"), where.count("host"), where.count("nvme")) == (4, 8, 8)
    assert where[-1] == "hbm" and where[0] == "nvme"  # the batch's tail is the hottest
    got, out = read(store, keys)
    assert got.hits == 20 and torch.equal(out, batch(keys))
    assert_consistent(store)


def test_batch_bigger_than_the_whole_store(make_store):
    store = make_store(("host",), host_slots=4)
    keys = keys_of(10)
    res = store.put(LAYOUT, keys, batch(keys))
    assert res.stored == 10 and res.rejected == []
    assert store.contains(keys) == [False] * 6 + [True] * 4
    stats = store.stats()
    assert stats["blocks"] == 4 and stats["tiers"][0]["evictions"] == 6
    assert torch.equal(read(store, keys[6:])[1], batch(keys[6:]))
    assert_consistent(store)


# -- prefix-aware eviction --------------------------------------------------------------------

@pytest.mark.parametrize("prefix_aware", [True, False])
def test_prefix_aware_eviction_keeps_roots(make_store, prefix_aware):
    store = make_store(("host",), host_slots=4, prefix_aware=prefix_aware)
    tokens = list(range(6 * LAYOUT.block_tokens))
    keys = block_keys(tokens, LAYOUT)
    res = store.put(LAYOUT, keys, batch(keys), parents=chain_parents(keys))
    assert res.stored == 6
    present = store.contains(keys)
    assert sum(present) == 4
    if prefix_aware:
        assert present[0] and present[1], present  # roots stay, leaves go
        assert store.longest_prefix(keys) >= 2
    else:
        assert store.longest_prefix(keys) == 0  # plain LRU evicted the chain's head
    assert_consistent(store)


def test_prefix_aware_demotes_leaves_keeps_roots_on_top(make_store):
    store = make_store(("hbm", "host"), hbm_slots=4, host_slots=16)
    keys = block_keys(list(range(12 * LAYOUT.block_tokens)), LAYOUT, "tenant")
    store.put(LAYOUT, keys, batch(keys), parents=chain_parents(keys))
    where = store.where(keys)
    assert where[0] == "hbm" and where[1] == "hbm", where
    assert where.count("hbm") == 4 and where.count("host") == 8
    assert store.longest_prefix(keys) == 12


def test_scan_resistant_policy_through_the_store(make_store):
    store = make_store(("host",), host_slots=10, policy="s3fifo", prefix_aware=False)
    hot = rand_key()
    store.put(LAYOUT, [hot], batch([hot]))
    read(store, [hot])
    read(store, [hot])
    scan = keys_of(60)
    for k in scan:  # a long prompt seen once
        store.put(LAYOUT, [k], batch([k]))
    assert store.contains([hot]) == [True]
    assert torch.equal(read(store, [hot])[1][0], payload(hot))
    assert store.stats()["tiers"][0]["evictions"] == 51
    # Batched puts into a full s3fifo tier take several victims at once.
    more = keys_of(8)
    assert store.put(LAYOUT, more, batch(more)).stored == 8
    assert store.contains([hot]) == [True]
    assert_consistent(store)


@pytest.mark.parametrize("tiers", [("host",), ("host", "nvme")])
def test_prefix_aware_s3fifo_keeps_hot_chains_through_a_chained_scan(make_store, tiers):
    """A long prompt seen once is a chain (every block but its tail has a child). In the host
    tier of a host+NVMe store its tail moves down first, leaving only parents up there: the
    scan's own blocks must still go before the reused prefixes."""
    store = make_store(tiers, host_slots=20, nvme_slots=200, policy="s3fifo", prefix_aware=True)
    hot = block_keys(list(range(3 * LAYOUT.block_tokens)), LAYOUT, "hot")
    store.put(LAYOUT, hot, batch(hot), parents=chain_parents(hot))
    read(store, hot)
    read(store, hot)
    scan = block_keys(list(range(100 * LAYOUT.block_tokens)), LAYOUT, "scan")
    store.put(LAYOUT, scan, batch(scan), parents=chain_parents(scan))
    assert store.where(hot) == ["host"] * 3
    assert store.longest_prefix(hot) == 3
    assert_consistent(store)


# -- pins, deletes under readers, movers and writers -----------------------------------------

def test_delete_of_an_acquired_block_releases_at_last_release(make_store):
    log = EventLog()
    store = make_store(("host",), host_slots=4, listener=log)
    k = rand_key()
    store.put(LAYOUT, [k], batch([k]))
    first = store.acquire(LAYOUT, [k])
    second = store.acquire(LAYOUT, [k])
    assert first[0] is not None and torch.equal(first[0].view, payload(k))
    assert store.delete([k]) == 1
    assert store.contains([k]) == [False]
    assert read(store, [k])[0].tiers == [None]
    assert isinstance(log.events[-1], BlockRemoved) and log.events[-1].block_hashes == [k]
    assert store.stats()["blocks"] == 0 and used_slots(store) == 1  # still held
    assert torch.equal(first[0].view, payload(k))  # the holder's bytes are intact
    # The key can be stored anew while the old copy is held.
    assert store.put(LAYOUT, [k], batch([k], version=1)).stored == 1
    assert used_slots(store) == 2
    store.release(first)
    assert used_slots(store) == 2
    store.release(second)
    assert used_slots(store) == 1 and store.stats()["blocks"] == 1
    assert torch.equal(read(store, [k])[1][0], payload(k, version=1))
    assert_consistent(store)


def test_delete_while_a_get_is_reading(make_store):
    store = make_store(("host",), host_slots=4)
    keys = keys_of(2)
    store.put(LAYOUT, keys, batch(keys))
    gate = Gate(store.tiers[0], "read_many")
    gate.armed = True
    out = empty_out(2)
    th, box = run_in_thread(lambda: store.get(LAYOUT, keys, out))
    assert gate.entered.wait(10)
    assert store.delete(keys[:1]) == 1
    assert store.contains(keys) == [False, True]
    assert store.stats()["blocks"] == 1 and used_slots(store) == 2  # pinned: not freed yet
    gate.go.set()
    th.join(10)
    assert "error" not in box, box
    assert box["result"].tiers == ["host", "host"]  # the reader got its bytes
    assert torch.equal(out, batch(keys))
    assert used_slots(store) == 1
    assert_consistent(store)


def test_put_rejects_when_everything_is_pinned(make_store):
    store = make_store(("host",), host_slots=1)
    k, other = rand_key(), rand_key()
    store.put(LAYOUT, [k], batch([k]))
    handles = store.acquire(LAYOUT, [k])
    res = store.put(LAYOUT, [other], batch([other]))
    assert (res.stored, res.rejected) == (0, [other])
    assert store.stats()["put_rejected"] == 1
    assert store.contains([k, other]) == [True, False]
    store.release(handles)
    assert store.put(LAYOUT, [other], batch([other])).stored == 1
    assert_consistent(store)


def test_delete_while_moving_and_readers_wait_for_the_move(make_store):
    log = EventLog()
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=4, listener=log)
    keys = keys_of(4)
    store.put(LAYOUT, keys[:2], batch(keys[:2]))
    gate = Gate(store.tiers[1], "write_many")  # the demotion host -> nvme
    gate.armed = True
    th, box = run_in_thread(lambda: store.put(LAYOUT, keys[2:3], batch(keys[2:3])))
    assert gate.entered.wait(10)
    victim = keys[0]
    assert store.contains([victim]) == [True]  # MOVING counts as present
    assert store.where([victim]) == ["host"]
    # Readers of other blocks are not held up by the move (the lock is released during copies).
    got, out = read(store, keys[1:2])
    assert got.tiers == ["host"] and torch.equal(out[0], payload(keys[1]))
    # A reader of the moving block waits for the move, then reads it where it landed.
    out2 = empty_out(1)
    reader, rbox = run_in_thread(lambda: store.get(LAYOUT, [victim], out2))
    reader.join(0.2)
    assert reader.is_alive(), "a get of a MOVING block must wait for the move"
    gate.go.set()
    th.join(10)
    reader.join(10)
    assert "error" not in box and "error" not in rbox, (box, rbox)
    assert box["result"].stored == 1
    assert rbox["result"].tiers == ["nvme"] and torch.equal(out2[0], payload(victim))
    assert_consistent(store)

    # Now doom a block in the middle of its move.
    store2 = make_store(("host", "nvme"), host_slots=2, nvme_slots=4, listener=log)
    keys = keys_of(3)
    store2.put(LAYOUT, keys[:2], batch(keys[:2]))
    gate = Gate(store2.tiers[1], "write_many")
    gate.armed = True
    th, box = run_in_thread(lambda: store2.put(LAYOUT, keys[2:], batch(keys[2:])))
    assert gate.entered.wait(10)
    assert store2.delete(keys[:1]) == 1
    assert store2.contains(keys[:1]) == [False]
    gate.go.set()
    th.join(10)
    assert "error" not in box, box
    assert box["result"].stored == 1
    assert store2.contains(keys) == [False, True, True]
    assert store2.where(keys[1:]) == ["host", "host"]
    assert store2.stats()["tiers"][1]["used_slots"] == 0  # the doomed copy's nvme slot was freed
    assert_consistent(store2)


def test_delete_while_writing(make_store):
    log = EventLog()
    store = make_store(("host",), host_slots=4, listener=log)
    k = rand_key()
    gate = Gate(store.tiers[0], "write_many")
    gate.armed = True
    th, box = run_in_thread(lambda: store.put(LAYOUT, [k], batch([k])))
    assert gate.entered.wait(10)
    assert store.contains([k]) == [False]  # WRITING is invisible
    assert read(store, [k])[0].tiers == [None]
    assert store.delete([k]) == 1
    gate.go.set()
    th.join(10)
    assert "error" not in box, box
    assert box["result"].stored == 0
    assert store.contains([k]) == [False]
    assert not log.of(BlockStored)  # never announced
    assert used_slots(store) == 0
    assert_consistent(store)
    assert store.put(LAYOUT, [k], batch([k])).stored == 1


# -- layouts ----------------------------------------------------------------------------------

def test_layout_mismatch_on_get(make_store):
    store = make_store(("host", "nvme"), host_slots=2)
    other = Layout("other/model", 2, 2, 8, "bfloat16", 16)  # same block size, different model
    assert other.block_nbytes == LAYOUT.block_nbytes
    good, shared = rand_key(), rand_key()
    store.put(LAYOUT, [good, shared], batch([good, shared]))
    with pytest.raises(LayoutMismatchError) as info:
        store.get(other, [good], empty_out(1))
    assert good.hex() in str(info.value) and LAYOUT.id.hex() in str(info.value)
    assert other.id.hex() in str(info.value) and isinstance(info.value, ValueError)
    # A batch that pins a block of the right layout before the mismatch gives that pin back:
    # deleting the block afterwards frees its slot at once.
    theirs = rand_key()
    store.put(other, [theirs], batch([theirs]))
    with pytest.raises(LayoutMismatchError):
        store.get(other, [theirs, good], empty_out(2))
    assert store.delete([theirs, good]) == 2
    assert used_slots(store) == 1 == store.stats()["blocks"]
    # A block on nvme is checked the same way.
    for k in keys_of(3):
        store.put(LAYOUT, [k], batch([k]))
    assert store.where([shared]) == ["nvme"]
    with pytest.raises(LayoutMismatchError):
        store.get(other, [shared], empty_out(1))
    got, out = read(store, [shared])
    assert got.tiers == ["nvme"] and torch.equal(out[0], payload(shared))
    assert_consistent(store)


def test_keys_of_different_layouts_coexist(make_store):
    store = make_store(("host",), host_slots=8)
    other = Layout("test/model@r1", 2, 2, 8, "bfloat16", 16)
    tokens = list(range(2 * 16))
    ka, kb = block_keys(tokens, LAYOUT), block_keys(tokens, other)
    store.put(LAYOUT, ka, batch(ka))
    store.put(other, kb, batch(kb, version=1))
    assert store.get(LAYOUT, ka, empty_out(2)).hits == 2
    out = torch.zeros((2, *other.block_shape), dtype=torch.bfloat16)
    assert store.get(other, kb, out).hits == 2
    assert out.view(torch.uint8).reshape(2, -1).equal(batch(kb, version=1))


# -- events -----------------------------------------------------------------------------------

def test_events_through_the_listener(make_store):
    log = EventLog()
    store = make_store(("hbm", "host", "nvme"), hbm_slots=2, host_slots=2, nvme_slots=2, listener=log)
    keys = block_keys(list(range(2 * 16)), LAYOUT)
    store.put(LAYOUT, keys, batch(keys), parents=chain_parents(keys))
    # A top tier of 2 slots takes a batch one block at a time: one event per chunk, parents kept.
    assert log.events == [BlockStored(keys[:1], None, "GPU"), BlockStored(keys[1:], keys[0], "GPU")]
    big = make_store(("hbm",), hbm_slots=8, listener=EventLog())
    big.put(LAYOUT, keys, batch(keys), parents=chain_parents(keys, b"P" * 16))
    assert big._listener.events == [BlockStored(keys, b"P" * 16, "GPU")]

    lone = keys_of(2)
    store.put(LAYOUT, lone, batch(lone))  # two unrelated blocks: no chain
    stored = log.of(BlockStored)
    assert [e.block_hashes for e in stored if e.medium == "GPU"][2:] == [[lone[0]], [lone[1]]]
    moved = [e for e in log.events[1:] if isinstance(e, BlockRemoved)]
    # Prefix-aware: the chain's leaf and the older lone block went down; the root stayed.
    assert moved == [BlockRemoved([keys[1]], "GPU"), BlockRemoved([lone[0]], "GPU")]
    assert [e for e in stored if e.medium == "CPU"] == [BlockStored([keys[1]], keys[0], "CPU"),
                                                        BlockStored([lone[0]], None, "CPU")]
    assert store.where(keys + lone) == ["hbm", "host", "host", "hbm"]

    more = keys_of(4)
    for k in more:
        store.put(LAYOUT, [k], batch([k]))
    assert any(e.medium == "DISK" for e in log.of(BlockStored))
    assert any(e.medium == "DISK" for e in log.of(BlockRemoved))  # dropped off the bottom

    target = next(k for k, w in zip(keys + lone + more, store.where(keys + lone + more)) if w == "host")
    store.delete([target])
    assert log.events[-1] == BlockRemoved([target], "CPU")
    everything = keys + lone + more
    assert log.where == {k: MEDIUM_OF[w] for k, w in zip(everything, store.where(everything)) if w}

    store.clear()
    assert log.events[-1] == AllBlocksCleared() and log.where == {}
    ts, decoded = decode_batch(encode_batch(log.events, ts=5.0))
    assert decoded == log.events


def test_no_events_without_a_listener(make_store):
    store = make_store(("host",), host_slots=2)
    keys = keys_of(4)
    store.put(LAYOUT, keys, batch(keys))  # eviction paths run with no listener
    assert store.stats()["blocks"] == 2


def test_resync_announces_everything(make_store):
    log = EventLog()
    store = make_store(("hbm", "host"), hbm_slots=2, host_slots=4, listener=log)
    keys = keys_of(5)
    for k in keys:
        store.put(LAYOUT, [k], batch([k]))
    before = dict(log.where)
    store.resync()
    assert log.where == before
