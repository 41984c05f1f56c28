"""A node actor handle whose binds run late: a slow node actor, for the cluster tests of puts
whose commit has not run yet (not collected: no test_ prefix)."""
from __future__ import annotations

import sys
import time

import ray

# Ray workers cannot import the test directory: ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
def _bind_later(node, args):
    time.sleep(2)
    return ray.get(node.bind_many.remote(*args))


class DelayedBinds:
    """A node actor handle whose binds (a put's commit) run 2 s after they are sent (a slow node actor)."""

    def __init__(self, handle) -> None:
        self.handle, self.refs = handle, []

    def __getattr__(self, name):
        return getattr(self.handle, name)

    @property
    def bind_many(self):
        sent = self

        class Later:
            def remote(self, *args):
                sent.refs.append(_bind_later.remote(sent.handle, args))
                return sent.refs[-1]
        return Later()
