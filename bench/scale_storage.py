"""Storage paths at scale: opening an NVMe tier, and eviction per victim, at 10^4 to 10^6 blocks.

    python -m bench.scale_storage --json bench-results/scale_storage.json

- nvme_open_s_1e5 / nvme_open_s_1m: opening an NVMe tier of 10^5 / 10^6 slots of 2 MiB with a
  block in every slot (a sparse file: the header region is written, the payloads are holes):
  reading and checking every header, keeping the newest copy of each key, claiming the slots.
  nvme_open_vs_raw_header_read_1e5 / _1m: over a raw read of the same header region, with the
  same flags (O_DIRECT where the filesystem takes it) and chunk size, into a ready buffer, the two
  interleaved (<= 2 targeted). nvme_header_fraction_*: the header region's share of the file.
- evict_us_per_victim_{lru,s3fifo}_{1e4,1e5,1e6}: a full prefix-aware policy of that many blocks
  in 512-block prompt chains, a tenth of them hit twice, as in an upper tier (every prompt's last
  block has its continuation in the tier below, so every block has a child), takes in new
  prompts: each new block evicts a victim (told of a parent that loses its last child, as the
  store tells it) and goes in. evict_us_per_victim_1e4 / _1e6 are LRU's.
  store_put_evicting_us_per_block_*: puts of 64 blocks into a full TieredStore over a tier that
  moves no bytes (only the store's bookkeeping, under its lock, is timed), each block evicting a
  victim.
- dict_us_per_op_*: a random key out of an OrderedDict of that size and back in: the memory
  latency any hash table pays at that size (10^4 keys fit the CPU caches, 10^6 do not).
  evict_growth_vs_dict_growth: how much more a victim costs at 10^6 than at 10^4 (the worse of
  the two policies), over how much more that dict operation costs (<= 1.5 targeted: the cost per
  victim grows no faster than one dict operation's, so it does not depend on the tier's size).
- block_size_rounding_loss_max: the most of a slot any block leaves unused when the layouts of
  MODELS and 200 random layouts arrive in random orders at one node with block_sizes=auto
  (<= 0.25 targeted); _mean is the bytes-weighted mean. single_slot_*: the same layouts with the
  old one slot_bytes=2MiB: the fraction refused (larger than the slot) and the loss of the rest.
- block_size_capacity_use: a store over a 16 GiB tier (no bytes moved) fed a mix of 64 KiB,
  2 MiB and 5 MiB blocks until it has evicted twice its size: block bytes held over the tier's
  bytes (what rounding, chunk tails and free slots leave). block_size_chunks_taken: chunks that
  went from one class to another meanwhile; block_size_share_error: the largest gap between a
  class's part of the chunks and its part of the bytes put.
"""
from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from bench.common import interleaved, parser, report
from kvstore import Layout, TieredStore
from kvstore.policy import EvictionPolicy, make_policy
from kvstore.tiers import nvme
from kvstore.tiers.base import PAGE, Tier
from kvstore.tiers.geometry import MAX_ROUNDING_LOSS, Geometry, SizeClasses, rounding_loss

SLOT = 2 * 1024**2  # a Llama-3-8B block of 16 tokens in fp16
CHAIN = 512  # blocks per prompt: an 8k-token prompt
VICTIMS = 2000
# The smallest block the store takes: the store's bookkeeping is what is timed, not bytes.
TINY = Layout("bench/tiny", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=1)


def _keys(n: int, seed: int) -> list[bytes]:
    raw = np.random.default_rng(seed).bytes(16 * n)
    return [raw[16 * i:16 * i + 16] for i in range(n)]


def _chain_parents(keys: Sequence[bytes]) -> list[bytes | None]:
    """Each key's parent in prompts of CHAIN blocks each."""
    return [None if i % CHAIN == 0 else keys[i - 1] for i in range(len(keys))]


# -- NVMe open ------------------------------------------------------------------------------------

