"""`kvstore demo`: disaggregated prefill/decode and prefix reuse through kvstore, on a laptop.

It starts the embedded default (a local Ray with one node, host tier + NVMe tier), a prefill
worker and a decode worker (Ray actors holding the same small Llama built from a seed), then:

1. request 1: the prefill worker runs a long prompt and saves its KV layer by layer; the decode
   worker loads it from the store and generates. Time-to-first-token on the decode side with
   the store is set against recomputing the prompt there, and the tokens against a
   single-process generate();
2. request 2 shares most of request 1's prompt: its prefill computes only the new part;
3. request 1 comes back: its blocks are served from both tiers.

The host tier holds exactly request 1, so request 2's new blocks push request 1's unshared tail
down to NVMe (prefix-aware eviction takes the leaves, keeping the shared prefix in memory), and
request 1's return is served from host and NVMe, promoting the NVMe blocks back up.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time

import ray
import torch
from rich.console import Console
from rich.table import Table

import kvstore
from kvstore.connectors.handoff import Handle
from kvstore.connectors.hf import WorkerActor, tiny_llama

MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=2048)
MODEL_ID = "demo/tiny-llama-512x8"
HOST_TIER = "24MiB"  # 192 blocks of 128 KiB: request 1's prompt, exactly


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvstore demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=3072, help="request 1's prompt length (default 3072)")
    p.add_argument("--shared-tokens", type=int, default=2560, help="prompt tokens request 2 shares with request 1")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per request")
    args = p.parse_args(argv)
    console = Console()
    nvme_dir = tempfile.mkdtemp(prefix="kvstore-demo-")
    try:
        return _run(console, args, nvme_dir)
    finally:
        shutil.rmtree(nvme_dir, ignore_errors=True)


def _run(console: Console, args, nvme_dir: str) -> int:
    gen = torch.Generator().manual_seed(7)
    prompt1 = torch.randint(0, MODEL["vocab_size"], (args.prompt_tokens,), generator=gen).tolist()
    prompt2 = prompt1[:args.shared_tokens] + torch.randint(0, MODEL["vocab_size"], (512,), generator=gen).tolist()
    with console.status("[bold]starting an embedded kvstore (local Ray, one node)...") as status:
        client = kvstore.connect(host_tier_bytes=HOST_TIER, nvme_tier_bytes="512MiB", nvme_path=nvme_dir,
                                 slot_bytes="128KiB", event_batch_ms=10)
        status.update("[bold]starting a prefill worker and a decode worker (same model, built from a seed)...")
        factory = functools.partial(tiny_llama, seed=0, **MODEL)
        # The decode worker checks its first load from each source (node and medium) against a
        # recompute (a verified restore, docs/verified-restores.md) and no other, so the timed
        # loads are the load path's own; the prefill worker's timed reuse is not checked.
        prefill_w = WorkerActor.remote(factory, MODEL_ID, verify={"first_n": 0, "fraction": 0.0})
        decode_w = WorkerActor.remote(factory, MODEL_ID, verify={"first_n": 1, "fraction": 0.0})
        ray.get([prefill_w.pid.remote(), decode_w.pid.remote()])
    console.print(f"kvstore up: node {client.node_id[:12]}, host tier {HOST_TIER} + NVMe 512MiB; "
                  f"model {MODEL_ID} ({MODEL['num_hidden_layers']} layers, GQA {MODEL['num_attention_heads']}"
                  f"/{MODEL['num_key_value_heads']} heads)")
    try:
        with console.status(f"[bold]request 1: prefill of {len(prompt1)} tokens, KV saved layer by layer..."):
            pre1 = ray.get(prefill_w.prefill.remote(prompt1))
        with console.status("[bold]request 1: decode worker loads the KV from the store and generates..."):
            dec1 = ray.get(decode_w.decode.remote(prompt1, pre1["first_token"], pre1["handle"], args.new_tokens))
        with console.status("[bold]time-to-first-token on the decode worker: from the store vs recomputed..."):
            with_store = ray.get(decode_w.first_token.remote(prompt1, True))
            without = ray.get(decode_w.first_token.remote(prompt1, False))
        with console.status("[bold]single-process generate() for reference..."):
            ref1 = ray.get(decode_w.reference.remote(prompt1, args.new_tokens))
        with console.status(f"[bold]request 2: {len(prompt2)} tokens, {args.shared_tokens} shared with request 1..."):
            pre2 = ray.get(prefill_w.prefill.remote(prompt2))
            dec2 = ray.get(decode_w.decode.remote(prompt2, pre2["first_token"], pre2["handle"], args.new_tokens))
            ref2 = ray.get(decode_w.reference.remote(prompt2, args.new_tokens))
        keys1 = Handle.from_dict(pre1["handle"]).keys
        media = [h[0][1] if h else "missing" for h in client.where(keys1)]
        with console.status("[bold]request 1 again: its KV from host and NVMe..."):
            again = ray.get(decode_w.first_token.remote(prompt1, True))
        stats = client.stats()
    finally:
        ray.kill(prefill_w)
        ray.kill(decode_w)
        client.close()
    same1, same2 = dec1["tokens"] == ref1["tokens"], dec2["tokens"] == ref2["tokens"]
    same3 = again["token"] == ref1["tokens"][0]
    _summary(console, prompt1, prompt2, pre1, pre2, dec1, with_store, without, media, again, stats,
             same1, same2 and same3)
    return 0 if same1 and same2 and same3 else 1


def _summary(console, prompt1, prompt2, pre1, pre2, dec1, with_store, without, media, again, stats,
             same1, same2) -> None:
    table = Table(title="kvstore demo", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("result", justify="right")
    speedup = without["seconds"] / with_store["seconds"]
    table.add_row("request 1 prefill (prefill worker)", f"{len(prompt1)} tokens in {pre1['seconds']:.2f} s")
    table.add_row("decode worker TTFT, recomputing the prompt", f"{without['seconds'] * 1e3:,.0f} ms")
    table.add_row("decode worker TTFT, KV from kvstore",
                  f"{with_store['seconds'] * 1e3:,.0f} ms  ([bold green]{speedup:.1f}x[/] faster)")
    table.add_row("decode worker's first load checked against a recompute (verified restore)",
                  _mark(dec1["verified"] and dec1["mismatched_blocks"] == 0))
    table.add_row("request 1 tokens == single-process generate()", _mark(same1))
    table.add_row("request 2 prefill: tokens reused from the store",
                  f"{pre2['reused_tokens']} of {len(prompt2)} ({pre2['seconds']:.2f} s vs {pre1['seconds']:.2f} s)")
    table.add_row("request 2 tokens == single-process generate()", _mark(same2))
    counts = {m: media.count(m) for m in dict.fromkeys(media)}
    names = {"CPU": "host (shared memory)", "DISK": "NVMe", "GPU": "HBM"}
    table.add_row("request 1 again: blocks served from",
                  ", ".join(f"{n} {names.get(m, m)}" for m, n in counts.items()) + f" on node {dec1['node_id'][:12]}")
    checked = ", its first load from NVMe: checked against a recompute" if again["verified"] else ""
    table.add_row("request 1 again: TTFT",
                  f"{again['seconds'] * 1e3:,.0f} ms ({again['loaded_tokens']} tokens loaded{checked})")
    node = next(iter(stats["nodes"].values()))
    tiers = ", ".join(f"{t['name']} {t['used_slots']}/{t['slots']} slots (demoted {t['demotions']}, "
                      f"promoted {t['promotions']})" for t in node["store"]["tiers"])
    table.add_row("store at the end", tiers)
    console.print(table)


def _mark(ok: bool) -> str:
    return "[bold green]yes[/]" if ok else "[bold red]NO[/]"


if __name__ == "__main__":
    raise SystemExit(main())
