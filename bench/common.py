"""What every benchmark suite shares: timing, the machine's description, the report.

Every figure is a ratio to a bound measured in the same run, on the same data, interleaved with
the measurement itself (bound, store, bound, store, ...), so a noisy neighbour slows both sides
alike. Medians, not means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(pairs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
                repeats: int) -> dict[str, float]:
    """Median seconds of each named (fn, setup), the runs of all of them interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, (fn, setup) in pairs.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON to PATH")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per figure (median taken)")
    return p


def report(suite: str, figures: dict, targets: dict[str, tuple[str, float]], json_path: str | None,
           notes: dict | None = None) -> int:
    """Prints a table, writes JSON; returns 0 (a missed target is reported, not an error)."""
    checks = {}
    for key, (op, bound) in targets.items():
        value = figures[key]
        checks[key] = {"target": f"{op} {bound}", "met": value >= bound if op == ">=" else value <= bound}
    width = max(len(k) for k in figures)
    print(f"\n{suite} benchmark ({machine()['cpus']} CPUs, torch threads {torch.get_num_threads()})")
    for key, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        mark = ""
        if key in checks:
            mark = f"  target {checks[key]['target']}: {'met' if checks[key]['met'] else 'MISSED'}"
        print(f"  {key:<{width}}  {shown:>16}{mark}")
    if json_path:
        out = {"suite": suite, "machine": machine(), **figures, "targets": checks, "notes": notes or {}}
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {json_path}")
    return 0
