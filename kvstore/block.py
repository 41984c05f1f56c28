"""A block's lifecycle in the store, as explicit states and the only transitions allowed.

    WRITING --commit------> READY --start_move--> MOVING --finish_move--> READY
       |                      |  \\                  |
       |abort                 |drop \\doom            |doom
       v                      v      v              v
     FREED <---release---- DOOMED <------------------+
       ^                      ^
       +------ (drop) --------+-- doom (from WRITING)

- WRITING: a slot is reserved and bytes are being copied in; invisible to readers.
- READY: visible; readers pin it; the only state eviction may act on (and only with no pins).
- MOVING: being copied to another tier (demotion or promotion); visible, readers wait for READY.
- DOOMED: deleted while a pin, a writer or a mover still holds it; invisible; the slot is
  released by whoever lets go last.
- FREED: gone from the index; its slot is back on the free list.

Any other transition raises BlockStateError, so a bug that would, say, evict a block under a
reader fails loudly instead of serving freed memory.
"""
from __future__ import annotations

import enum

from kvstore.errors import BlockStateError


class BlockState(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    MOVING = "moving"
    DOOMED = "doomed"
    FREED = "freed"


_S = BlockState
_TRANSITIONS: dict[tuple[BlockState, str], BlockState] = {
    (_S.WRITING, "commit"): _S.READY,
    (_S.WRITING, "abort"): _S.FREED,
    (_S.WRITING, "doom"): _S.DOOMED,
    (_S.READY, "start_move"): _S.MOVING,
    (_S.READY, "drop"): _S.FREED,
    (_S.READY, "doom"): _S.DOOMED,
    (_S.MOVING, "finish_move"): _S.READY,
    (_S.MOVING, "doom"): _S.DOOMED,
    (_S.DOOMED, "release"): _S.FREED,
}


class BlockEntry:
    """The store's record of one block: where it lives, its state, and who holds it."""

    __slots__ = ("key", "layout_id", "nbytes", "tier", "slot", "state", "pins", "parent", "checksum", "owner")

    def __init__(self, key: bytes, layout_id: bytes, nbytes: int, tier: int, slot: int,
                 parent: bytes | None, state: BlockState = BlockState.WRITING, checksum: int | None = None,
                 owner: int = 0) -> None:
        self.key = key
        self.layout_id = layout_id
        self.nbytes = nbytes
        self.tier = tier
        self.slot = slot
        self.parent = parent
        self.state = state
        self.pins = 0
        self.checksum = checksum  # set at commit (kvstore.integrity); travels with the block
        self.owner = owner  # the tenant whose quota it counts against (kvstore/quotas.py); 0: none

    def transition(self, event: str) -> None:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise BlockStateError(f"block {self.key.hex()} cannot {event} while {self.state.value}")
        if event in ("drop", "start_move") and self.pins:
            raise BlockStateError(f"block {self.key.hex()} cannot {event} while pinned {self.pins} time(s)")
        self.state = new

    def pin(self) -> None:
        if self.state is not BlockState.READY:
            raise BlockStateError(f"block {self.key.hex()} cannot be pinned while {self.state.value}")
        self.pins += 1

    def unpin(self) -> None:
        if self.pins <= 0 or self.state not in (BlockState.READY, BlockState.DOOMED):
            raise BlockStateError(f"block {self.key.hex()} is not pinned (state {self.state.value}, pins {self.pins})")
        self.pins -= 1

    @property
    def visible(self) -> bool:
        """Present for lookups: readable now (READY) or once its move finishes (MOVING)."""
        return self.state is BlockState.READY or self.state is BlockState.MOVING

    @property
    def evictable(self) -> bool:
        return self.state is BlockState.READY and self.pins == 0

    def __repr__(self) -> str:
        return (f"BlockEntry({self.key.hex()[:12]}, tier={self.tier}, slot={self.slot}, "
                f"{self.state.value}, pins={self.pins})")
