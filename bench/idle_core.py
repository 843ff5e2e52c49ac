"""How much slower the same work runs right after its thread sat idle, on this host (`make bench-idle_core`).

At concurrency 1 a service's threads wait out each forward (~65 ms for DenseNet-121 here) and then decode the next
image after that idle spell; the in-process path of `bench.latency_c1` decodes after its own forward in odd rounds
and after waiting for the service's call in even ones. This measures the difference side by side in one thread: each
workload back to back ("none"), after a sleep as long as a forward ("sleep": the thread is descheduled, the core may
idle) and after the same time spinning in Python ("spin": the core stays busy), in rotating turns. It reports wall
and CPU ms per call (p50) and each gap's ratio to back to back; no pass/fail. "Back to back" follows the previous
cell's call: in one turn in three that is another workload's.

    .venv/bin/python -m bench.idle_core            # 60 calls per cell, 65 ms gaps (~1 min)
    .venv/bin/python -m bench.idle_core --quick    # 6 calls per cell, 10 ms gaps
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import machine, nih_pngs, stage, write_result

GAPS = ("none", "sleep", "spin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, help="calls per cell (60; quick 6)")
    ap.add_argument("--gap-ms", type=float, help="idle or spin before each call (65: a DenseNet-121 forward; quick 10)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.calls = args.calls or (6 if args.quick else 60)
    args.gap_ms = args.gap_ms if args.gap_ms is not None else (10.0 if args.quick else 65.0)
    return args


def workloads() -> dict[str, Callable[[int], object]]:
    """The classification decode + preprocessing of NIH PNGs, elementwise numpy over 2 MB without allocating,
    and a pure-interpreter loop."""
    from cxr_classification.preprocessing import PreprocessSpec, preprocess
    from cxr_serving.images import decode_image

    spec = PreprocessSpec(224, "squash", "imagenet", 3)
    pngs = nih_pngs(8)
    a = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    out = np.empty_like(a)

    def png(i: int) -> object:
        return preprocess(decode_image(pngs[i % len(pngs)], "image/png").array, spec)  # uint8, as the service

    def numpy_2mb(_i: int) -> object:
        for _ in range(5):
            np.multiply(a, 2.0, out=out)
            np.add(out, 1.0, out=out)
        return float(out[0, 0])

    def python(_i: int) -> object:
        total = 0
        for k in range(20_000):
            total += k
        return total

    return {"png_decode_preprocess": png, "numpy_2mb": numpy_2mb, "python": python}


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(fns: dict[str, Callable[[int], object]], calls: int, gap_s: float) -> dict[str, Any]:
    """Per workload and gap: p50 wall and CPU ms of `calls` calls, the cells taking turns call by call."""
    wall: dict[tuple[str, str], list[float]] = {(w, g): [] for w in fns for g in GAPS}
    cpu: dict[tuple[str, str], list[float]] = {(w, g): [] for w in fns for g in GAPS}
    for fn in fns.values():
        fn(0)  # first-call costs (imports, weights) out of the cells
    for i in range(calls):
        for w, fn in fns.items():
            order = GAPS[i % 3 :] + GAPS[: i % 3]  # no gap always first
            for g in order:
                if g == "sleep":
                    time.sleep(gap_s)
                elif g == "spin":
                    spin(gap_s)
                t0, c0 = time.perf_counter(), time.thread_time()
                fn(i)
                c1, t1 = time.thread_time(), time.perf_counter()
                wall[w, g].append((t1 - t0) * 1000)
                cpu[w, g].append((c1 - c0) * 1000)
    rows: dict[str, Any] = {}
    for w in fns:
        row: dict[str, Any] = {}
        for g in GAPS:
            row[g] = {
                "wall_p50_ms": round(statistics.median(wall[w, g]), 4),
                "cpu_p50_ms": round(statistics.median(cpu[w, g]), 4),
            }
        base = row["none"]
        for g in GAPS[1:]:
            for kind in ("wall", "cpu"):
                denominator = base[f"{kind}_p50_ms"]
                ratio = row[g][f"{kind}_p50_ms"] / denominator if denominator > 0 else None
                row[f"{g}_over_none_{kind}"] = round(ratio, 3) if ratio is not None else None
        rows[w] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)  # the service's performance.cpu_threads in the serving-path cells
    fns = workloads()
    with stage(f"idle core: {len(fns)} workloads x {GAPS}, {args.calls} calls per cell, gaps of {args.gap_ms:g} ms"):
        rows = measure(fns, args.calls, args.gap_ms / 1000)
    for w, row in rows.items():
        print(
            f"   {w}: sleep/none wall {row['sleep_over_none_wall']} cpu {row['sleep_over_none_cpu']}; "
            f"spin/none wall {row['spin_over_none_wall']} cpu {row['spin_over_none_cpu']}",
            flush=True,
        )
    write_result(
        "idle_core",
        {"quick": args.quick, "machine": machine(), "calls": args.calls, "gap_ms": args.gap_ms, "workloads": rows},
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
