"""The host arena's directory: other processes read blocks without asking the store, and never
get bytes other than the block's own: a slot reused mid-copy, a scribbled block, a deleted or
evicted block are misses (or corrupt), and blocks read this way are not evicted as cold."""
from __future__ import annotations

import random
import subprocess
import sys

import torch

from kvstore.tiers.host import HostArena

from kvtest_support import LAYOUT, NBYTES, batch, make_store, payload, rand_key

__all__ = ["make_store"]


def reader(store) -> HostArena:
    """The arena as another process maps it (by name)."""
    return HostArena.open(store.tiers[0].shm_name)


def read(arena, key, verify=False):
    out = torch.zeros(NBYTES, dtype=torch.uint8)
    return arena.directory.read(key, arena.tensor, out, verify), out


def test_a_reader_elsewhere_gets_every_ready_block(make_store):
    store = make_store(("host",))
    keys = [rand_key() for _ in range(5)]
    store.put(LAYOUT, keys, batch(keys))
    arena = reader(store)
    try:
        for k in keys:
            status, out = read(arena, k, verify=True)
            assert status == "hit" and torch.equal(out, payload(k))
        assert read(arena, rand_key())[0] == "miss"
    finally:
        arena.close()


def test_deleted_evicted_and_demoted_blocks_are_misses(make_store):
    store = make_store(("host", "nvme"), host_slots=2)
    a, b, c, d = rand_key(), rand_key(), rand_key(), rand_key()
    store.put(LAYOUT, [a, b], batch([a, b]))
    arena = reader(store)
    try:
        store.delete([a])
        assert read(arena, a)[0] == "miss"
        store.put(LAYOUT, [c], batch([c]))  # into a's slot
        store.put(LAYOUT, [d], batch([d]))  # demotes b to NVMe
        assert store.where([b]) == ["nvme"] and read(arena, b)[0] == "miss"
        store.get(LAYOUT, [b], torch.zeros((1, NBYTES), dtype=torch.uint8))  # promoted back up
        status, out = read(arena, b)
        assert status == "hit" and torch.equal(out, payload(b))
    finally:
        arena.close()


class ReuseDuringCopy:
    """The arena's slots, as seen by a reader whose copy overlaps the slot being handed out and
    rewritten with another block."""

    def __init__(self, arena, store, fresh) -> None:
        self.arena, self.store, self.fresh = arena, store, fresh

    def __getitem__(self, index):
        self.store.put(LAYOUT, self.fresh, batch(self.fresh))  # evicts the block, reuses its slot
        return self.arena.tensor[index]


def test_a_slot_reused_while_it_is_read_is_a_miss_never_other_bytes(make_store):
    store = make_store(("host",), host_slots=2)
    victim = rand_key()
    store.put(LAYOUT, [victim], batch([victim]))
    arena = reader(store)
    try:
        fresh = [rand_key(), rand_key()]
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        status = arena.directory.read(victim, ReuseDuringCopy(arena, store, fresh), out, False)
        assert status == "miss"
        assert torch.equal(out, payload(fresh[0])) or torch.equal(out, payload(fresh[1]))  # what the copy saw
        assert store.contains([victim]) == [False]
    finally:
        arena.close()


def test_a_scribbled_block_reads_as_corrupt_when_verified(make_store):
    store = make_store(("host",))
    key = rand_key()
    store.put(LAYOUT, [key], batch([key]))
    arena = reader(store)
    try:
        slot = store._index[key].slot
        arena.tensor[slot, 7] ^= 0xFF
        assert read(arena, key, verify=True)[0] == "corrupt"
        assert read(arena, key, verify=False)[0] == "hit"  # the negative control: damage is real
    finally:
        arena.close()


def test_blocks_read_through_the_directory_get_a_second_chance(make_store):
    store = make_store(("host",), host_slots=4)
    keys = [rand_key() for _ in range(4)]
    for k in keys:  # keys[0] is the least recently used
        store.put(LAYOUT, [k], batch([k]))
    arena = reader(store)
    try:
        assert read(arena, keys[0])[0] == "hit"
        new = rand_key()
        store.put(LAYOUT, [new], batch([new]))
        assert store.contains(keys) == [True, False, True, True]  # keys[1] went, not keys[0]
    finally:
        arena.close()


def test_churn_never_serves_another_blocks_bytes(make_store):
    rng = random.Random(5)
    store = make_store(("host",), host_slots=8)
    arena = reader(store)
    pool = [rand_key() for _ in range(40)]
    hits = 0
    try:
        for _ in range(600):
            key = rng.choice(pool)
            op = rng.random()
            if op < 0.5:
                store.put(LAYOUT, [key], batch([key]))
            elif op < 0.6:
                store.delete([key])
            else:
                status, out = read(arena, key, verify=True)
                assert status in ("hit", "miss")
                if status == "hit":
                    hits += 1
                    assert torch.equal(out, payload(key))
                assert (status == "hit") == store.contains([key])[0]
        assert hits > 20
    finally:
        arena.close()


def test_another_process_reads_the_blocks(make_store):
    store = make_store(("host",))
    keys = [rand_key() for _ in range(3)]
    store.put(LAYOUT, keys, batch(keys))
    code = f"""
import sys, torch
from kvstore.tiers.host import HostArena
arena = HostArena.open({store.tiers[0].shm_name!r})
for hex_key in sys.argv[1:]:
    out = torch.zeros({NBYTES}, dtype=torch.uint8)
    print(arena.directory.read(bytes.fromhex(hex_key), arena.tensor, out, True), out.sum().item())
arena.close()
"""
    result = subprocess.run([sys.executable, "-c", code, *[k.hex() for k in keys]], capture_output=True,
                            text=True, timeout=120, check=True)
    lines = result.stdout.split("\n")[:3]
    assert lines == [f"hit {payload(k).sum().item()}" for k in keys]
