"""Eviction policies: the order in which one tier gives up its blocks.

Each tier has its own policy instance, which tracks only the keys resident in that tier.

The store calls:
- `insert(key)` when a block lands in the tier (put, demotion into it, promotion into it);
- `touch(key)` on a hit;
- `remove(key)` when the block leaves the tier (evicted, moved, deleted);
- `set_has_children(key, flag)` when a block gains its first child in the store or loses its
  last one (only a prefix-aware policy, made with `has_children`, heeds it);
- `candidates()` when it needs a slot: keys, best victim first. The store takes the first one
  it may evict (READY and unpinned) and stops iterating; it must not mutate the policy while a
  `candidates()` iterator is live, and it calls `remove` for the victim it took.

Policies never see pins or states: that keeps them small and the store the one place that
decides what may be evicted.

Prefix-aware ordering: a child block is useless without its parent (a prefix match stops at the
first missing block), so within each queue a block with children goes after every childless one
("leaf"). In a prompt chain nearly every block has a child, so each queue keeps its leaves and its
parents apart (`LeafFirstQueue`) and the policy is told of every change rather than asking: the
first victim is found in O(1) however many blocks have children.
"""
from __future__ import annotations

import abc
import itertools
from collections import OrderedDict
from typing import Callable, Iterator

from kvstore.errors import ConfigError


