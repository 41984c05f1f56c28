"""Block lifecycle: the legal transitions, and BlockStateError for every other one."""
from __future__ import annotations

import itertools

import pytest

from kvstore.block import BlockEntry, BlockState
from kvstore.errors import BlockStateError

S = BlockState
EVENTS = ["commit", "abort", "doom", "start_move", "drop", "finish_move", "release"]
LEGAL = {
    (S.WRITING, "commit"): S.READY,
    (S.WRITING, "abort"): S.FREED,
    (S.WRITING, "doom"): S.DOOMED,
    (S.READY, "start_move"): S.MOVING,
    (S.READY, "drop"): S.FREED,
    (S.READY, "doom"): S.DOOMED,
    (S.MOVING, "finish_move"): S.READY,
    (S.MOVING, "doom"): S.DOOMED,
    (S.DOOMED, "release"): S.FREED,
}
KEY = bytes(range(16))


def entry(state: BlockState = S.WRITING) -> BlockEntry:
    return BlockEntry(KEY, b"L" * 16, 2048, tier=1, slot=5, parent=None, state=state)


def test_new_entry():
    e = BlockEntry(KEY, b"L" * 16, 2048, 0, 3, parent=b"P" * 16)
    assert e.state is S.WRITING and e.pins == 0
    assert (e.tier, e.slot, e.nbytes, e.parent) == (0, 3, 2048, b"P" * 16)
    assert not e.visible and not e.evictable
    assert "writing" in repr(e)


@pytest.mark.parametrize("state,event", sorted(LEGAL, key=str))
def test_legal_transitions(state, event):
    e = entry(state)
    e.transition(event)
    assert e.state is LEGAL[(state, event)]


ILLEGAL = [(s, ev) for s, ev in itertools.product(S, EVENTS) if (s, ev) not in LEGAL]


@pytest.mark.parametrize("state,event", ILLEGAL, ids=[f"{s.value}-{ev}" for s, ev in ILLEGAL])
def test_every_illegal_transition_raises(state, event):
    e = entry(state)
    with pytest.raises(BlockStateError) as info:
        e.transition(event)
    assert e.state is state  # unchanged
    assert KEY.hex() in str(info.value) and event in str(info.value) and state.value in str(info.value)


def test_unknown_event_raises():
    with pytest.raises(BlockStateError, match="explode"):
        entry(S.READY).transition("explode")


def test_freed_is_terminal():
    for event in EVENTS:
        with pytest.raises(BlockStateError):
            entry(S.FREED).transition(event)


def test_full_lifecycles():
    e = entry()
    for event, state in [("commit", S.READY), ("start_move", S.MOVING), ("finish_move", S.READY),
                         ("doom", S.DOOMED), ("release", S.FREED)]:
        e.transition(event)
        assert e.state is state


def test_pins():
    e = entry(S.READY)
    assert e.visible and e.evictable
    e.pin()
    e.pin()
    assert e.pins == 2 and not e.evictable and e.visible
    with pytest.raises(BlockStateError, match="pinned 2"):
        e.transition("drop")
    assert e.state is S.READY
    with pytest.raises(BlockStateError, match="cannot release while ready"):
        e.transition("release")
    e.transition("doom")  # a delete under readers
    assert not e.visible and not e.evictable
    with pytest.raises(BlockStateError, match="cannot be pinned while doomed"):
        e.pin()
    e.unpin()  # readers let go of a doomed block
    e.unpin()
    assert e.pins == 0
    with pytest.raises(BlockStateError, match="not pinned"):
        e.unpin()
    e.transition("release")
    assert e.state is S.FREED


@pytest.mark.parametrize("state", [S.WRITING, S.MOVING, S.DOOMED, S.FREED])
def test_pin_only_when_ready(state):
    e = entry(state)
    with pytest.raises(BlockStateError, match=state.value):
        e.pin()
    assert e.pins == 0


@pytest.mark.parametrize("state", list(S))
def test_unpin_without_pin_raises(state):
    with pytest.raises(BlockStateError):
        entry(state).unpin()


def test_unpin_while_moving_raises():
    e = entry(S.READY)
    e.pin()
    e.state = S.MOVING  # cannot happen through transitions (pinned blocks do not move); guarded anyway
    with pytest.raises(BlockStateError, match="moving"):
        e.unpin()


def test_visibility_and_evictability_by_state():
    assert [entry(s).visible for s in S] == [s in (S.READY, S.MOVING) for s in S]
    assert [entry(s).evictable for s in S] == [s is S.READY for s in S]


def test_a_pinned_block_cannot_start_moving():
    from kvstore.block import BlockEntry, BlockState
    from kvstore.errors import BlockStateError

    entry = BlockEntry(b"k" * 16, b"l" * 16, 8, 0, 0, None, BlockState.READY)
    entry.pin()
    with pytest.raises(BlockStateError, match="start_move while pinned"):
        entry.transition("start_move")
    entry.unpin()
    entry.transition("start_move")
    assert entry.state is BlockState.MOVING
