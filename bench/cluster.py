"""The cluster against its bounds, on a real two-node Ray cluster started on this machine.

    python -m bench.cluster --json bench-results/cluster.json

Node A (127.0.0.2) runs this driver; node B (127.0.0.3) holds the blocks.
- remote_get_vs_tcp: a client on A getting 256 blocks of 2 MiB that only B holds (pulled over
  Arrow Flight into the caller's buffer and, by default, into A's arena too), over one raw TCP
  stream moving the same bytes from a process on B's address into a preallocated buffer on A
  (>= 0.8). remote_get_uncached_vs_tcp: the same get with cache=False (no local copy).
- remote_get_vs_ray: the same get over moving the same blocks through Ray's object store from an
  actor on B to an actor on A (`ray.get` of 256 refs, no further copy) (>= 1.5).
- local_get_vs_memcpy: a get of blocks already in A's arena, over a torch `copy_` of the same
  bytes between preallocated buffers (>= 0.8).
- lookup_keys_per_s: cluster-wide longest-prefix lookups of a 512-block prompt, all present,
  through the controller, keys per second (>= 200,000).
- put_p50_us_same_node_64k: a client on A putting one 64 KiB block, p50, into slots its node
  granted ahead (no call to the node actor); put_granted_vs_reserved: the same put with
  put_grant_bytes=0 (one call to reserve) over it (>= 2).
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import ray
import torch

from bench.common import interleaved, median_seconds, parser, report
from kvstore import Layout, block_keys, chain_parents, connect
from kvstore.cluster.localcluster import RayTestCluster
from kvstore.cluster.node import node_actor_name

LAYOUT = Layout("bench/llama-8b-like", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=16)
BLOCKS = 256
LOOKUP_KEYS = 512  # every block takes a 2 MiB slot here, so the prompt looked up is 512 blocks
MiB = 1024**2


@ray.remote(num_cpus=0)
class Peer:
    """Work placed on node B: a kvstore client, a TCP sender, and Ray objects to be fetched."""

    def __init__(self) -> None:
        self.client = connect()
        self.payload = torch.randint(0, 255, (BLOCKS, LAYOUT.block_nbytes), dtype=torch.uint8)

    def put(self, keys: list[bytes]) -> int:
        return self.client.put(LAYOUT, keys, self.payload).stored

    def tcp_listen(self, ip: str) -> int:
        self.server = socket.create_server((ip, 0))
        return self.server.getsockname()[1]

    def tcp_send(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(memoryview(self.payload.numpy()).cast("B"))

    def get_payload(self) -> torch.Tensor:
        return self.payload

    def make_objects(self) -> list:
        return [ray.put(self.payload[i].numpy()) for i in range(BLOCKS)]


@ray.remote(num_cpus=0)
class Fetcher:
    """On node A: times fetching Ray objects made on B."""

    def fetch(self, refs_holder: list) -> float:
        refs = refs_holder[0]
        start = time.perf_counter()
        arrays = ray.get(refs)
        elapsed = time.perf_counter() - start
        assert len(arrays) == BLOCKS
        return elapsed


@ray.remote(num_cpus=0)
class Writer:
    """On node A: times single-block puts of its own client, inside its process."""

    def __init__(self, **settings) -> None:
        self.client = connect(**settings)

    def put_p50_us(self, layout: Layout, n: int) -> float:
        blocks = torch.randint(0, 255, (n, layout.block_nbytes), dtype=torch.uint8)
        keys = block_keys(np.random.default_rng().integers(0, 100_000, n * layout.block_tokens), layout)
        self.client.put(layout, keys[:1], blocks[:1])  # warm-up: a granting client gets its first grant
        times = []
        for i in range(1, n):
            start = time.perf_counter()
            assert self.client.put(layout, keys[i:i + 1], blocks[i:i + 1]).stored == 1
            times.append(time.perf_counter() - start)
        self.client.flush()
        self.client.delete(keys)
        return float(np.median(times)) * 1e6


def tcp_receive(peer, ip: str, buf: memoryview) -> float:
    port = ray.get(peer.tcp_listen.remote(ip))
    sent = peer.tcp_send.remote()
    start = time.perf_counter()
    with socket.create_connection((ip, port)) as s:
        got = 0
        while got < len(buf):
            n = s.recv_into(buf[got:])
            if not n:
                raise ConnectionError("sender closed early")
            got += n
    elapsed = time.perf_counter() - start
    ray.get(sent)
    return elapsed


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads in this driver")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    total = BLOCKS * LAYOUT.block_nbytes
    rc = RayTestCluster(2, object_store_bytes=2 * total + 256 * MiB).start()
    try:
        client = connect(rc.gcs_address, host_tier_bytes=3 * total + LOOKUP_KEYS * LAYOUT.block_nbytes, slot_bytes=LAYOUT.block_nbytes,
                         event_batch_ms=5)
        client.wait_ready(2)
        a_id, b_id = rc.node_id(0), rc.node_id(1)
        peer = Peer.options(resources={rc.resources[1]: 0.01}).remote()
        fetcher = Fetcher.options(resources={rc.resources[0]: 0.01}).remote()
        node_a = ray.get_actor(node_actor_name(a_id), namespace="kvstore")
        keys = block_keys(np.arange(BLOCKS * LAYOUT.block_tokens), LAYOUT, namespace=f"bench-{os.getpid()}")
        assert ray.get(peer.put.remote(keys)) == BLOCKS
        deadline = time.monotonic() + 30
        while client.longest_prefix(keys) < BLOCKS:
            assert time.monotonic() < deadline, "blocks put on B never reached the index"
            time.sleep(0.05)
        del ray.get(peer.make_objects.remote())[:]  # warm-up: B's object store and A's fetch path
        out = torch.zeros((BLOCKS, LAYOUT.block_nbytes), dtype=torch.uint8)  # touched, like the TCP buffer
        tcp_buf = memoryview(np.empty(total, dtype=np.uint8)).cast("B")
        tcp_buf[:] = b"\0" * total  # touch the pages before timing

        def drop_local_copies():
            ray.get(node_a.delete.remote(keys))

        def remote_get(cache: bool | None = None):
            r = client.get(LAYOUT, keys, out, cache=cache)
            assert r.hits == BLOCKS and all(s == (b_id, "remote") for s in r.sources), r.sources[:3]

        tcp_times, ray_times, get_times, uncached_times = [], [], [], []
        for rep in range(args.repeats + 1):  # round 0 warms every path up (channels, allocators) untimed
            tcp_times.append(tcp_receive(peer, rc.ips[1], tcp_buf))
            refs = ray.get(peer.make_objects.remote())
            ray_times.append(ray.get(fetcher.fetch.remote([refs])))
            del refs
            drop_local_copies()
            start = time.perf_counter()
            remote_get(cache=False)
            uncached_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            remote_get()
            get_times.append(time.perf_counter() - start)
            client.flush()  # the cache fill behind the get, before anything else is timed
            if rep == 0:
                tcp_times.clear(), ray_times.clear(), get_times.clear(), uncached_times.clear()
        med = lambda xs: float(np.median(xs))  # noqa: E731
        print("per round (s): tcp", np.round(tcp_times, 3), "ray", np.round(ray_times, 3), "get", np.round(get_times, 3),
              "uncached get", np.round(uncached_times, 3))
        figures = {
            "remote_get_vs_tcp": med(tcp_times) / med(get_times),
            "remote_get_vs_ray": med(ray_times) / med(get_times),
            "remote_get_uncached_vs_tcp": med(tcp_times) / med(uncached_times),
            "remote_get_gbps": total / med(get_times) / 1e9,
            "tcp_gbps": total / med(tcp_times) / 1e9,
            "ray_object_store_gbps": total / med(ray_times) / 1e9,
        }
        assert torch.equal(out, ray.get(peer.get_payload.remote()))

        # Local: the blocks are in A's arena now (the last remote get cached them).
        copy_dst = torch.empty_like(out)
        copy_dst.copy_(out)

        def local_get():
            r = client.get(LAYOUT, keys, out)
            assert r.hits == BLOCKS and r.sources[0] == (a_id, "local")
        times = interleaved({"memcpy": (lambda: copy_dst.copy_(out), None), "get": (local_get, None)}, args.repeats)
        figures["local_get_vs_memcpy"] = times["memcpy"] / times["get"]
        figures["local_get_gbps"] = total / times["get"] / 1e9

        small = Layout("bench/index", num_layers=1, num_kv_heads=1, head_dim=64, dtype="float16", block_tokens=16)
        prompt = block_keys(np.random.default_rng(0).integers(0, 100_000, LOOKUP_KEYS * 16), small)
        client.put(small, prompt, torch.zeros((len(prompt), small.block_nbytes), dtype=torch.uint8),
                   parents=chain_parents(prompt))
        deadline = time.monotonic() + 30
        while client.longest_prefix(prompt) < len(prompt):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lookup_s = median_seconds(lambda: client.longest_prefix(prompt), max(args.repeats, 11))
        figures["lookup_keys_per_s"] = len(prompt) / lookup_s
        figures["lookup_ms_per_call"] = lookup_s * 1e3

        # Same-node puts of one 64 KiB block: into granted slots (no call) and with put_grant_bytes=0
        # (one call to reserve), alternated so both see the same machine.
        put64k = Layout("bench/put-64k", num_layers=2, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=8)
        writers = {name: Writer.options(resources={rc.resources[0]: 0.01}).remote(**settings)
                   for name, settings in (("granted", {}), ("reserved", {"put_grant_bytes": 0}))}
        put_us: dict[str, list[float]] = {name: [] for name in writers}
        for _ in range(max(args.repeats, 3)):
            for name, writer in writers.items():
                put_us[name].append(ray.get(writer.put_p50_us.remote(put64k, 101)))
        figures["put_p50_us_same_node_64k"] = med(put_us["granted"])
        figures["put_p50_us_same_node_64k_reserved"] = med(put_us["reserved"])
        figures["put_granted_vs_reserved"] = med(put_us["reserved"]) / med(put_us["granted"])
        client.close(shutdown_cluster=True)
    finally:
        rc.stop()
    targets = {"remote_get_vs_tcp": (">=", 0.8), "remote_get_vs_ray": (">=", 1.5),
               "local_get_vs_memcpy": (">=", 0.8), "lookup_keys_per_s": (">=", 200_000),
               "put_granted_vs_reserved": (">=", 2.0)}
    return report("cluster", figures, targets, args.json,
                  notes={"blocks": BLOCKS, "lookup_batch_keys": LOOKUP_KEYS, "block_bytes": LAYOUT.block_nbytes, "nodes": "127.0.0.2 (driver), 127.0.0.3"})


if __name__ == "__main__":
    raise SystemExit(main())
