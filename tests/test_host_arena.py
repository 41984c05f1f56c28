"""The host arena is shared memory: another process opens it by name and reads and writes slots
in place; bad names and files are refused with TierIOError naming them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvstore.errors import ConfigError, TierIOError
from kvstore.tiers.base import PAGE
from kvstore.tiers.host import SHM_DIR, HostArena, HostTier

from kvtest_support import LAYOUT, NBYTES, batch, empty_out, leftover_arenas, make_store, payload, rand_key, shm_name

__all__ = ["make_store"]

CHILD = textwrap.dedent("""
    import sys
    import torch
    from kvstore.tiers.host import HostArena

    name, read_slot, write_slot, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    expected = bytes.fromhex(sys.argv[5])
    arena = HostArena.open(name)
    assert not arena.owner
    print("geometry", arena.slot_nbytes, arena.slot_stride, arena.num_slots)
    got = bytes(arena.tensor[read_slot, :nbytes].numpy())
    assert got == expected, "child read other bytes than the parent wrote"
    pattern = bytes((i * 7 + 3) % 256 for i in range(nbytes))
    arena.tensor[write_slot, :nbytes].copy_(torch.frombuffer(bytearray(pattern), dtype=torch.uint8))
    arena.close()  # not the owner: leaves the arena in place
    print("ok")
""")
CHILD_PATTERN = bytes((i * 7 + 3) % 256 for i in range(NBYTES))


def run_child(name: str, read_slot: int, write_slot: int, expected: bytes) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(read_slot), str(write_slot), str(NBYTES),
                          expected.hex()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def tier():
    t = HostTier(shm_name(), NBYTES, 4 * PAGE)
    yield t
    t.close()
    assert not leftover_arenas(remove=True)


def test_another_process_reads_and_writes_slots(tier):
    data = bytes(payload(b"k" * 16).numpy())
    tier.arena[2, :NBYTES].copy_(payload(b"k" * 16))
    stdout = run_child(tier.shm_name, read_slot=2, write_slot=3, expected=data)
    assert f"geometry {NBYTES} {PAGE} 4" in stdout and "ok" in stdout
    assert bytes(tier.arena[3, :NBYTES].numpy()) == CHILD_PATTERN
    assert int(tier.arena[0].sum()) == 0 and int(tier.arena[1].sum()) == 0  # other slots untouched
    assert os.path.exists(os.path.join(SHM_DIR, tier.shm_name))  # the child's close did not unlink


def test_handoff_through_a_store(make_store):
    """The zero-copy handoff the design is for: a reader process reads a block the store pins
    for it, and a writer process fills a slot the store reserved, which the store then serves."""
    store = make_store(("host",), host_slots=4)
    shm = store.tiers[0].shm_name
    k, k2 = rand_key(), rand_key()
    store.put(LAYOUT, [k], batch([k]))
    [held] = store.acquire(LAYOUT, [k])
    [slot] = store.reserve(LAYOUT, [k2])
    try:
        run_child(shm, read_slot=held.slot, write_slot=slot.slot, expected=bytes(payload(k).numpy()))
    finally:
        store.release([held])
    assert store.commit([slot]) == 1
    out = empty_out(1)
    assert store.get(LAYOUT, [k2], out).tiers == ["host"]
    assert bytes(out[0].numpy()) == CHILD_PATTERN


def test_open_in_process_shares_memory(tier):
    other = HostArena.open(tier.shm_name)
    try:
        assert (other.slot_nbytes, other.slot_stride, other.num_slots) == (NBYTES, PAGE, 4)
        tier.arena[1, :4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert other.tensor[1, :4].tolist() == [1, 2, 3, 4]
        other.tensor[0, 10] = 99
        assert int(tier.arena[0, 10]) == 99
    finally:
        other.close()


def test_open_missing_name():
    name = shm_name("missing-")
    with pytest.raises(TierIOError) as info:
        HostArena.open(name)
    assert name in str(info.value)


@pytest.mark.parametrize("size", [10, 2 * PAGE])
def test_open_a_file_that_is_no_arena(size):
    name = shm_name("junk-")
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"\x5a" * size)
    try:
        with pytest.raises(TierIOError) as info:
            HostArena.open(name)
        assert name in str(info.value)
    finally:
        os.unlink(path)


def test_open_an_arena_whose_file_was_truncated(tier):
    name = shm_name("short-")
    path = os.path.join(SHM_DIR, name)
    with open(os.path.join(SHM_DIR, tier.shm_name), "rb") as f:
        head = f.read(2 * PAGE)  # a real superblock, but the slots are missing
    with open(path, "wb") as f:
        f.write(head)
    try:
        with pytest.raises(TierIOError, match=name):
            HostArena.open(name)
    finally:
        os.unlink(path)


def test_open_a_directory():
    name = shm_name("dir-")
    path = os.path.join(SHM_DIR, name)
    os.mkdir(path)
    try:
        with pytest.raises(TierIOError, match=name):
            HostArena.open(name)
    finally:
        os.rmdir(path)


def test_create_an_existing_name_raises_and_leaves_it_alone(tier):
    tier.arena[0, :3] = torch.tensor([7, 8, 9], dtype=torch.uint8)
    with pytest.raises(TierIOError) as info:
        HostArena.create(tier.shm_name, NBYTES, 2)
    assert tier.shm_name in str(info.value) and "already exists" in str(info.value)
    with pytest.raises(TierIOError, match=tier.shm_name):
        HostTier(tier.shm_name, NBYTES, 4 * PAGE)
    other = HostArena.open(tier.shm_name)
    try:
        assert other.num_slots == 4 and other.tensor[0, :3].tolist() == [7, 8, 9]
    finally:
        other.close()


@pytest.mark.parametrize("bad", ["", "a/b", "../etc", "x" * 201, "sp ace"])
def test_bad_names(bad):
    with pytest.raises(ConfigError) as info:
        HostArena.open(bad)
    assert repr(bad)[:30] in str(info.value)


def test_owner_close_unlinks(tier):
    name = tier.shm_name
    arena = HostArena.create(shm_name(), NBYTES, 1)
    path = os.path.join(SHM_DIR, arena.name)
    assert os.path.exists(path)
    arena.close()
    assert not os.path.exists(path)
    with pytest.raises(TierIOError):
        HostArena.open(arena.name)
    assert os.path.exists(os.path.join(SHM_DIR, name))


def test_stale_arenas_of_dead_owners_are_removed_and_live_ones_kept():
    from kvstore.tiers.host import SHM_DIR, remove_stale_arenas

    dead = _a_dead_pid()
    tag = f"kvtest-stale-{os.getpid()}"
    stale = os.path.join(SHM_DIR, f"{tag}-node-{dead}")
    live = os.path.join(SHM_DIR, f"{tag}-node-{os.getpid()}")
    for path in (stale, live):
        open(path, "wb").close()
    try:
        assert remove_stale_arenas(f"{tag}-*-*") == [stale]
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
