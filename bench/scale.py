"""The cluster's metadata at scale: the sharded index's memory, ingest, lookups and rebuild.

    python -m bench.scale --json bench-results/scale.json

Everything runs on this machine with the project's own classes: the index (cluster/index.py)
in-process, and index shards (cluster/shards.py) as Ray actors of an embedded Ray, fed chunks
the way nodes feed them (cluster/shardfeed.py), from simulated nodes.
- index_bytes_per_block: memory of one index holding 10^6 blocks, each on one node (<= 64).
- ingest_key_events_per_s: one shard decoding and applying 20 ms churn chunks of 64 simulated
  nodes (each half new blocks, half evicted), in-process; `_ray`: the same chunks through one
  shard actor, eight simulated nodes with a chunk in flight each.
- lookup_p50_ms_{1k,8k,32k} (and p99): best_node of a prompt (per node, its leading blocks)
  over 10^6 indexed blocks on 64 simulated nodes, split over the shards a 64-node cluster gets
  by default and combined, in-process; `_ray`: the same fanned out to shard actors from this
  process, as the controller does. The prompt's first 1k blocks are on all 64 nodes, the next
  7k on 8, the rest on one; 10% of the other blocks have a second holder.
  lookups_per_s_512_ray: how many such lookups of a 512-block prompt eight threads of one
  process (the controller's place) get through the shard actors per second, concurrent lookups
  sharing one call per shard per round (cluster/lookups.py, as the controller does); `_call_each`:
  one call per shard per lookup.
- shard_rebuild_s_1m: a restarted shard actor taking the snapshots of 10^6 blocks from 64
  simulated nodes in bounded chunks, first chunk sent to last applied (< 2 s); with
  --rebuild-10m also shard_rebuild_s_10m_in_process (decode and apply of 10^7 blocks).
Storage figures (NVMe open, eviction per victim) come from bench/scale_storage.py.
"""
from __future__ import annotations

import os
import secrets
import time

import numpy as np
import ray

from bench import scale_storage
from bench.common import parser, report
from kvstore.cluster import shardmap
from kvstore.cluster.index import CompactIndex
from kvstore.cluster.lookups import ShardLookups
from kvstore.cluster.shards import IndexShard, IndexShardActor
from kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch

BLOCKS = 1_000_000
NODES = 64
CHURN_KEYS = 2_000  # one node's chunk: 1,000 blocks stored and 1,000 evicted
PROMPTS = {"1k": 1024, "8k": 8192, "32k": 32768}


def random_keys(n: int, rng: np.random.Generator) -> list[bytes]:
    blob = rng.bytes(16 * n)
    return [blob[i:i + 16] for i in range(0, len(blob), 16)]


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(times, q) * 1e3)


# -- memory ---------------------------------------------------------------------------------------

def index_bytes_per_block(rng: np.random.Generator) -> float:
    index = CompactIndex()
    rows = np.frombuffer(rng.bytes(16 * BLOCKS), "<u8").reshape(-1, 2)
    step = BLOCKS // NODES + 1
    for n, start in enumerate(range(0, BLOCKS, step)):
        index.add(f"node-{n}", rows[start:start + step], "DISK")
    return index.nbytes() / len(index)


# -- ingest ---------------------------------------------------------------------------------------

