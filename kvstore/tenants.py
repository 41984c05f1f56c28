"""Tenants: who a credential belongs to, and the part of the key space that tenant may address.

The cluster's own token (`auth_token`) is the admin credential: it addresses every block as
stored, and only it opens cluster-wide views (stats, metrics, nodes, the status page). A tenant
is configured in the tenants file (`tenants_file`, YAML, reread when it changes, so tenants are
added, removed and rotated without a restart):

    tenants:
      - name: acme
        token: "..."          # the tenant's secret credential (Flight and HTTP)
        key_secret: "..."     # optional: what its key scope derives from (default: the token)
        shared: false         # optional: true lets every tenant read (never write) its blocks
        quota:                # optional: the most its blocks may take per tier (kvstore/quotas.py)
          host: 4GiB
          nvme: 64GiB

A tenant's blocks live under *scoped* keys: the key a client computes (from the prompt and a
namespace, kvstore.keys) is stored as BLAKE2b-128 keyed with the tenant's scope, a secret
derived from its key secret (HMAC-SHA256, with the tenant's name). The servers apply the scope of
the caller's credential to every key it names, so a tenant addresses only its own blocks:
another tenant's key, known or guessed, names a different stored block, and a get of it is a
miss like any other (nothing tells the two apart), a delete or put of it touches only the
caller's own space. Rotating a token without a key secret starts that tenant on a fresh cache.
A tenant that opts in (`shared: true`, e.g. one holding public system prompts) is read by every
tenant: a get looks in the caller's own scope first, then in the shared tenants' (`readable`);
writes always go to the caller's own scope, so only its owner writes a shared block.
A tenant's puts count against its quotas, node by node: over one, its own least recently used
blocks make room, never another's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

from kvstore.config import parse_size
from kvstore.errors import ConfigError
from kvstore.keys import KEY_BYTES

log = logging.getLogger(__name__)

RELOAD_EVERY_S = 1.0  # the file's mtime is looked at most this often
MAX_TENANTS = 10_000
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    token: str = dataclasses.field(repr=False)
    scope: bytes = dataclasses.field(repr=False)  # empty for the admin (see admin())
    shared: bool = False  # every tenant may read its blocks
    quota: tuple[tuple[str, int], ...] = ()  # (tier name, bytes) per tier it is limited in, per node

    @classmethod
    def make(cls, name: str, token: str, key_secret: str = "", shared: bool = False,
             quota: dict[str, int] | None = None) -> "Tenant":
        scope = hmac.new((key_secret or token).encode(), b"kvstore tenant scope v1:" + name.encode(),
                         hashlib.sha256).digest()
        return cls(name, token, scope, shared, tuple(sorted((quota or {}).items())))

    @property
    def is_admin(self) -> bool:
        return not self.scope

    def stored(self, keys: Sequence[bytes]) -> list[bytes]:
        """The stored keys of the keys this tenant names (the admin's: the keys themselves)."""
        if not self.scope:
            return list(keys)
        return [hashlib.blake2b(k, digest_size=KEY_BYTES, key=self.scope).digest() for k in keys]


def admin(token: str) -> Tenant:
    """The admin: the cluster's own token, no scope (it addresses blocks as stored)."""
    return Tenant("admin", token, b"")


class Tenants:
    """The credentials a server accepts: the admin token and the tenants file's tenants."""

    def __init__(self, admin_token: str, path: str = "") -> None:
        if not admin_token:
            raise ConfigError("the cluster needs a non-empty auth token (the admin credential)")
        self._admin = admin(admin_token)
        self._path = path
        self._by_token: dict[bytes, Tenant] = {}
        self._by_name: dict[str, Tenant] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path:
            self._reload(force=True)

    def authenticate(self, credential: str | bytes) -> Tenant | None:
        """The tenant (or admin) a credential belongs to, or None. Compares in constant time."""
        given = credential.encode("utf-8", "surrogateescape") if isinstance(credential, str) else credential
        if not given:
            return None
        if hmac.compare_digest(given, self._admin.token.encode()):
            return self._admin
        self._reload()
        # Tokens are looked up by their hash: a dict lookup's timing tells nothing of the token.
        return self._by_token.get(hashlib.sha256(given).digest())

    def readable(self, tenant: Tenant, keys: Sequence[bytes],
                 present: "Callable[[list[bytes]], list[bool]]") -> list[bytes]:
        """The stored key a read of each of `keys` by `tenant` names: in its own scope where
        `present` says that block exists, else in the first shared tenant's scope that has it,
        else its own (a miss). Never for writes: they go to the tenant's own scope."""
        stored = tenant.stored(keys)
        self._reload()
        shared = [] if tenant.is_admin else [t for t in self._by_token.values() if t.shared and t is not tenant]
        if not shared:
            return stored
        missing = [i for i, here in enumerate(present(stored)) if not here]
        for other in shared:
            if not missing:
                break
            theirs = other.stored([keys[i] for i in missing])
            found = present(theirs)
            for i, key, here in zip(missing, theirs, found):
                if here:
                    stored[i] = key
            missing = [i for i, here in zip(missing, found) if not here]
        return stored

    def names(self) -> list[str]:
        self._reload()
        return sorted(t.name for t in self._by_token.values())

    def quota(self, name: str, tier: str) -> int | None:
        """Tenant `name`'s quota in bytes on tier `tier` of a node; None: no limit there (or no
        such tenant now: a removed tenant's blocks stay until evicted, no longer bounded)."""
        tenant = self._by_name.get(name)
        return None if tenant is None else dict(tenant.quota).get(tier)

    def _reload(self, force: bool = False) -> None:
        """Rereads the tenants file if it changed (looked at once a second at most). A file that
        no longer parses keeps the tenants it last had, and says why in the log."""
        if not self._path:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < RELOAD_EVERY_S:
                return
            self._checked = now
            try:
                mtime = os.stat(self._path).st_mtime
            except OSError as e:
                if force:
                    raise ConfigError(f"tenants_file={self._path!r} cannot be read: {e.strerror}") from None
                log.warning("tenants_file %s cannot be read (%s); keeping the tenants it had", self._path, e.strerror)
                return
            if mtime == self._mtime:
                return
            try:
                tenants = load_tenants(Path(self._path).read_text(), self._admin.token)
            except (ConfigError, OSError) as e:
                if force:
                    raise ConfigError(f"tenants_file={self._path!r}: {e}") from None
                log.warning("tenants_file %s is not valid (%s); keeping the tenants it had", self._path, e)
                return
            self._by_token = {hashlib.sha256(t.token.encode()).digest(): t for t in tenants}
            self._by_name = {t.name: t for t in tenants}
            self._mtime = mtime
            log.info("tenants: %d from %s", len(tenants), self._path)


def load_tenants(text: str, admin_token: str = "") -> list[Tenant]:
    """The tenants of a tenants file's text; ConfigError naming what is wrong."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}") from None
    if not isinstance(data, dict) or set(data) - {"tenants"}:
        raise ConfigError("must be a mapping with one key, 'tenants' (a list)")
    entries = data.get("tenants") or []
    if not isinstance(entries, list) or len(entries) > MAX_TENANTS:
        raise ConfigError(f"'tenants' must be a list of at most {MAX_TENANTS}")
    tenants, names, tokens = [], set(), set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"name", "token", "key_secret", "shared", "quota"}:
            raise ConfigError(f"tenants[{i}] must be a mapping of name, token and (optional) key_secret, shared "
                              "and quota")
        name, token, key_secret = entry.get("name"), entry.get("token"), entry.get("key_secret", "")
        shared = entry.get("shared", False)
        if not isinstance(name, str) or not 0 < len(name) <= 64 or set(name) - _NAME_CHARS:
            raise ConfigError(f"tenants[{i}].name={name!r} must be 1-64 letters, digits, '-', '_' or '.'")
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"tenants[{i}] ({name}): its token must be a string of at least 16 characters")
        if not isinstance(key_secret, str):
            raise ConfigError(f"tenants[{i}] ({name}): key_secret must be a string")
        if not isinstance(shared, bool):
            raise ConfigError(f"tenants[{i}] ({name}): shared={shared!r} must be true or false")
        if name in names or name == "admin":
            raise ConfigError(f"tenants[{i}].name={name!r} is taken (twice, or the admin's)")
        if token in tokens or token == admin_token:
            raise ConfigError(f"tenants[{i}] ({name}): its token is another's (a tenant's, or the admin's)")
        quota = _quota(entry.get("quota"), f"tenants[{i}] ({name}).quota")
        names.add(name)
        tokens.add(token)
        tenants.append(Tenant.make(name, token, key_secret, shared, quota))
    return tenants


QUOTA_TIERS = ("hbm", "host", "nvme")


def _quota(value, where: str) -> dict[str, int]:
    """A tenant's quota mapping (tier name -> size); ConfigError naming what is wrong."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - set(QUOTA_TIERS):
        raise ConfigError(f"{where}={value!r} must map some of {', '.join(QUOTA_TIERS)} to sizes")
    return {tier: parse_size(size, f"{where}.{tier}") for tier, size in value.items()}
