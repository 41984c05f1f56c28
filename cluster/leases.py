"""A lease: blocks pinned on their owner node for a reader to come (a prefill/decode handoff).

Its id is "<hold id>@<node id>": the hold on the owner that pins the blocks, and the owner. The
Ray client takes and ends leases with a call to the owner's node actor; a remote client through
the HTTP service (POST /v1/leases, /v1/leases/release: kvstore/service.py), which lets a tenant
end only the leases it took. A get may name a lease to end once its blocks are out: on the data
plane only with the admin's credential (a tenant's get ends its lease over HTTP after the pull),
so no tenant can end another's lease by naming its id.
"""
from __future__ import annotations

import dataclasses

from kvstore.errors import LeaseError


@dataclasses.dataclass(frozen=True)
class Lease:
    lease_id: str  # "<hold id>@<node id>"
    node_id: str
    keys: list[bytes]  # the ones pinned
    expires_in_s: float


def lease_parts(lease: object) -> tuple[str, str]:
    """(hold id, node id) of a lease (anything with `lease_id`) or a lease id; LeaseError if it is
    not one."""
    lease_id = getattr(lease, "lease_id", lease)
    hold_id, _, node_id = lease_id.partition("@") if isinstance(lease_id, str) else ("", "", "")
    if not hold_id or not node_id:
        raise LeaseError(f"lease id {lease_id!r} is not '<hold id>@<node id>'")
    return hold_id, node_id