def churn_chunks(rng: np.random.Generator, rounds: int) -> list[tuple[str, bytes]]:
    """Per round and node, one encoded chunk: 1,000 blocks stored, then the previous round's
    1,000 evicted (one BlockRemoved for the round, as the feed sends it)."""
    chunks, previous = [], {}
    for _ in range(rounds):
        for n in range(NODES):
            node = f"node-{n}"
            new = random_keys(CHURN_KEYS // 2, rng)
            events = [BlockStored(new, None, "CPU"), BlockRemoved(previous.get(node, []), "CPU")]
            previous[node] = new
            chunks.append((node, encode_batch(events)))
    return chunks


def ingest_in_process(chunks) -> float:
    shard = IndexShard(0, 1)
    streams = {node: [secrets.token_hex(8), 0] for node, _ in chunks}
    start = time.perf_counter()
    for node, payload in chunks:
        stream = streams[node]
        shard.apply(node, stream[0], stream[1], payload)
        stream[1] += 1
    return shard.stats()["key_events"] / (time.perf_counter() - start)


def feed_through_ray(chunks: list[tuple[str, bytes]], in_flight: int = 8) -> tuple[float, dict]:
    """A fresh shard actor fed these chunks by their simulated nodes, `in_flight` nodes at a
    time with one chunk each in flight (as a node's feed sends); (seconds, the shard's stats)."""
    shard = IndexShardActor.remote(0, 1)
    ray.get(shard.describe.remote())
    by_node: dict[str, list[bytes]] = {}
    for node, payload in chunks:
        by_node.setdefault(node, []).append(payload)
    nodes = sorted(by_node)
    start = time.perf_counter()
    for first in range(0, len(nodes), in_flight):
        group = nodes[first:first + in_flight]
        streams = {node: secrets.token_hex(8) for node in group}
        for seq in range(max(len(by_node[n]) for n in group)):
            ray.get([shard.apply.remote(n, streams[n], seq, by_node[n][seq]) for n in group if seq < len(by_node[n])])
    elapsed = time.perf_counter() - start
    stats = ray.get(shard.stats.remote())
    ray.kill(shard)
    return elapsed, stats


def ingest_through_ray(chunks) -> float:
    elapsed, stats = feed_through_ray(chunks)
    return stats["key_events"] / elapsed


# -- lookups --------------------------------------------------------------------------------------

def lookup_data(rng: np.random.Generator) -> tuple[list[bytes], list[tuple[str, list[bytes]]]]:
    """The 32k prompt and, per node, the blocks it holds (10^6 distinct blocks in all)."""
    prompt = random_keys(PROMPTS["32k"], rng)
    held: dict[str, list[bytes]] = {f"node-{n}": [] for n in range(NODES)}
    for n in range(NODES):
        held[f"node-{n}"] += prompt[:1024]
    for n in range(8):
        held[f"node-{n}"] += prompt[1024:8192]
    held["node-0"] += prompt[8192:]
    rest = random_keys(BLOCKS - len(prompt), rng)
    owners = rng.integers(0, NODES, len(rest))
    seconds = rng.integers(0, NODES, len(rest))
    twice = rng.random(len(rest)) < 0.1
    for i, key in enumerate(rest):
        held[f"node-{owners[i]}"].append(key)
        if twice[i] and seconds[i] != owners[i]:
            held[f"node-{seconds[i]}"].append(key)
    return prompt, list(held.items())


def snapshot_chunks(held, count: int, max_keys: int = 200_000) -> list[list[tuple[str, bytes]]]:
    """Per shard, its share of every node's snapshot as chunks of at most max_keys keys."""
    per_shard: list[list[tuple[str, bytes]]] = [[] for _ in range(count)]
    for node, keys in held:
        for part in shardmap.split(keys, count):
            blob = part.keys
            for start in range(0, len(part), max_keys):
                piece = [blob[i:i + 16] for i in range(start * 16, min(len(part), start + max_keys) * 16, 16)]
                events = ([AllBlocksCleared()] if start == 0 else []) + [BlockStored(piece, None, "CPU")]
                per_shard[part.shard].append((node, encode_batch(events)))
    return per_shard


def feed_local(shards: list[IndexShard], chunks_per_shard) -> None:
    for shard, chunks in zip(shards, chunks_per_shard):
        for node, payload in chunks:
            shard.apply_events(node, payload)


def time_lookups(prompt, count: int, ask, repeats: dict[str, int], nodes: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in PROMPTS}
    for round_ in range(max(repeats.values()) + 1):
        for name, length in PROMPTS.items():
            if round_ > repeats[name]:
                continue
            keys = prompt[:length]
            start = time.perf_counter()
            parts = shardmap.split(keys, count)
            per_node = shardmap.prefix_by_node(parts, ask(parts), nodes, len(keys))
            elapsed = time.perf_counter() - start
            assert per_node["node-0"] == length, (name, per_node["node-0"])
            if round_:  # round 0 warms up
                times[name].append(elapsed)
    return times


def lookups_per_s(prompt, count: int, ask, nodes: list[str], threads: int = 8, seconds: float = 3.0) -> float:
    """best_node lookups of a 512-block prompt (8k tokens of 16-token blocks) per second, from
    `threads` threads of one process at once (as the controller's do)."""
    import threading

    keys, done, stop = prompt[:512], [], time.perf_counter() + seconds

    def loop():
        n = 0
        while time.perf_counter() < stop:
            parts = shardmap.split(keys, count)
            shardmap.prefix_by_node(parts, ask(parts), nodes, len(keys))
            n += 1
        done.append(n)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - start)


def lookup_figures(times: dict[str, list[float]], suffix: str = "") -> dict[str, float]:
    out = {}
    for name, ts in times.items():
        out[f"lookup_p50_ms_{name}{suffix}"] = percentile_ms(ts, 50)
        out[f"lookup_p99_ms_{name}{suffix}"] = percentile_ms(ts, 99)
    return out


# -- rebuild --------------------------------------------------------------------------------------

def rebuild_through_ray(chunks: list[tuple[str, bytes]]) -> float:
    """A fresh shard actor taking 10^6 blocks' snapshot chunks, as after a restart."""
    elapsed, stats = feed_through_ray(chunks)
    assert stats["keys"] == BLOCKS, stats
    return elapsed


