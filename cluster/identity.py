"""A node's stable identity, and the NVMe directory that belongs to it.

Ray makes a new node id at every raylet start, so nothing that must outlive a restart may be
keyed by it. A node's NVMe tier lives in `<nvme_path>/<node_name>`, where `node_name` is a
setting (default: the host name, which is the pod name on Kubernetes), so a restarted node finds
its blocks again and never preallocates a second file.

The directory is claimed with an exclusive `flock` on a lock file inside it, held for the life of
the process: two node actors can never share one NVMe file (a second claimant waits a little, for
a previous owner that is still exiting, then fails with an error naming the directory and the
owner). At start the siblings under `nvme_path` that hold a kvstore NVMe file are listed and
reported (a warning with their names and sizes for those no live node holds, and the node's
stats), so files of old identities never pile up silently. The layout before node names
(`<nvme_path>/<first 12 hex digits of a Ray node id>`) is migrated when that is safe: this node
has no file yet, exactly one legacy file exists, it fits the configured geometry, and no process
has it open; otherwise it is reported.

No Ray here: the node actor calls `claim_nvme_dir` before it opens its tiers.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import socket
import time

from kvstore.config import Config
from kvstore.errors import ConfigError, TierIOError
from kvstore.tiers.geometry import SizeClasses
from kvstore.tiers.nvme import _VERSION, FILE_NAME, nvme_geometry, read_superblock  # the file's own format

log = logging.getLogger(__name__)

LOCK_NAME = "kvstore-node.lock"
LEGACY_NAME_RE = re.compile(r"^[0-9a-f]{12}$")  # nvme_path/<ray node id[:12]>, before node names
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def node_name(config: Config) -> str:
    """The configured node_name, else the host name (made safe as a directory name)."""
    if config.node_name:
        return config.node_name
    name = _UNSAFE.sub("_", socket.gethostname()).lstrip(".")[:200]
    return name or "localhost"


def _nvme_superblock(path: str) -> tuple | None:
    """(version, slot_nbytes, chunk_bytes, ids_per_chunk, num_chunks) of a kvstore NVMe file
    ((version,) alone for a file of another format version), None if path is not one."""
    return read_superblock(path)


def _held(lock_path: str) -> bool:
    """Whether a live process holds the flock on lock_path (probed without blocking)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False


def _owner(lock_path: str) -> str:
    try:
        with open(lock_path) as f:
            data = json.loads(f.read() or "{}")
        return ", ".join(f"{k} {v}" for k, v in data.items()) or "unknown"
    except (OSError, ValueError):
        return "unknown"


def _open_by_any_process(path: str) -> list[int]:
    """Pids of the processes (that this one can see) with path open."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(pid))
                break
    return pids


def foreign_nvme_dirs(nvme_path: str, own: str) -> list[dict]:
    """Siblings of `nvme_path/own` holding a kvstore NVMe file: name, path, bytes on disk,
    whether a live node holds them (its lock), and whether they look like the legacy layout."""
    found = []
    try:
        names = sorted(os.listdir(nvme_path))
    except OSError:
        return found
    for name in names:
        if name == own:
            continue
        directory = os.path.join(nvme_path, name)
        path = os.path.join(directory, FILE_NAME)
        if not os.path.isdir(directory) or _nvme_superblock(path) is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.append({"name": name, "path": path, "bytes": st.st_blocks * 512, "file_bytes": st.st_size,
                      "in_use": _held(os.path.join(directory, LOCK_NAME)),
                      "legacy": bool(LEGACY_NAME_RE.match(name))})
    return found


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class NVMeClaim:
    """This process's hold on its NVMe directory: released by `release` or at process exit."""

    nvme_path: str
    node_name: str
    directory: str
    lock_fd: int | None
    migrated_from: str | None = None

    def foreign(self) -> list[dict]:
        """The siblings holding kvstore NVMe files that are not this node's (rescanned now)."""
        return foreign_nvme_dirs(self.nvme_path, self.node_name)

    def stats(self) -> dict:
        return {"node_name": self.node_name, "directory": self.directory, "migrated_from": self.migrated_from,
                "foreign": self.foreign()}

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # drops the flock
            self.lock_fd = None


