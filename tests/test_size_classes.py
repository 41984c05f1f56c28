"""Several block sizes in one node: size classes over chunks (tiers/geometry.py) in the store,
the host arena's directory and the NVMe file."""
from __future__ import annotations

import os
import random
import struct

import pytest
import torch

from kvstore.errors import InvalidLayoutError, TierIOError
from kvstore.layout import Layout
from kvstore.store import TieredStore
from kvstore.tiers.geometry import MAX_ROUNDING_LOSS, PAGE, SizeClasses, rounding_loss
from kvstore.tiers.host import HostArena, HostTier
from kvstore.tiers.nvme import FILE_NAME, NVMeTier

from kvtest_support import shm_name

KiB, MiB = 1024, 1024**2
L64K = Layout("test/small", 2, 2, 64, "bfloat16", 64)  # 64 KiB
L2M = Layout("test/llama-8b", 32, 8, 128, "bfloat16", 16)  # 2 MiB
L5M = Layout("test/llama-70b", 80, 8, 128, "bfloat16", 16)  # 5 MiB
assert (L64K.block_nbytes, L2M.block_nbytes, L5M.block_nbytes) == (64 * KiB, 2 * MiB, 5 * MiB)
AUTO = SizeClasses.of([], auto=True, min_slot_bytes=16 * KiB, chunk_bytes=8 * MiB)


def blocks(layout: Layout, keys: list[bytes]) -> torch.Tensor:
    """Rows whose bytes depend on their key: a misplaced byte shows in a compare."""
    rows = []
    for k in keys:
        g = torch.Generator().manual_seed(int.from_bytes(k[:8], "little") & (2**62 - 1))
        rows.append(torch.randint(0, 256, (layout.block_nbytes,), dtype=torch.uint8, generator=g))
    return torch.stack(rows)