def rebuild_10m_in_process(rng: np.random.Generator, chunk_keys: int = 200_000) -> float:
    """One in-process shard taking 10^7 blocks' snapshot chunks from 64 simulated nodes:
    decode and apply time only (the chunks are encoded beforehand)."""
    chunks = []
    for i in range(10 * BLOCKS // chunk_keys):
        blob = rng.bytes(16 * chunk_keys)
        chunks.append((f"node-{i % NODES}", encode_batch([BlockStored([blob[j:j + 16] for j in range(0, len(blob), 16)],
                                                                       None, "DISK")])))
    shard = IndexShard(0, 1)
    start = time.perf_counter()
    for node, payload in chunks:
        shard.apply_events(node, payload)
    elapsed = time.perf_counter() - start
    assert shard.stats()["keys"] == 10 * BLOCKS
    return elapsed


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--skip-ray", action="store_true", help="only the in-process figures (no Ray started)")
    p.add_argument("--rebuild-10m", action="store_true",
                   help="also time an in-process shard rebuild of 10^7 blocks (about 2 GB of memory)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    figures: dict = {"index_bytes_per_block": index_bytes_per_block(rng)}

    chunks = churn_chunks(rng, rounds=8)
    figures["ingest_key_events_per_s"] = max(ingest_in_process(chunks) for _ in range(3))

    count = shardmap.default_shard_count(NODES)
    prompt, held = lookup_data(rng)
    per_shard = snapshot_chunks(held, count)
    local = [IndexShard(s, count) for s in range(count)]
    start = time.perf_counter()
    feed_local(local, per_shard)
    figures["shard_rebuild_s_1m_in_process"] = time.perf_counter() - start  # all shards, one after another
    figures["index_bytes_per_block_lookup_data"] = sum(s.stats()["bytes"] for s in local) / BLOCKS
    nodes = [node for node, _ in held]
    repeats = {"1k": max(args.repeats, 50), "8k": max(args.repeats, 30), "32k": max(args.repeats, 15)}

    def ask_local(parts):
        return [local[part.shard].prefix_by_node(part.keys) for part in parts]

    figures.update(lookup_figures(time_lookups(prompt, count, ask_local, repeats, nodes)))

    if not args.skip_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, num_cpus=2, object_store_memory=256 * 1024**2, log_to_driver=False,
                 namespace=f"bench-scale-{os.getpid()}")
        try:
            figures["ingest_key_events_per_s_ray"] = ingest_through_ray(chunks)
            one_shard = snapshot_chunks(held, 1)[0]
            figures["shard_rebuild_s_1m"] = min(rebuild_through_ray(one_shard) for _ in range(2))
            actors = [IndexShardActor.remote(s, count) for s in range(count)]
            ray.get([a.describe.remote() for a in actors])
            for actor, chunks_of_shard in zip(actors, per_shard):
                ray.get([actor.apply_events.remote(node, payload) for node, payload in chunks_of_shard])

            def ask_each(parts):  # one call per shard per lookup
                return ray.get([actors[part.shard].prefix_by_node.remote(part.keys) for part in parts])

            lookups = ShardLookups(lambda shard, requests: ray.get(actors[shard].batch.remote(requests)), count, 30.0)

            def ask_batched(parts):  # as the controller asks: concurrent lookups share calls
                return lookups.ask(parts, "prefix_by_node")

            figures.update(lookup_figures(time_lookups(prompt, count, ask_batched, repeats, nodes), "_ray"))
            figures["lookups_per_s_512_ray"] = lookups_per_s(prompt, count, ask_batched, nodes)
            figures["lookups_per_s_512_ray_call_each"] = lookups_per_s(prompt, count, ask_each, nodes)
            figures["lookup_requests_per_shard_call"] = lookups.counters["requests"] / max(lookups.counters["calls"], 1)
            lookups.stop()
            for actor in actors:
                ray.kill(actor)
        finally:
            ray.shutdown()

    if args.rebuild_10m:
        figures["shard_rebuild_s_10m_in_process"] = rebuild_10m_in_process(rng)
    figures.update(scale_storage.measure())  # NVMe open, eviction per victim, block sizes
    targets = {"index_bytes_per_block": ("<=", 64.0)}
    if "block_size_rounding_loss_max" in figures:
        targets["block_size_rounding_loss_max"] = ("<=", 0.25)  # several block sizes, bench/scale_storage.py
    if "shard_rebuild_s_1m" in figures:
        targets["shard_rebuild_s_1m"] = ("<=", 2.0)
    return report("scale", figures, targets, args.json, notes={
        "blocks": BLOCKS, "nodes": NODES, "shards_for_lookups": count, "churn_keys_per_chunk": CHURN_KEYS,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "ingest_ray": "one shard actor, 8 simulated nodes with one chunk in flight each",
        "lookup": "best_node (leading blocks per node), split over the shards and combined; _ray: fanned out "
                  "to shard actors from this process, as the controller does",
    })


if __name__ == "__main__":
    raise SystemExit(main())
