"""Integrity on one node: a checksum taken at commit travels with the block through every tier;
a block whose bytes changed is a miss counted as corrupt, never data; fenced writers never land
in a reused slot."""
from __future__ import annotations

import time

import pytest
import torch

from kvstore.config import load_config
from kvstore.errors import ConfigError
from kvstore.integrity import ReadVerifier, checksum, copy_with_checksum

from kvtest_support import LAYOUT, NBYTES, batch, empty_out, make_store, payload, rand_key

__all__ = ["make_store"]


def scribble(store, key: bytes, tier: int = 0) -> None:
    """Overwrites a block's bytes in place, as a stray writer in another process could."""
    entry = store._index[key]
    assert entry.tier == tier
    store.tiers[tier].arena[entry.slot, 100:164] ^= 0xFF


def test_copy_with_checksum_copies_and_hashes_like_the_plain_functions():
    src = payload(rand_key(), nbytes=3 * 256 * 1024 + 5)
    dst = torch.zeros_like(src)
    assert copy_with_checksum(dst, src) == checksum(src)
    assert torch.equal(dst, src)


def test_every_block_gets_its_checksum_at_commit(make_store):
    store = make_store(("host", "nvme"))
    keys = [rand_key() for _ in range(3)]
    store.put(LAYOUT, keys, batch(keys))
    for k in keys:
        assert store._index[k].checksum == checksum(payload(k))
    hold = store.reserve(LAYOUT, [rand_key()])
    hold[0].view.copy_(payload(hold[0].key))
    store.commit(hold)
    assert store._index[hold[0].key].checksum == checksum(payload(hold[0].key))


def test_scribbled_host_block_is_a_counted_miss_when_verified(make_store):
    store = make_store(("host",), verify_reads="always")
    keys = [rand_key() for _ in range(2)]
    store.put(LAYOUT, keys, batch(keys))
    scribble(store, keys[1])
    out = empty_out(2)
    res = store.get(LAYOUT, keys, out)
    assert res.found == [True, False]
    assert torch.equal(out[0], payload(keys[0]))
    assert store.stats()["corrupt_dropped"] == 1
    assert store.contains(keys) == [True, False]  # dropped: no one is served it again


def test_negative_control_unverified_reads_return_the_scribble(make_store):
    store = make_store(("host",), verify_reads="off")
    key = rand_key()
    store.put(LAYOUT, [key], batch([key]))
    scribble(store, key)
    out = empty_out(1)
    assert store.get(LAYOUT, [key], out).found == [True]
    assert not torch.equal(out[0], payload(key))  # the damage is real; only verification finds it


def test_sampled_verification_finds_a_scribble_within_a_few_gets(make_store):
    store = make_store(("host",), verify_reads="sampled")
    store.verifier.fraction = 0.25
    key = rand_key()
    store.put(LAYOUT, [key], batch([key]))
    scribble(store, key)
    for _ in range(200):
        if not store.get(LAYOUT, [key], empty_out(1)).found[0]:
            break
    assert store.stats()["corrupt_dropped"] == 1
    assert store.stats()["verified_reads"] >= 1


def test_checksum_travels_down_so_a_block_damaged_before_demotion_is_caught_on_nvme(make_store):
    store = make_store(("host", "nvme"), host_slots=2, verify_reads="off")
    victim = rand_key()
    store.put(LAYOUT, [victim], batch([victim]))
    scribble(store, victim)
    others = [rand_key() for _ in range(2)]
    store.put(LAYOUT, others, batch(others))  # demotes the victim, bytes and committed checksum
    assert store.where([victim]) == ["nvme"]
    res = store.get(LAYOUT, [victim], empty_out(1))
    assert res.found == [False]
    stats = store.stats()
    assert stats["corrupt_dropped"] == 1 and stats["io_errors"] == 0


def test_nvme_corruption_found_while_promoting_counts_as_corrupt(make_store):
    store = make_store(("host", "nvme"), host_slots=2)
    victim = rand_key()
    store.put(LAYOUT, [victim], batch([victim]))
    others = [rand_key() for _ in range(2)]
    store.put(LAYOUT, others, batch(others))
    nvme = store.tiers[1]
    slot = store._index[victim].slot
    with open(nvme.path, "r+b") as f:  # flip payload bytes on disk
        f.seek(nvme.payload_offset(slot) + 10)
        f.write(b"\xde\xad\xbe\xef")
    handles = store.acquire(LAYOUT, [victim])  # acquire promotes NVMe blocks into memory first
    assert handles == [None]
    stats = store.stats()
    assert stats["corrupt_dropped"] == 1 and stats["io_errors"] == 0


def test_a_fenced_writer_never_lands_in_a_reused_slot(make_store):
    store = make_store(("host",), host_slots=2, fence_grace_s=0.3)
    late = rand_key()
    [handle] = store.reserve(LAYOUT, [late])
    store.fence([handle])  # its hold expired while it was still writing
    assert store.fenced(handle)
    # The slot is not handed out during the grace period, whatever is asked for.
    for _ in range(3):
        key = rand_key()
        assert store.put(LAYOUT, [key], batch([key])).stored == 1
        assert store._index[key].slot != handle.slot
    time.sleep(0.4)
    again = rand_key()
    assert store.put(LAYOUT, [again], batch([again])).stored == 1  # after the grace the slot is back
    reused = store._index[again].slot == handle.slot
    assert reused
    # The late writer checks its generation before copying, and its commit is refused.
    assert store.fenced(handle)
    assert store.commit([handle]) == 0
    out = empty_out(1)
    assert store.get(LAYOUT, [again], out).found == [True] and torch.equal(out[0], payload(again))
    assert store.contains([late]) == [False]
    assert store.stats()["fenced_writes"] >= 2


def test_verify_settings_are_checked():
    with pytest.raises(ConfigError, match="verify_reads='sometimes'"):
        ReadVerifier("sometimes")
    with pytest.raises(ConfigError, match="verify_reads"):
        load_config(verify_reads="sometimes")
    with pytest.raises(ConfigError, match="verify_sample_fraction=1.5"):
        load_config(verify_sample_fraction=1.5)
    assert load_config().verify_reads == "sampled"


def test_a_fence_that_comes_after_the_commit_or_abort_changes_nothing(make_store):
    store = make_store(("host",), host_slots=4)
    committed, aborted = rand_key(), rand_key()
    [done], [dropped] = store.reserve(LAYOUT, [committed]), store.reserve(LAYOUT, [aborted])
    done.view.copy_(payload(committed))
    assert store.commit([done]) == 1
    store.abort([dropped])
    store.fence([done, dropped])  # a deadline firing just too late
    assert not store.fenced(done) and store.stats()["fenced_writes"] == 0
    out = empty_out(1)
    assert store.get(LAYOUT, [committed], out).found == [True] and torch.equal(out[0], payload(committed))
