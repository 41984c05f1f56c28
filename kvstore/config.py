"""kvstore's configuration: one flat set of names, read from a YAML file and the environment.

Every setting has one name. In the YAML file it is a top-level key (`host_tier_bytes: 4GiB`); in
the environment it is that name upper-cased behind `KVSTORE_` (`KVSTORE_HOST_TIER_BYTES=4GiB`).
The environment wins over the file, the file over the defaults. The Helm chart renders its
ConfigMap with these same names, and its tests load the rendered file with `load_config`, so
the chart and the service cannot drift apart.

`docs/configuration.md` is generated from the table below (`kvstore config --markdown`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvstore.errors import ConfigError
from kvstore.tiers.geometry import SizeClasses

ENV_PREFIX = "KVSTORE_"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
MAX_INDEX_SHARDS = 4096
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, name: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB", "4GiB", "2G" (SI) or "1048576"."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}={value!r} is negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(
        f"{name}={value!r} is not a size; use bytes or a number with a unit such as 512MiB or 4GiB"
    )


def _setting(default: Any, doc: str, kind: str = "str", choices: tuple = ()) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, "kind": kind, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings of a kvstore node and service. Build with `load_config`, not by hand."""

    namespace: str = _setting("default", "Tenant namespace salted into every block key; two namespaces never share a block.")
    block_sizes: str = _setting("auto", "Slot sizes (size classes) of the node's tiers; a block goes to the smallest that fits it. auto: derived from the layouts seen, a new size whenever no size fits a block with at most 25% of its slot left over. A list (64KiB,2MiB,5MiB) declares sizes; with auto in it (64KiB,2MiB,auto) more are derived. Capacity is shared: chunks of chunk_bytes go to sizes on demand, and a size holding less than its share of the bytes recently stored takes a chunk from one holding more.")
    slot_bytes: int = _setting(0, "One slot size for every block (the setting before block_sizes): a layout whose block is larger is refused, a smaller one wastes the rest of its slot. 0: unset (block_sizes decides). Setting it with a block_sizes other than auto is an error.", "size")
    min_slot_bytes: int = _setting(16 * 1024, "Smallest slot of a derived size: smaller blocks share it (so the 25% bound holds for blocks of at least 3/4 of it). Per-slot metadata (about 100 bytes in memory, 128 on NVMe) is sized for capacity / min_slot_bytes slots.", "size")
    chunk_bytes: int = _setting(64 * 1024**2, "Unit in which tier capacity is handed to block sizes; also the largest block a tier takes. A tier smaller than 8 chunks is cut into 8 smaller ones.", "size")
    hbm_tier_bytes: int = _setting(0, "GPU memory for the HBM tier (0 disables it; needs CUDA).", "size")
    host_tier_bytes: int = _setting(1024**3, "Shared-memory host tier per node (/dev/shm must be at least this large).", "size")
    nvme_tier_bytes: int = _setting(0, "Size of the NVMe tier's preallocated file (0 disables it).", "size")
    nvme_path: str = _setting("", "Directory that holds the NVMe tier's file (kvstore-blocks.dat).")
    node_name: str = _setting("", "This node's stable identity: its NVMe tier lives in nvme_path/<node_name> and is found again there after a restart (Ray's node ids change at every start). Empty: the host name (the pod name on Kubernetes). Letters, digits and ._- only; two nodes sharing an nvme_path need different names.")
    nvme_direct_io: bool = _setting(True, "Use O_DIRECT for the NVMe tier; falls back to buffered I/O with a warning where the filesystem refuses it.", "bool")
    io_threads: int = _setting(4, "Threads doing NVMe reads and writes in parallel.", "int")
    eviction_policy: str = _setting("lru", "Order in which each tier evicts: lru or s3fifo (scan-resistant).", "str", ("lru", "s3fifo"))
    prefix_aware_eviction: bool = _setting(True, "Evict a block's children before the block itself.", "bool")
    promote_on_hit: bool = _setting(True, "Copy a block hit in a lower tier up into the top tier.", "bool")
    shm_prefix: str = _setting("kvstore", "Prefix of the POSIX shared-memory names of host arenas.")
    ray_address: str = _setting("", "Ray cluster to join; empty starts an embedded local Ray.")
    ray_namespace: str = _setting("kvstore", "Ray namespace of the controller and node actors.")
    flight_host: str = _setting("", "Address the node's Arrow Flight server binds to and advertises; empty: the Ray node's IP.")
    flight_port: int = _setting(0, "Port of the node's Arrow Flight server (0 picks a free one).", "int")
    http_host: str = _setting("127.0.0.1", "Address the HTTP service binds to.")
    http_port: int = _setting(8470, "Port of the HTTP service.", "int")
    auth_token: str = _setting("", "Shared secret for Flight and HTTP; empty generates one at start (printed once).")
    auth_token_file: str = _setting("", "File holding the auth token (a mounted Secret); wins over auth_token.")
    tenants_file: str = _setting("", "YAML file of tenants (name, token, optional key_secret), reread when it changes: each tenant's credential opens Flight and HTTP for its own blocks only (kvstore/tenants.py). Empty: only the admin token (auth_token).")
    tls_cert_file: str = _setting("", "PEM certificate chain the node's Flight server and the HTTP service present; with tls_key_file, turns TLS on (plaintext is then refused). Empty: no TLS.")
    tls_key_file: str = _setting("", "PEM private key of tls_cert_file.")
    tls_ca_file: str = _setting("", "PEM CA a peer's certificate must chain to (the cluster's own CA); empty: the system's roots.")
    tls_server_name: str = _setting("kvstore", "Name every node's certificate is issued for, which clients check (nodes are reached by address, which certificates cannot list ahead of time).")
    lease_ttl_s: float = _setting(30.0, "How long a handoff lease keeps its blocks pinned if never consumed.", "float")
    cache_pulled_blocks: bool = _setting(True, "Keep a copy of every block a get pulls from another node in this node's host tier (the next get is local); off, a pull costs one copy fewer.", "bool")
    pull_streams: int = _setting(1, "Most Flight streams one get opens to one owner (a large pull is split; each stream moves at least 32 MiB). More than 1 was slower on a 2-core machine (docs/benchmarks.md); try it where cores are plenty.", "int")
    transfer_timeout_s: float = _setting(5.0, "Deadline of one data-plane transfer of up to 256 MiB between nodes (larger ones get proportionally longer): a pull from a dead or stalled peer ends as a miss within it (twice it at worst), and that peer is left alone for a while; a put stream that stalls has its slots given back.", "float")
    put_grant_bytes: int = _setting(64 << 20, "A client's same-node puts write into slots its node granted ahead (cluster/grants.py), so a put makes no call to the node until they run out: the most bytes of slots a client keeps granted beyond the put at hand (taken only from free slots, at most a sixteenth of the host tier; unused ones go back after lease_ttl_s). 0: every put reserves its slots with one call.", "int")
    fence_grace_s: float = _setting(10.0, "After a writer's hold expires, how long its slots stay unused: longer than any one copy the writer started before it saw the fence.", "float")
    verify_reads: str = _setting("sampled", "Which local shared-memory reads re-check the block's checksum (NVMe reads and transfers between nodes always do). sampled: verify_sample_fraction of them.", "str", ("off", "sampled", "always"))
    verify_sample_fraction: float = _setting(0.0625, "Fraction of local reads checked when verify_reads is sampled.", "float")
    event_batch_ms: int = _setting(20, "How long a node gathers block events before sending them to the index shards.", "int")
    kv_events_endpoint: str = _setting("", "ZMQ endpoint each node binds to publish its block events in vLLM's KV-event format, for KV-aware routers (e.g. tcp://0.0.0.0:5557; tcp://127.0.0.1:* picks a port; a node's info says which). Empty: off.")
    kv_events_replay_endpoint: str = _setting("", "ZMQ endpoint each node binds to answer replay requests for missed event batches (vLLM's ROUTER protocol). Empty: no replay.")
    kv_events_buffer_steps: int = _setting(10000, "Event batches a node keeps for replay.", "int")
    kv_events_topic: str = _setting("kvstore", "ZMQ topic of the published event batches.")
    index_shards: int = _setting(0, "Index shards: Ray actors the cluster index is split over by key hash, asked in parallel by every lookup. 0 picks max(2, nodes // 8) from the nodes alive when the cluster first starts. Fixed for the cluster's life (a restarted controller keeps the shards it finds).", "int")
    max_request_bytes: int = _setting(1024**3, "Largest payload one data-plane request may move.", "size")
    log_level: str = _setting("INFO", "Logging level.", "str", ("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        if self.slot_bytes and self.block_sizes.strip().lower() != "auto":
            raise ConfigError(f"slot_bytes={self.slot_bytes!r} and block_sizes={self.block_sizes!r} are both set: "
                              "slot_bytes is one slot size for every block, block_sizes a list of them; set one")
        self.size_classes()  # raises ConfigError naming a bad size
        if self.nvme_tier_bytes and not self.nvme_path:
            raise ConfigError("nvme_tier_bytes is set but nvme_path is empty; name a directory for the NVMe file")
        if self.node_name and not _NODE_NAME_RE.match(self.node_name):
            raise ConfigError(f"node_name={self.node_name!r} must be 1-200 characters of letters, digits and ._- "
                              "(it names a directory), not starting with a dot")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads={self.io_threads!r} must be at least 1")
        if not 0 <= self.flight_port <= 65535:
            raise ConfigError(f"flight_port={self.flight_port!r} is not a port")
        if not 0 < self.http_port <= 65535:
            raise ConfigError(f"http_port={self.http_port!r} is not a port")
        if self.lease_ttl_s <= 0:
            raise ConfigError(f"lease_ttl_s={self.lease_ttl_s!r} must be positive")
        if self.kv_events_buffer_steps < 1:
            raise ConfigError(f"kv_events_buffer_steps={self.kv_events_buffer_steps!r} must be at least 1")
        if self.kv_events_replay_endpoint and not self.kv_events_endpoint:
            raise ConfigError(f"kv_events_replay_endpoint={self.kv_events_replay_endpoint!r} needs kv_events_endpoint")
        if self.pull_streams < 1:
            raise ConfigError(f"pull_streams={self.pull_streams!r} must be at least 1")
        if self.transfer_timeout_s <= 0:
            raise ConfigError(f"transfer_timeout_s={self.transfer_timeout_s!r} must be positive")
        if self.put_grant_bytes < 0:
            raise ConfigError(f"put_grant_bytes={self.put_grant_bytes!r} must not be negative")
        if self.fence_grace_s <= 0:
            raise ConfigError(f"fence_grace_s={self.fence_grace_s!r} must be positive")
        if not 0 <= self.verify_sample_fraction <= 1:
            raise ConfigError(f"verify_sample_fraction={self.verify_sample_fraction!r} must be within [0, 1]")
        if self.event_batch_ms < 0:
            raise ConfigError(f"event_batch_ms={self.event_batch_ms!r} must not be negative")
        if not 0 <= self.index_shards <= MAX_INDEX_SHARDS:
            raise ConfigError(f"index_shards={self.index_shards!r} must be within [0, {MAX_INDEX_SHARDS}] (0: by cluster size)")

    def size_classes(self) -> SizeClasses:
        """The tiers' size classes this configuration asks for (kvstore/tiers/geometry.py)."""
        if self.slot_bytes:
            return SizeClasses.one(self.slot_bytes)
        sizes, auto = _sizes("block_sizes", self.block_sizes)
        return SizeClasses.of(sizes, auto=auto, min_slot_bytes=self.min_slot_bytes, chunk_bytes=self.chunk_bytes)

    def token(self) -> str:
        """The auth token: from auth_token_file when set, else auth_token (may be empty)."""
        if self.auth_token_file:
            try:
                return Path(self.auth_token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"auth_token_file={self.auth_token_file!r} cannot be read: {e.strerror}") from e
        return self.auth_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    if kind == "size":
        return parse_size(value, name)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (true/false)")
    if kind in ("int", "float"):
        cast = int if kind == "int" else float
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not a number")
        try:
            out = cast(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
        if kind == "int" and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}={value!r} is not an integer")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(meta['choices'])}")
    return value


def _sizes(name: str, value: str) -> tuple[list[int], bool]:
    """The sizes and whether `auto` is among them, of a list such as "64KiB,2MiB,auto"."""
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(p == "" for p in parts):
        raise ConfigError(f"{name}={value!r} has an empty entry; use auto or a list of sizes such as 64KiB,2MiB")
    sizes = []
    for part in parts:
        if part.lower() != "auto":
            size = parse_size(part, name)
            if size < 1:
                raise ConfigError(f"{name}={value!r}: {part!r} is not a positive size")
            sizes.append(size)
    return sizes, any(p.lower() == "auto" for p in parts)


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Defaults, then the YAML file at `path` (if given), then `KVSTORE_*` variables, then overrides.

    Unknown keys in the file or the environment are errors (a misspelt setting must not be
    silently ignored).
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigError(f"config file {str(path)!r}: unknown setting {key!r}")
            values[key] = _coerce(key, value)
    env = os.environ if env is None else env
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key not in FIELDS:
            if key in _ENV_NOT_SETTINGS:
                continue
            raise ConfigError(f"environment variable {var} names no setting")
        values[key] = _coerce(key, value)
    for key, value in overrides.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    return Config(**values)


# KVSTORE_* variables that are not settings (they steer the tooling, not the service).
# KVSTORE_* variables that are not settings: the config file's path, and the vLLM connector's
# version-check escape hatch (connectors/vllm.py), which its own error message tells users to set.
_ENV_NOT_SETTINGS = {"config", "vllm_skip_version_check"}


def markdown_table() -> str:
    """The settings as a Markdown table, for docs/configuration.md."""
    rows = ["| name | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        default = f.default
        if f.metadata["kind"] == "size":
            default = _format_size(default)
        choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else ""
        rows.append(
            f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | `{default!r}` | {f.metadata['doc']}{choices} |"
        )
    return "\n".join(rows) + "\n"


def _format_size(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
