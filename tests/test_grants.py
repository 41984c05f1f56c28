"""Granted slots in one store (TieredStore.grant / bind): a writer fills slots handed out before
it named their keys. A bind lands only in a slot still granted at the generation it was given;
a fenced grant's writer never lands, and granted slots never leak."""
from __future__ import annotations

import time

import pytest
import torch

from kvstore.errors import LeaseError

from kvtest_support import LAYOUT, NBYTES, assert_consistent, batch, empty_out, make_store, payload, rand_key, used_slots

__all__ = ["make_store"]


def fill(store, granted, keys) -> list[tuple[int, int, bytes, None]]:
    """Copies each key's bytes into its granted slot, as a client does through the arena."""
    writes = []
    for (slot, generation), key in zip(granted, keys):
        store.tiers[0].view(slot)[:NBYTES].copy_(payload(key))
        writes.append((slot, generation, key, None))
    return writes


def test_bound_blocks_are_stored_with_their_own_bytes(make_store):
    store = make_store(("host",), host_slots=8)
    granted = store.grant(LAYOUT, 3)
    assert len(granted) == 3 and store.stats()["granted_slots"] == 3
    keys = [rand_key() for _ in range(3)]
    assert store.bind(LAYOUT, fill(store, granted, keys)) == ["stored"] * 3
    out = empty_out(3)
    assert store.get(LAYOUT, keys, out).found == [True] * 3 and torch.equal(out, batch(keys))
    assert store.stats()["granted_slots"] == 0
    assert_consistent(store)


def test_a_key_stored_meanwhile_is_present_and_its_slot_freed(make_store):
    store = make_store(("host",), host_slots=4)
    key = rand_key()
    granted = store.grant(LAYOUT, 1)
    assert store.put(LAYOUT, [key], batch([key])).stored == 1  # another writer, first
    assert store.bind(LAYOUT, fill(store, granted, [key])) == ["present"]
    assert used_slots(store) == 1 and store.stats()["granted_slots"] == 0
    assert_consistent(store)


def test_a_fenced_grant_never_lands_even_in_its_reused_slot(make_store):
    store = make_store(("host",), host_slots=2, fence_grace_s=0.3, verify_reads="always")
    [(slot, generation)] = store.grant(LAYOUT, 1)
    store.fence_granted([(slot, generation)])  # its grant expired while the writer was away
    assert store.stats()["granted_slots"] == 0
    for _ in range(3):  # not handed out during the grace period
        key = rand_key()
        store.put(LAYOUT, [key], batch([key]))
        assert store._index[key].slot != slot
    time.sleep(0.4)
    again = rand_key()
    store.put(LAYOUT, [again], batch([again]))
    assert store._index[again].slot == slot  # back in use after the grace
    late = rand_key()
    store.tiers[0].view(slot)[:NBYTES].copy_(payload(late))  # a late writer that did not check
    assert store.bind(LAYOUT, [(slot, generation, late, None)]) == ["fenced"]
    assert store.contains([late]) == [False]
    # The slot is the other block's: its bytes were overwritten, and a read says so (a miss).
    assert store.get(LAYOUT, [again], empty_out(1)).found == [False]
    assert store.stats()["corrupt_dropped"] == 1


def test_a_slot_granted_again_refuses_the_old_generation(make_store):
    store = make_store(("host",), host_slots=1, fence_grace_s=0.01)
    [(slot, old)] = store.grant(LAYOUT, 1)
    store.fence_granted([(slot, old)])
    time.sleep(0.05)
    [(again, new)] = store.grant(LAYOUT, 1)
    assert again == slot and new != old
    key = rand_key()
    assert store.bind(LAYOUT, [(slot, old, key, None)]) == ["fenced"]  # the old writer
    assert store.bind(LAYOUT, fill(store, [(slot, new)], [key])) == ["stored"]  # the new one


def test_slots_that_were_never_granted_are_refused(make_store):
    store = make_store(("host",), host_slots=4)
    key = rand_key()
    assert store.put(LAYOUT, [key], batch([key])).stored == 1
    slot = store._index[key].slot
    generation = int(store.tiers[0].generations[slot])
    assert store.bind(LAYOUT, [(slot, generation, rand_key(), None)]) == ["fenced"]  # a stored block's slot
    out = empty_out(1)
    assert store.get(LAYOUT, [key], out).found == [True] and torch.equal(out[0], payload(key))
    with pytest.raises(LeaseError, match="slot 99"):
        store.bind(LAYOUT, [(99, 0, rand_key(), None)])
    with pytest.raises(LeaseError, match="slot -1"):
        store.bind(LAYOUT, [(-1, 0, rand_key(), None)])


def test_ungranted_slots_are_free_again(make_store):
    store = make_store(("host",), host_slots=4)
    granted = store.grant(LAYOUT, 4)
    assert store.grant(LAYOUT, 1) == []  # granted slots are no blocks: nothing to evict for another
    store.ungrant(granted)
    keys = [rand_key() for _ in range(4)]
    assert store.put(LAYOUT, keys, batch(keys)).stored == 4


def test_slots_ahead_come_only_from_free_slots(make_store):
    store = make_store(("host",), host_slots=4)
    keys = [rand_key() for _ in range(3)]
    store.put(LAYOUT, keys, batch(keys))
    granted = store.grant(LAYOUT, 1, ahead=8)
    assert len(granted) == 1  # the one free slot: nothing is evicted for slots ahead
    assert store.contains(keys) == [True] * 3
    granted += store.grant(LAYOUT, 2, ahead=8)  # the slots asked for are made room for
    assert len(granted) == 3 and store.contains(keys).count(True) == 1


def test_a_bind_over_its_owners_quota_is_rejected(make_store):
    store = make_store(("host",), host_slots=8, quota_of=lambda name, tier: 2 * NBYTES if name == "a" else None)
    keys = [rand_key() for _ in range(3)]
    outcome = store.bind(LAYOUT, fill(store, store.grant(LAYOUT, 3), keys), owner="a")
    assert outcome == ["stored", "stored", "rejected"]
    assert store.contains(keys) == [True, True, False]
    assert store.stats()["put_rejected"] == 1
    assert_consistent(store)