def _write_full_tier(directory: str, num_slots: int) -> int:
    """A tier file with a block in every slot, written as the tier writes its headers but in bulk,
    the payloads left as holes. Returns the bytes the file really occupies."""
    keys = _keys(num_slots, seed=num_slots)
    headers = nvme.pack_headers(keys, [TINY.id] * num_slots, _chain_parents(keys), [SLOT] * num_slots,
                                range(1, num_slots + 1), range(num_slots))
    path = os.path.join(directory, nvme.FILE_NAME)
    with open(path, "wb") as f:
        f.write(nvme.pack_superblock(SLOT, num_slots))
        f.write(np.full(num_slots, SLOT, dtype="<u8").tobytes().ljust(nvme.table_bytes(num_slots), b"\0"))
        f.write(headers.tobytes())
        f.truncate(nvme.file_bytes(num_slots, SLOT))
        os.fsync(f.fileno())
    return os.stat(path).st_blocks * 512


def _raw_header_read(directory: str, num_slots: int, buf) -> bool:
    """Reads the header region as the tier does, into a ready buffer; returns whether with O_DIRECT."""
    path = os.path.join(directory, nvme.FILE_NAME)
    try:
        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        region = nvme.header_region_bytes(num_slots)
        for offset in range(0, region, len(buf)):
            want = min(len(buf), region - offset)
            os.preadv(fd, [memoryview(buf)[:want]], PAGE + nvme.table_bytes(num_slots) + offset)
    finally:
        os.close(fd)
    return direct


def bench_nvme_open(repeats: int, parent_dir: str, num_slots: int, tag: str) -> dict:
    directory = tempfile.mkdtemp(prefix="kvstore-bench-scale-", dir=parent_dir)
    try:
        occupied = _write_full_tier(directory, num_slots)
        capacity = nvme.file_bytes(num_slots, SLOT)
        buf = nvme.aligned_buffer(nvme._SCAN_CHUNK)
        direct = []
        opened = []

        def open_tier():
            tier = nvme.NVMeTier(directory, SLOT, capacity)
            opened.append(tier)

        def close_tier():
            while opened:
                tier = opened.pop()
                assert tier.allocator.used_count == num_slots
                tier.close()

        times = interleaved({"raw": (lambda: direct.append(_raw_header_read(directory, num_slots, buf)), None),
                             "open": (open_tier, close_tier)}, repeats)
        close_tier()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        f"nvme_open_s_{tag}": times["open"],
        f"nvme_raw_header_read_s_{tag}": times["raw"],
        f"nvme_open_vs_raw_header_read_{tag}": times["open"] / times["raw"],
        f"nvme_header_fraction_{tag}": nvme.header_region_bytes(num_slots) / capacity,
        f"nvme_file_occupied_bytes_{tag}": occupied,
        f"nvme_direct_io_{tag}": all(direct),
    }


# -- eviction -------------------------------------------------------------------------------------

class _Children:
    """Children counts, telling the policy as the store does (TieredStore._link / _unlink)."""

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self.policy: EvictionPolicy | None = None

    def link(self, parent: bytes | None) -> None:
        if parent is not None:
            count = self.counts.get(parent, 0) + 1
            self.counts[parent] = count
            if count == 1:
                self.policy.set_has_children(parent, True)

    def unlink(self, parent: bytes | None) -> None:
        if parent is not None:
            left = self.counts[parent] - 1
            if left:
                self.counts[parent] = left
            else:
                del self.counts[parent]
                self.policy.set_has_children(parent, False)


