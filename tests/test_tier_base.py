"""Tier plumbing: slot allocator, sizing, and the memory tiers' copies (HBM on CPU, host)."""
from __future__ import annotations

import pytest
import torch

from kvstore.errors import BlockStateError, ConfigError
from kvstore.tiers.base import PAGE, SlotAllocator, SlotMeta, round_up, slots_for
from kvstore.tiers.hbm import HBMTier
from kvstore.tiers.host import HostTier

from kvtest_support import NBYTES, leftover_arenas, mem_capacity, payload, rand_key, shm_name


def test_round_up():
    assert [round_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, PAGE, PAGE, PAGE, 2 * PAGE]
    assert round_up(5, 4) == 8


def test_allocator():
    a = SlotAllocator(3)
    assert [a.alloc(), a.alloc(), a.alloc(), a.alloc()] == [0, 1, 2, None]
    assert (a.used_count, a.free_count) == (3, 0)
    a.free(1)
    assert (a.used_count, a.free_count) == (2, 1)
    with pytest.raises(BlockStateError, match="slot 1 is not allocated"):
        a.free(1)  # double free
    for bad in (-1, 3, 99):
        with pytest.raises(BlockStateError, match=f"slot {bad} "):
            a.free(bad)
    assert a.alloc() == 1
    b = SlotAllocator(4)
    b.claim([2])
    for again in ([2], [0, 2], [1, 1]):
        with pytest.raises(BlockStateError, match="is already in use"):
            b.claim(again)
    assert (b.used_count, b.free_count) == (1, 3)  # a refused claim claims nothing
    assert sorted(b.alloc() for _ in range(3)) == [0, 1, 3]
    assert b.alloc() is None


def test_slots_for():
    assert slots_for(4 * PAGE, 2048, "x") == 4
    assert slots_for(4 * PAGE + 100, PAGE + 1, "x") == 2
    assert slots_for(10 * PAGE, PAGE, "x", overhead=PAGE) == 5
    with pytest.raises(ConfigError, match="host_tier_bytes: 100 bytes hold no slot of 2048 bytes"):
        slots_for(100, 2048, "host_tier_bytes")
    with pytest.raises(ConfigError, match="slot_nbytes=0"):
        slots_for(PAGE, 0, "x")


def test_hbm_tier_on_cpu_copies_in_and_out():
    tier = HBMTier(NBYTES, mem_capacity(3), device="cpu")
    assert tier.num_slots == 3 and tier.slot_stride == PAGE
    assert tier.arena.device.type == "cpu"
    keys = [rand_key() for _ in range(3)]
    metas = [SlotMeta(k, b"L" * 16, NBYTES) for k in keys]
    assert tier.write_many([(i, payload(k), m) for i, (k, m) in enumerate(zip(keys, metas))]) == [None] * 3
    outs = [torch.zeros(NBYTES, dtype=torch.uint8) for _ in keys]
    assert tier.read_many([(2 - i, outs[i], metas[2 - i]) for i in range(3)]) == [None] * 3
    assert [torch.equal(outs[i], payload(keys[2 - i])) for i in range(3)] == [True] * 3
    assert torch.equal(tier.view(1)[:NBYTES], payload(keys[1]))
    stats = tier.stats()
    assert stats["name"] == "hbm" and stats["medium"] == "GPU" and stats["device"] == "cpu"
    assert stats["bytes_written"] == stats["bytes_read"] == 3 * NBYTES
    assert stats["capacity_bytes"] == 3 * NBYTES


def test_host_tier_stats_and_close_removes_the_arena():
    name = shm_name()
    tier = HostTier(name, NBYTES, mem_capacity(2))
    try:
        assert tier.shm_name == name
        stats = tier.stats()
        assert stats["name"] == "host" and stats["medium"] == "CPU" and stats["slots"] == 2
        assert stats["pinned"] is False  # no CUDA here
        assert tier.view(0).data_ptr() % PAGE == 0 and tier.view(1).data_ptr() % PAGE == 0
        assert int(tier.arena.sum()) == 0
    finally:
        tier.close()
    assert not leftover_arenas(remove=True)


def test_host_tier_too_small():
    with pytest.raises(ConfigError, match="host_tier_bytes"):
        HostTier(shm_name(), NBYTES, 100)
    assert not leftover_arenas(remove=True)
