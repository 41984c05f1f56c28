"""Eviction policies: the order in which one tier gives up its blocks.

Each tier has its own policy instance, which tracks only the keys resident in that tier.

The store calls:
- `insert(key)` when a block lands in the tier (put, demotion into it, promotion into it);
- `touch(key)` on a hit;
- `remove(key)` when the block leaves the tier (evicted, moved, deleted);
- `candidates()` when it needs a slot: keys, best victim first. The store takes the first one
  it may evict (READY and unpinned) and stops iterating; it must not mutate the policy while a
  `candidates()` iterator is live, and it calls `remove` for the victim it took.

Policies never see pins or states: that keeps them small and the store the one place that
decides what may be evicted.
"""
from __future__ import annotations

import abc
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
    def candidates(self) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self, capacity: int = 0) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): scan-resistant with FIFO queues only.

    New blocks enter a small queue (10% of capacity); one that is hit again before it reaches
    the head moves to the main queue, the rest are evicted early, so a one-off scan (a long
    prompt seen once) cannot flush the blocks that are reused. Main-queue blocks that were hit
    get another lap. A ghost list remembers recently evicted small-queue keys: one that comes
    back goes straight to main.
    """

    _MAX_FREQ = 3

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"S3-FIFO capacity={capacity!r} must be at least 1")
        self._small_target = max(1, capacity // 10)
        self._ghost_limit = capacity
        self._small: OrderedDict[bytes, int] = OrderedDict()
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def touch(self, key: bytes) -> None:
        for queue in (self._small, self._main):
            if key in queue:
                queue[key] = min(queue[key] + 1, self._MAX_FREQ)
                return

    def remove(self, key: bytes) -> None:
        if self._small.pop(key, None) is not None:
            self._ghost[key] = None
            if len(self._ghost) > self._ghost_limit:
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        # Each step offers a victim, ages one entry (small -> main, or one lap less in main), or
        # passes over one already offered. Every key is offered at most once (the store may take
        # several before it removes any), and a key ages at most _MAX_FREQ + 1 times and is passed
        # over at most once per lap, so (2 * _MAX_FREQ + 3) steps per key are always enough.
        offered: set[bytes] = set()
        offered_small = offered_main = 0
        budget = (2 * self._MAX_FREQ + 3) * len(self) + 2
        while budget > 0:
            budget -= 1
            small_open = len(self._small) > offered_small
            main_open = len(self._main) > offered_main
            if not (small_open or main_open):
                return
            from_small = small_open and (len(self._small) >= self._small_target or not main_open)
            queue = self._small if from_small else self._main
            key, freq = next(iter(queue.items()))
            if key in offered:
                queue.move_to_end(key)
                continue
            if freq > 0:
                del queue[key]
                self._main[key] = 0 if from_small else freq - 1
                continue
            offered.add(key)
            if from_small:
                offered_small += 1
            else:
                offered_main += 1
            yield key
            # Resumed: the store could not take this one (pinned, say), or takes several at once;
            # look past it.
            if key in queue:
                queue.move_to_end(key)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


class PrefixAwarePolicy(EvictionPolicy):
    """Wraps a policy so that a block with children in the store goes after its children.

    A child is useless without its parent (a prefix match stops at the first missing block),
    so evicting parents first would throw away whole chains. Blocks with children are offered
    only after every childless candidate, which keeps eviction possible when every candidate
    has children.
    """

    def __init__(self, base: EvictionPolicy, has_children: Callable[[bytes], bool]) -> None:
        self._base = base
        self._has_children = has_children

    def insert(self, key: bytes) -> None:
        self._base.insert(key)

    def touch(self, key: bytes) -> None:
        self._base.touch(key)

    def remove(self, key: bytes) -> None:
        self._base.remove(key)

    def candidates(self) -> Iterator[bytes]:
        deferred = []
        for key in self._base.candidates():
            if self._has_children(key):
                deferred.append(key)
            else:
                yield key
        yield from deferred

    def __len__(self) -> int:
        return len(self._base)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}


def make_policy(name: str, capacity: int, has_children: Callable[[bytes], bool] | None = None) -> EvictionPolicy:
    """The named policy for a tier of `capacity` slots, prefix-aware when `has_children` is given."""
    if name not in POLICIES:
        raise ConfigError(f"eviction_policy={name!r} is not one of {', '.join(POLICIES)}")
    policy = POLICIES[name](capacity)
    return policy if has_children is None else PrefixAwarePolicy(policy, has_children)