def evict_us_per_victim(name: str, num_blocks: int, repeats: int) -> float:
    """Median microseconds per victim in a full policy of an upper tier taking in new prompts:
    each new block evicts one victim (whose parent may become a leaf), then goes in (and links
    its parent). Every prompt's last block has its continuation in the tier below, so every
    block here has a child: the case a policy that walks its keys for a leaf walks them all."""
    keys = _keys(num_blocks + repeats * VICTIMS, seed=1)
    parent_of = dict(zip(keys, _chain_parents(keys)))
    children = _Children()
    policy = children.policy = make_policy(name, num_blocks, children.counts.__contains__)

    def put(chain: list[bytes]) -> None:
        children.link(chain[-1])  # its continuation, in the tier below
        for key in reversed(chain):  # leaf first, as the store commits a prompt
            policy.insert(key)
            children.link(parent_of[key])

    def evict_and_put(chain: list[bytes]) -> None:
        children.link(chain[-1])
        for key in reversed(chain):
            victim = next(iter(policy.candidates()))
            policy.remove(victim)
            children.unlink(parent_of[victim])
            policy.insert(key)
            children.link(parent_of[key])

    for start in range(0, num_blocks, CHAIN):
        put(keys[start:start + CHAIN])
    for key in keys[:num_blocks:10]:  # reused prefixes: hit twice
        policy.touch(key)
        policy.touch(key)
    gc.collect()
    times = []
    for r in range(repeats):
        new = keys[num_blocks + r * VICTIMS:num_blocks + (r + 1) * VICTIMS]
        start = time.perf_counter()
        for i in range(0, VICTIMS, CHAIN):
            evict_and_put(new[i:i + CHAIN])
        times.append((time.perf_counter() - start) / VICTIMS * 1e6)
    return statistics.median(times)