def _lock(directory: str, owner: dict, wait_s: float) -> int:
    lock_path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise TierIOError(f"cannot create the lock file {lock_path} of the NVMe tier: {e.strerror}") from e
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError(
                    f"the NVMe directory {directory} is in use by another kvstore node ({_owner(lock_path)}); "
                    "two nodes never share one NVMe file: give each node sharing nvme_path its own node_name "
                    "(KVSTORE_NODE_NAME)") from None
            time.sleep(0.1)  # a previous owner may still be exiting (or another node probing the lock)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd


def _migrate_legacy(nvme_path: str, directory: str, classes: SizeClasses, capacity_bytes: int) -> str | None:
    """Moves the one legacy NVMe file (nvme_path/<ray node id[:12]>) into `directory` when that is
    safe; otherwise warns. Returns the legacy directory migrated from, or None."""
    legacy = [d for d in foreign_nvme_dirs(nvme_path, os.path.basename(directory)) if d["legacy"]]
    if not legacy:
        return None
    listing = ", ".join(f"{d['name']} ({_human(d['bytes'])})" for d in legacy)
    if len(legacy) > 1:
        log.warning("%d NVMe files in the layout before node names under %s: %s; which one was this node's is "
                    "unknown, so none is adopted (rename the right directory to %s, remove the others)",
                    len(legacy), nvme_path, listing, directory)
        return None
    old = legacy[0]
    geometry = _nvme_superblock(old["path"])
    try:  # the geometry this configuration gives, computed as NVMeTier does
        g = nvme_geometry(classes, capacity_bytes)
        expected = (classes.slot_nbytes if g.single else 0, g.chunk_bytes, g.ids_per_chunk, g.num_chunks)
    except ConfigError:
        expected = None
    if geometry is None or expected is None or geometry[0] != _VERSION or tuple(geometry[1:]) != expected:
        log.warning("the NVMe file %s (layout before node names) does not fit the configuration (slot_bytes, "
                    "block_sizes, min_slot_bytes, chunk_bytes, nvme_tier_bytes, format version %d); "
                    "not adopted: remove it to free %s", old["path"], _VERSION, _human(old["bytes"]))
        return None
    users = _open_by_any_process(old["path"])
    if users or old["in_use"]:
        log.warning("the NVMe file %s (layout before node names) is open in processes %s; not adopted",
                    old["path"], users)
        return None
    try:
        os.rename(old["path"], os.path.join(directory, FILE_NAME))  # atomic: of two racing nodes one wins
    except OSError as e:
        log.warning("could not move the NVMe file %s into %s: %s; not adopted", old["path"], directory, e.strerror)
        return None
    try:
        os.rmdir(os.path.dirname(old["path"]))
    except OSError:
        pass
    log.warning("adopted the NVMe file of the layout before node names: moved %s to %s", old["path"], directory)
    return old["name"]


def claim_nvme_dir(config: Config, owner: dict | None = None, wait_s: float = 15.0) -> NVMeClaim:
    """Claims `nvme_path/<node_name>` for this process (exclusive lock), migrates a legacy file
    into it when safe, and warns about the siblings holding NVMe files no live node uses.

    Returns the claim; its `directory` is where the NVMe tier's file goes.
    """
    name = node_name(config)
    directory = os.path.join(config.nvme_path, name)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise TierIOError(f"nvme_path={config.nvme_path!r}: cannot create {directory}: {e.strerror}") from e
    owner = {"node_name": name, "host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}
    fd = _lock(directory, owner, wait_s)
    claim = NVMeClaim(config.nvme_path, name, directory, fd)
    try:
        if not os.path.exists(os.path.join(directory, FILE_NAME)):
            claim.migrated_from = _migrate_legacy(config.nvme_path, directory, config.size_classes(),
                                                  config.nvme_tier_bytes)
        unused = [d for d in claim.foreign() if not d["in_use"]]
        if unused:
            log.warning("NVMe files under %s that are not this node's (%s) and that no running node holds: %s. "
                        "They keep their disk space: remove the ones whose nodes are gone for good, or start "
                        "a node with that node_name to serve them again", config.nvme_path, name,
                        ", ".join(f"{d['name']} ({_human(d['bytes'])})" for d in unused))
    except BaseException:
        claim.release()
        raise
    return claim