class EvictionPolicy(abc.ABC):
    @abc.abstractmethod
    def insert(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def touch(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def remove(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def set_has_children(self, key: bytes, has_children: bool) -> None: ...

    @abc.abstractmethod
    def candidates(self) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LeafFirstQueue:
    """Keys in queue order, every leaf before every parent; O(1) to find the first.

    Two ordered dicts of key -> stamp (when the key last entered the queue at its back). A key
    whose status changes keeps its place in time as far as O(1) allows: it goes to the front of
    its new part if it entered the queue before that part's front key, else to the back. That is
    exact in the two cases prefix caching makes common: a parent stored or hit together with its
    child goes first once the child is gone, so a chain is eaten from its tail; a parent shared by
    many prompts, used more recently than any leaf, goes last. Otherwise it errs towards keeping.
    """

    def __init__(self, clock: Iterator[int]) -> None:
        self._clock = clock
        self._leaves: OrderedDict[bytes, int] = OrderedDict()
        self._parents: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._leaves) + len(self._parents)

    def __contains__(self, key: bytes) -> bool:
        return key in self._leaves or key in self._parents

    def __iter__(self) -> Iterator[bytes]:
        return itertools.chain(self._leaves, self._parents)

    @property
    def leaf_count(self) -> int:
        return len(self._leaves)

    def is_leaf(self, key: bytes) -> bool:
        return key in self._leaves

    def first(self, past_leaves: bool = False) -> bytes:
        """The front key: the first leaf, or the first parent when there is none (or when
        `past_leaves`). The queue must not be empty."""
        if self._leaves and not past_leaves:
            return next(iter(self._leaves))
        return next(iter(self._parents or self._leaves))

    def push(self, key: bytes, leaf: bool) -> None:
        """Puts key at the back of its part (moving it there if it is queued already)."""
        self.pop(key)
        (self._leaves if leaf else self._parents)[key] = next(self._clock)

    def to_back(self, key: bytes) -> None:
        self.push(key, self.is_leaf(key))

    def pop(self, key: bytes) -> bool | None:
        """Removes key; returns whether it was a leaf, or None if it was not queued."""
        if self._leaves.pop(key, None) is not None:
            return True
        if self._parents.pop(key, None) is not None:
            return False
        return None

    def set_leaf(self, key: bytes, leaf: bool) -> None:
        src, dst = (self._parents, self._leaves) if leaf else (self._leaves, self._parents)
        stamp = src.pop(key, None)
        if stamp is None:
            return  # not queued here, or in its part already
        goes_first = bool(dst) and stamp < next(iter(dst.values()))
        dst[key] = stamp
        if goes_first:
            dst.move_to_end(key, last=False)


def _leaf_test(has_children: Callable[[bytes], bool] | None) -> Callable[[bytes], bool]:
    """Whether a key enters a queue as a leaf: always, for a policy that is not prefix-aware."""
    if has_children is None:
        return lambda key: True
    return lambda key: not has_children(key)


class LRUPolicy(EvictionPolicy):
    """Least recently used first (leaves before parents when prefix-aware)."""

    def __init__(self, capacity: int = 0, has_children: Callable[[bytes], bool] | None = None) -> None:
        self._queue = LeafFirstQueue(itertools.count())
        self._is_leaf = _leaf_test(has_children)
        self._prefix_aware = has_children is not None

    def insert(self, key: bytes) -> None:
        self._queue.push(key, self._is_leaf(key))

    def touch(self, key: bytes) -> None:
        if key in self._queue:
            self._queue.to_back(key)

    def remove(self, key: bytes) -> None:
        self._queue.pop(key)

    def set_has_children(self, key: bytes, has_children: bool) -> None:
        if self._prefix_aware:
            self._queue.set_leaf(key, not has_children)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): scan-resistant with FIFO queues only.

    New blocks enter a small queue (10% of capacity); one that is hit again before it reaches
    the head moves to the main queue, the rest are evicted early, so a one-off scan (a long
    prompt seen once) cannot flush the blocks that are reused. Main-queue blocks that were hit
    get another lap. A ghost list remembers recently evicted small-queue keys: one that comes
    back goes straight to main.

    Prefix-aware, the choice of queue is S3-FIFO's own (the small queue's size counts its parents
    too); only within the chosen queue do leaves go first. A one-off prompt is a chain of parents
    with one leaf, and it is eaten from its tail, still out of the small queue.
    """

    _MAX_FREQ = 3

    def __init__(self, capacity: int, has_children: Callable[[bytes], bool] | None = None) -> None:
        if capacity < 1:
            raise ConfigError(f"S3-FIFO capacity={capacity!r} must be at least 1")
        self._small_target = max(1, capacity // 10)
        self._ghost_limit = capacity
        clock = itertools.count()
        self._small = LeafFirstQueue(clock)
        self._main = LeafFirstQueue(clock)
        self._hits: dict[bytes, int] = {}  # hits since the key last moved, capped; absent means none
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._is_leaf = _leaf_test(has_children)
        self._prefix_aware = has_children is not None

    def insert(self, key: bytes) -> None:
        self._hits.pop(key, None)
        if key in self._ghost:
            del self._ghost[key]
            self._main.push(key, self._is_leaf(key))
        else:
            self._small.push(key, self._is_leaf(key))

    def touch(self, key: bytes) -> None:
        if key in self._small or key in self._main:
            self._hits[key] = min(self._hits.get(key, 0) + 1, self._MAX_FREQ)

    def remove(self, key: bytes) -> None:
        self._hits.pop(key, None)
        if self._small.pop(key) is not None:
            self._ghost[key] = None
            if len(self._ghost) > self._ghost_limit:
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key)

    def set_has_children(self, key: bytes, has_children: bool) -> None:
        if self._prefix_aware:
            self._small.set_leaf(key, not has_children)
            self._main.set_leaf(key, not has_children)

    def candidates(self) -> Iterator[bytes]:
        # Each step offers a victim, ages one entry (small -> main, or one lap less in main), or
        # passes over one already offered. Every key is offered at most once (the store may take
        # several before it removes any), and a key ages at most _MAX_FREQ + 1 times and is passed
        # over at most once per lap, so (2 * _MAX_FREQ + 3) steps per key are always enough.
        # A queue whose leaves were all offered offers its parents next.
        offered: set[bytes] = set()
        offered_all = {self._small: 0, self._main: 0}
        offered_leaves = {self._small: 0, self._main: 0}
        budget = (2 * self._MAX_FREQ + 3) * len(self) + 2
        while budget > 0:
            budget -= 1
            small_open = len(self._small) > offered_all[self._small]
            main_open = len(self._main) > offered_all[self._main]
            if not (small_open or main_open):
                return
            from_small = small_open and (len(self._small) >= self._small_target or not main_open)
            queue = self._small if from_small else self._main
            key = queue.first(past_leaves=offered_leaves[queue] == queue.leaf_count)
            if key in offered:
                queue.to_back(key)
                continue
            hits = self._hits.pop(key, 0)
            if hits > 0:
                leaf = queue.pop(key)
                if not from_small and hits > 1:
                    self._hits[key] = hits - 1
                self._main.push(key, leaf)
                continue
            offered.add(key)
            offered_all[queue] += 1
            offered_leaves[queue] += queue.is_leaf(key)
            yield key
            # Resumed: the store could not take this one (pinned, say), or takes several at once;
            # look past it.
            if key in queue:
                queue.to_back(key)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str, capacity: int, has_children: Callable[[bytes], bool] | None = None) -> EvictionPolicy:
    """The named policy for a tier of `capacity` slots, prefix-aware when `has_children` is given."""
    if name not in POLICIES:
        raise ConfigError(f"eviction_policy={name!r} is not one of {', '.join(POLICIES)}")
    return POLICIES[name](capacity, has_children)