def dict_us_per_op(num_keys: int, repeats: int) -> float:
    """The memory-latency reference: a random key out of an OrderedDict of that size and back."""
    keys = _keys(num_keys, seed=5)
    table = OrderedDict.fromkeys(keys)
    probes = [keys[i] for i in np.random.default_rng(6).integers(0, num_keys, VICTIMS)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for key in probes:
            del table[key]
            table[key] = None
        times.append((time.perf_counter() - start) / VICTIMS * 1e6)
    return statistics.median(times)


class _NoBytesTier(Tier):
    """A tier that stores nothing: a store over it times only its own bookkeeping."""

    name = "host"
    medium = "CPU"

    def __init__(self, slot_nbytes: int | SizeClasses, num_slots: int = 0, capacity_bytes: int = 0) -> None:
        if isinstance(slot_nbytes, SizeClasses):
            super().__init__(slot_nbytes, slot_nbytes.geometry(capacity_bytes, "bench"))
        else:
            classes = SizeClasses.one(slot_nbytes)
            super().__init__(classes, Geometry.single(classes.declared[0], num_slots))

    def write_many(self, items, checksums=None):
        if checksums is not None:
            checksums.extend(0 for _ in items)
        return [None] * len(items)

    def read_many(self, items, verify=None):
        return [None] * len(items)


def store_put_us_per_block(num_blocks: int, repeats: int) -> float:
    """Median microseconds per block of puts (64 blocks each, prompts of CHAIN blocks) into a full
    store over a tier that moves no bytes: each block evicts one victim."""
    store = TieredStore([_NoBytesTier(TINY.block_nbytes, num_blocks)], policy="lru", prefix_aware=True)
    keys = _keys(num_blocks + repeats * VICTIMS, seed=2)
    parents = _chain_parents(keys)
    blocks = torch.zeros(CHAIN, TINY.block_nbytes, dtype=torch.uint8)
    for start in range(0, num_blocks, CHAIN):
        end = min(start + CHAIN, num_blocks)
        store.put(TINY, keys[start:end], blocks[:end - start], parents=parents[start:end])
    gc.collect()
    times = []
    for r in range(repeats):
        first = num_blocks + r * VICTIMS
        start = time.perf_counter()
        for i in range(first, first + VICTIMS, 64):
            end = min(i + 64, first + VICTIMS)
            store.put(TINY, keys[i:end], blocks[:end - i], parents=parents[i:end])
        times.append((time.perf_counter() - start) / VICTIMS * 1e6)
    assert store.stats()["tiers"][0]["evictions"] == repeats * VICTIMS
    return statistics.median(times)


def bench_eviction(sizes: dict[str, int], repeats: int) -> dict:
    figures = {}
    for tag, n in sizes.items():
        for name in ("lru", "s3fifo"):
            figures[f"evict_us_per_victim_{name}_{tag}"] = evict_us_per_victim(name, n, repeats)
            gc.collect()
        figures[f"evict_us_per_victim_{tag}"] = figures[f"evict_us_per_victim_lru_{tag}"]
        figures[f"store_put_evicting_us_per_block_{tag}"] = store_put_us_per_block(n, repeats)
        gc.collect()
        figures[f"dict_us_per_op_{tag}"] = dict_us_per_op(n, repeats)
        gc.collect()
    return figures


# -- size classes ---------------------------------------------------------------------------------

MiB = 1024**2
# (name, layers, kv heads, head dim, dtype, tokens per block, tp size): blocks of real models.
MODELS = [
    ("llama-3-8b", 32, 8, 128, "bfloat16", 16, 1), ("llama-3-70b", 80, 8, 128, "bfloat16", 16, 1),
    ("llama-3-70b-tp8", 80, 8, 128, "bfloat16", 16, 8), ("llama-3-70b-fp8-tp4", 80, 8, 128, "float8_e4m3fn", 16, 4),
    ("qwen2-0.5b", 24, 2, 64, "bfloat16", 16, 1), ("qwen2-7b-128tok", 28, 4, 128, "bfloat16", 128, 1),
    ("gemma-2b", 18, 1, 256, "bfloat16", 16, 1), ("mistral-7b-32tok", 32, 8, 128, "float16", 32, 1),
    ("phi-3-mini", 32, 32, 96, "bfloat16", 16, 1), ("mixtral-8x7b-tp2", 32, 8, 128, "bfloat16", 16, 2),
    ("small-64k", 2, 2, 64, "bfloat16", 64, 1),
]


def _model_layouts(rng: np.random.Generator, extra: int) -> list[Layout]:
    layouts = [Layout(name, layers, max(1, heads // tp), dim, dtype, tokens)
               for name, layers, heads, dim, dtype, tokens, tp in MODELS]
    for i in range(extra):
        layouts.append(Layout(f"random-{i}", int(rng.integers(4, 97)), int(rng.choice([1, 2, 4, 8, 16])),
                              int(rng.choice([64, 80, 96, 128, 256])), str(rng.choice(["bfloat16", "float8_e4m3fn"])),
                              int(rng.choice([16, 32, 64, 128]))))
    return [layout for layout in layouts if 12 * 1024 <= layout.block_nbytes <= 64 * MiB]


def bench_rounding(trials: int = 50) -> dict:
    """Rounding loss of auto classes when many layouts (a node's lifetime of models) arrive in random
    orders at one node, against the one 2 MiB slot of old. Up to MAX_CLASSES classes a node; a node
    sees far fewer layouts than this."""
    rng = np.random.default_rng(12)
    classes = SizeClasses.of([], auto=True, min_slot_bytes=16 * 1024, chunk_bytes=64 * MiB)
    worst, lost, held, classes_made = 0.0, 0, 0, []
    for _ in range(trials):
        layouts = _model_layouts(rng, 20)
        rng.shuffle(layouts)
        existing: list[int] = []
        for layout in layouts:
            stride = classes.class_for(layout.block_nbytes, existing, 64 * MiB)
            if stride not in existing:
                existing.append(stride)
            worst = max(worst, rounding_loss(layout.block_nbytes, stride))
            lost += stride - layout.block_nbytes
            held += stride
        classes_made.append(len(existing))
    layouts = _model_layouts(rng, 200)
    fits = [layout.block_nbytes for layout in layouts if layout.block_nbytes <= SLOT]
    return {"block_size_rounding_loss_max": worst, "block_size_rounding_loss_mean": lost / held,
            "block_size_classes_per_node": float(np.mean(classes_made)),
            "single_slot_refused_fraction": 1 - len(fits) / len(layouts),
            "single_slot_rounding_loss_mean": 1 - sum(fits) / (len(fits) * SLOT)}


def bench_capacity_use(tier_bytes: int = 16 * 1024**3) -> dict:
    """A store of several classes under a mixed load (no bytes moved): how much of the tier holds
    block bytes once it is full and evicting, and how the chunks follow the bytes put."""
    layouts = [Layout("mix-64k", 2, 2, 64, "bfloat16", 64), Layout("mix-2m", 32, 8, 128, "bfloat16", 16),
               Layout("mix-5m", 80, 8, 128, "bfloat16", 16)]
    weights = [0.2, 0.5, 0.3]  # of the bytes put
    classes = SizeClasses.of([], auto=True, min_slot_bytes=16 * 1024, chunk_bytes=64 * MiB)
    store = TieredStore([_NoBytesTier(classes, capacity_bytes=tier_bytes)], policy="lru")
    rows = {layout: torch.zeros(max(1, 4 * MiB // layout.block_nbytes), layout.block_nbytes, dtype=torch.uint8)
            for layout in layouts}
    rng = np.random.default_rng(3)
    put = dict.fromkeys(layouts, 0)
    n = 0
    while sum(put.values()) < 3 * tier_bytes:
        layout = layouts[rng.choice(3, p=weights)]
        count = max(1, int(4 * MiB // layout.block_nbytes))
        keys = _keys(count, seed=n)
        n += 1
        store.put(layout, keys, rows[layout])
        put[layout] += count * layout.block_nbytes
    stats = store.stats()
    tier = stats["tiers"][0]
    held = sum(c["block_bytes"] for c in stats["classes"])
    chunks = store.tiers[0].allocator.classes()
    total_chunks = sum(chunks.values())
    share_error = max(abs(chunks.get(store.check_layout(layout), 0) / total_chunks - w)
                      for layout, w in zip(layouts, weights))
    return {"block_size_capacity_use": held / tier["capacity_bytes"],
            "block_size_slot_use": tier["used_bytes"] / tier["capacity_bytes"],
            "block_size_rounding_loss_store": stats["rounding_loss"],
            "block_size_chunks_taken": tier["chunks_reassigned"],
            "block_size_share_error": share_error}


def measure(repeats: int = 5, nvme_dir: str | None = None) -> dict:
    """Every figure of this suite, as a flat dict (bench.scale merges it into its own)."""
    parent_dir = nvme_dir or tempfile.gettempdir()
    figures = {}
    figures.update(bench_nvme_open(repeats, parent_dir, 10**5, "1e5"))
    figures.update(bench_nvme_open(repeats, parent_dir, 10**6, "1m"))
    figures.update(bench_eviction({"1e4": 10**4, "1e5": 10**5, "1e6": 10**6}, max(repeats, 5)))
    for what in ("evict_us_per_victim_lru", "evict_us_per_victim_s3fifo", "store_put_evicting_us_per_block",
                 "dict_us_per_op"):
        figures[f"{what}_1e6_vs_1e4"] = figures[f"{what}_1e6"] / figures[f"{what}_1e4"]
    growth = max(figures["evict_us_per_victim_lru_1e6_vs_1e4"], figures["evict_us_per_victim_s3fifo_1e6_vs_1e4"])
    figures["evict_growth_vs_dict_growth"] = growth / figures["dict_us_per_op_1e6_vs_1e4"]
    figures.update(bench_rounding())
    figures.update(bench_capacity_use())
    return figures


TARGETS = {
    "nvme_open_vs_raw_header_read_1m": ("<=", 2.0),
    "evict_growth_vs_dict_growth": ("<=", 1.5),
    "block_size_rounding_loss_max": ("<=", MAX_ROUNDING_LOSS),
}


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(repeats=5)
    p.add_argument("--nvme-dir", default=tempfile.gettempdir(),
                   help="directory on the filesystem to measure (default: the temp directory); "
                        "needs about 150 MB free, the rest of the 2 TB file is a hole")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    figures = measure(args.repeats, args.nvme_dir)
    return report("scale_storage", figures, TARGETS, args.json,
                  notes={"slot_bytes": SLOT, "chain_blocks": CHAIN, "victims": VICTIMS, "nvme_dir": args.nvme_dir,
                         "load_average": os.getloadavg()})


if __name__ == "__main__":
    raise SystemExit(main())