def keys_of(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


@pytest.fixture
def stores(tmp_path):
    made = []

    def make(host_bytes=48 * MiB, nvme_bytes=0, classes=AUTO, nvme_dir=None, policy="lru"):
        tiers = [HostTier(shm_name(), classes, host_bytes)] if host_bytes else []
        if nvme_bytes:
            tiers.append(NVMeTier(str(nvme_dir or tmp_path / "nvme"), classes, nvme_bytes, io_threads=2))
        store = TieredStore(tiers, policy=policy)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def read_back(store, layout, keys, expected) -> list[str | None]:
    out = torch.zeros_like(expected)
    got = store.get(layout, keys, out)
    for i, tier in enumerate(got.tiers):
        if tier is not None:
            assert torch.equal(out[i], expected[i]), f"block {i} of {layout.model_id} came back wrong"
    return got.tiers


# -- classes ---------------------------------------------------------------------------------

def test_auto_classes_lose_at_most_a_quarter_of_a_slot():
    """Whatever order block sizes arrive in, each lands in a slot it fills to at least 75% (blocks
    of 3 pages or more, and at least 3/4 of min_slot_bytes)."""
    rng = random.Random(7)
    for trial in range(200):
        existing: list[int] = []
        sizes = [rng.choice([rng.randrange(12 * KiB, 64 * MiB), rng.randrange(12 * KiB, 2 * MiB)])
                 for _ in range(rng.randrange(1, 25))]
        for nbytes in sizes:
            stride = AUTO.class_for(nbytes, existing, 64 * MiB)
            assert stride is not None and stride >= nbytes and stride % PAGE == 0
            assert rounding_loss(nbytes, stride) <= MAX_ROUNDING_LOSS or stride == AUTO.unit, (nbytes, stride)
            if stride not in existing:
                existing.append(stride)


def test_model_layouts_get_exact_or_near_classes():
    classes = SizeClasses.of([], auto=True, min_slot_bytes=16 * KiB, chunk_bytes=64 * MiB)
    existing: list[int] = []
    for layout in (L2M, L64K, L5M, Layout("qwen-0.5b", 24, 2, 64, "bfloat16", 16),
                   Layout("llama-70b-tp8", 80, 1, 128, "bfloat16", 16, tp_rank=3, tp_size=8)):
        stride = classes.class_for(layout.block_nbytes, existing, 64 * MiB)
        existing.append(stride)
        assert stride == layout.block_nbytes  # page multiples all: no rounding at all


def test_declared_classes_take_the_smallest_that_fits():
    classes = SizeClasses.of([64 * KiB, 2 * MiB, 5 * MiB], auto=False)
    assert [classes.class_for(n, [], 64 * MiB) for n in (1, 64 * KiB, 64 * KiB + 1, 3 * MiB, 5 * MiB)] == [
        64 * KiB, 64 * KiB, 2 * MiB, 5 * MiB, 5 * MiB]
    assert classes.class_for(5 * MiB + 1, [], 64 * MiB) is None


# -- one store, three block sizes -------------------------------------------------------------

def test_a_store_keeps_64k_2m_and_5m_blocks_at_once(stores):
    store = stores(host_bytes=48 * MiB, nvme_bytes=160 * MiB)
    data = {}
    for layout, n in ((L64K, 64), (L2M, 12), (L5M, 6)):
        keys = keys_of(n)
        data[layout] = (keys, blocks(layout, keys))
        assert store.put(layout, keys, data[layout][1]).stored == n
    for layout, (keys, expected) in data.items():
        assert None not in read_back(store, layout, keys, expected)
    stats = store.stats()
    by_class = {c["slot_bytes"]: c for c in stats["classes"]}
    assert sorted(by_class) == [64 * KiB, 2 * MiB, 5 * MiB]
    assert {s: c["blocks"] for s, c in by_class.items()} == {64 * KiB: 64, 2 * MiB: 12, 5 * MiB: 6}
    assert stats["rounding_loss"] == 0.0  # every layout got a class of its exact size
    for tier in store.tiers:  # a slot of each class holds its own blocks only
        for slot in range(tier.num_slots):
            if tier.allocator._used[slot]:
                assert tier.stride_of(slot) in by_class


def test_eviction_stays_within_the_class_that_needs_room(stores):
    store = stores(host_bytes=48 * MiB)  # 8 chunks of 6 MiB: 3 slots of 2 MiB, 96 of 64 KiB each
    small = keys_of(40)
    store.put(L64K, small, blocks(L64K, small))
    big = keys_of(60)
    for i in range(0, 60, 3):
        store.put(L2M, big[i:i + 3], blocks(L2M, big[i:i + 3]))
    assert store.contains(small) == [True] * 40  # the 2 MiB class evicted its own blocks only
    present = store.contains(big)
    kept = sum(present)
    assert 0 < kept < 60 and present == [False] * (60 - kept) + [True] * kept  # its oldest went first
    stats = store.stats()["tiers"][0]
    assert stats["evictions"] == 60 - kept


def test_a_new_class_takes_a_chunk_from_a_full_tier(stores):
    store = stores(host_bytes=48 * MiB)
    big = keys_of(24)  # 8 chunks x 3 slots: the whole tier
    store.put(L2M, big, blocks(L2M, big))
    assert store.stats()["tiers"][0]["free_chunks"] == 0
    small = keys_of(10)
    assert store.put(L64K, small, blocks(L64K, small)).stored == 10
    assert store.contains(small) == [True] * 10
    assert sum(store.contains(big)) == 21  # one chunk's three blocks made way
    assert store.stats()["tiers"][0]["chunks_reassigned"] >= 1


def test_capacity_follows_the_bytes_stored(stores):
    """A class that stores most of the bytes ends up holding most of the chunks, and the other
    keeps at least one."""
    store = stores(host_bytes=48 * MiB)
    small = keys_of(8 * 96)  # enough 64 KiB blocks to fill the whole tier
    for i in range(0, len(small), 96):
        store.put(L64K, small[i:i + 96], blocks(L64K, small[i:i + 96]))
    assert store.tiers[0].allocator.classes() == {64 * KiB: 8}
    big = keys_of(60)
    for i in range(0, 60, 3):
        store.put(L2M, big[i:i + 3], blocks(L2M, big[i:i + 3]))
    held = store.tiers[0].allocator.classes()
    assert held[2 * MiB] >= 5 and held.get(64 * KiB, 0) >= 1, held


def test_demotion_keeps_the_class_and_promotion_brings_it_back(stores):
    store = stores(host_bytes=48 * MiB, nvme_bytes=200 * MiB)
    keys = keys_of(30)
    data = blocks(L5M, keys)
    for i in range(0, 30, 2):
        store.put(L5M, keys[i:i + 2], data[i:i + 2])
    where = store.where(keys)
    assert where.count("nvme") >= 22 and where.count("host") <= 8
    nvme = store.tiers[1]
    for key in keys:
        entry = store._index[key]
        assert store.tiers[entry.tier].stride_of(entry.slot) == 5 * MiB
    assert read_back(store, L5M, keys[:2], data[:2]) == ["nvme", "nvme"]
    assert store.where(keys[:2]) == ["host", "host"]  # promoted, into 5 MiB slots
    assert nvme.stats()["corrupt_dropped"] == 0


def test_refusals_name_the_block_and_what_to_change(stores):
    declared = stores(classes=SizeClasses.of([64 * KiB, 2 * MiB], auto=False))
    with pytest.raises(InvalidLayoutError) as info:
        declared.put(L5M, keys_of(1), torch.zeros(1, L5M.block_nbytes, dtype=torch.uint8))
    msg = str(info.value)
    assert "test/llama-70b" in msg and "5242880" in msg and "block_sizes" in msg and "65536, 2097152" in msg
    small = stores(host_bytes=16 * MiB)  # chunks of 2 MiB: no 5 MiB slot
    with pytest.raises(InvalidLayoutError) as info:
        small.put(L5M, keys_of(1), torch.zeros(1, L5M.block_nbytes, dtype=torch.uint8))
    msg = str(info.value)
    assert "5242880" in msg and "2097152" in msg and "chunk_bytes" in msg
    one = stores(classes=SizeClasses.one(2 * MiB))
    with pytest.raises(InvalidLayoutError, match=r"5242880 bytes; this store's slots hold 2097152 \(raise slot_bytes"):
        one.get(L5M, keys_of(1), torch.zeros(1, L5M.block_nbytes, dtype=torch.uint8))


# -- the host arena's directory: zero-call reads of any class -------------------------------

def test_directory_reads_every_class_from_another_mapping(stores):
    store = stores(host_bytes=48 * MiB)
    data = {}
    for layout, n in ((L64K, 10), (L2M, 3), (L5M, 2)):
        keys = keys_of(n)
        data[layout] = (keys, blocks(layout, keys))
        store.put(layout, keys, data[layout][1])
    arena = HostArena.open(store.tiers[0].shm_name)  # as a client on the node maps it
    try:
        for layout, (keys, expected) in data.items():
            for key, row in zip(keys, expected):
                out = torch.zeros(layout.block_nbytes, dtype=torch.uint8)
                assert arena.directory.read(key, arena.tensor, out, True) == "hit"
                assert torch.equal(out, row)
    finally:
        arena.close()


def test_a_chunk_that_changes_class_never_serves_old_slots(stores):
    """A reader that found a block's slot before its chunk went to another class gets a miss,
    never the bytes now lying where the old slot was."""
    store = stores(host_bytes=48 * MiB)
    big = keys_of(24)
    store.put(L2M, big, blocks(L2M, big))
    arena = HostArena.open(store.tiers[0].shm_name)
    try:
        slots = {k: store._index[k].slot for k in big}
        small = keys_of(30)
        store.put(L64K, small, blocks(L64K, small))  # takes a chunk of 2 MiB slots
        gone = [k for k in big if not store.contains([k])[0]]
        assert gone
        for key in gone:
            slot = slots[key]
            assert arena.directory.keys[slot].tobytes() != key  # cleared, or another block's now
            out = torch.zeros(L2M.block_nbytes, dtype=torch.uint8)
            assert arena.directory.read(key, arena.tensor, out, False) == "miss"
        for key, row in zip(small, blocks(L64K, small)):
            out = torch.zeros(L64K.block_nbytes, dtype=torch.uint8)
            assert arena.directory.read(key, arena.tensor, out, True) == "hit" and torch.equal(out, row)
    finally:
        arena.close()


# -- NVMe: restart with several classes, format versions ---------------------------------------

def test_nvme_restart_adopts_every_class(tmp_path, stores):
    d = tmp_path / "nv"
    store = stores(host_bytes=0, nvme_bytes=200 * MiB, nvme_dir=d)
    data = {}
    for layout, n in ((L64K, 50), (L2M, 10), (L5M, 5)):
        keys = keys_of(n)
        data[layout] = (keys, blocks(layout, keys))
        store.put(layout, keys, data[layout][1])
    store.close()
    again = stores(host_bytes=0, nvme_bytes=200 * MiB, nvme_dir=d)
    for layout, (keys, expected) in data.items():
        assert read_back(again, layout, keys, expected) == ["nvme"] * len(keys)
    assert {c["slot_bytes"]: c["blocks"] for c in again.stats()["classes"]} == {64 * KiB: 50, 2 * MiB: 10,
                                                                                5 * MiB: 5}
    assert again.stats()["corrupt_dropped"] == 0 and again.tiers[0].stats()["corrupt_dropped"] == 0


def test_nvme_chunk_given_to_another_class_keeps_nothing_of_the_old_at_restart(tmp_path, stores):
    d = tmp_path / "nv"
    store = stores(host_bytes=0, nvme_bytes=64 * MiB, nvme_dir=d)  # 8 chunks of 8 MiB
    big = keys_of(32)
    store.put(L2M, big, blocks(L2M, big))  # every chunk: 4 slots of 2 MiB
    small = keys_of(100)
    store.put(L64K, small, blocks(L64K, small))
    assert store.tiers[0].stats()["chunks_reassigned"] >= 1
    kept_big = [k for k in big if store.contains([k])[0]]
    store.close()
    again = stores(host_bytes=0, nvme_bytes=64 * MiB, nvme_dir=d)
    assert again.tiers[0].stats()["corrupt_dropped"] == 0  # no stale header of the old class was read
    assert read_back(again, L64K, small, blocks(L64K, small)) == ["nvme"] * 100
    assert read_back(again, L2M, kept_big, blocks(L2M, kept_big)) == ["nvme"] * len(kept_big)
    assert again.contains([k for k in big if k not in kept_big]) == [False] * (32 - len(kept_big))


def test_a_version_2_file_is_refused_by_name(tmp_path):
    with open(tmp_path / FILE_NAME, "wb") as f:
        f.write(struct.pack("<8sIQQQ", b"KVSTNVME", 2, 4096, 4096, 4).ljust(PAGE, b"\0"))
        f.truncate(1 << 20)
    with pytest.raises(TierIOError) as info:
        NVMeTier(str(tmp_path), AUTO, 64 * MiB)
    msg = str(info.value)
    assert "format version 2" in msg and "one slot size" in msg and "version 3" in msg and "remove the file" in msg


def test_nvme_geometry_change_is_refused(tmp_path):
    NVMeTier(str(tmp_path), AUTO, 64 * MiB).close()
    with pytest.raises(Exception, match="block_sizes"):
        NVMeTier(str(tmp_path), SizeClasses.of([], auto=True, min_slot_bytes=64 * KiB, chunk_bytes=8 * MiB),
                 64 * MiB)


def test_metrics_per_class(stores):
    from kvstore.metrics import render

    store = stores(host_bytes=48 * MiB)
    for layout, n in ((L64K, 5), (L2M, 2)):
        keys = keys_of(n)
        store.put(layout, keys, blocks(layout, keys))
    text = render({"nodes": {"node0123456789": {"store": store.stats(), "holds": 0}}})
    assert 'kvstore_class_blocks{node="node01234567",slot_bytes="65536"} 5' in text
    assert 'kvstore_class_blocks{node="node01234567",slot_bytes="2097152"} 2' in text
    assert 'kvstore_class_chunks{tier="host",node="node01234567",slot_bytes="2097152"} 1' in text
    assert 'kvstore_class_rounding_loss{node="node01234567",slot_bytes="65536"} 0' in text
