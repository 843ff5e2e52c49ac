"""What one core of this host does per image, so two hosts' serving-path CPU can be compared (`make
bench-host_fingerprint`).

The same serving code took 2-3x more CPU per image on the lent H200 host than on the 2-core CI host
(docs/performance-history.md, "Session 36"); this names the difference instead of guessing it. On one thread, in
rotating turns, it times: our PNG decode of the NIH images (the C kernels' path, as the services decode), OpenCV's
decode of the same files (the fallback), the classifiers' one-pass 224 px resize + ImageNet normalise, a numpy copy
of 64 MiB (memory bandwidth) and a fixed pure-Python loop (the interpreter). It records the CPU model and flags,
whether the C kernels are built, and the thread settings in the environment. No pass/fail; JSON beside the
other results. Imports no torch, so it runs first and quickly on a bare GPU machine.

    .venv/bin/python -m bench.host_fingerprint            # 30 turns (~5 s)
    .venv/bin/python -m bench.host_fingerprint --quick    # 5 turns
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import nih_pngs, write_result

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CPU_FLAGS = ("sse4_2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--turns", type=int, help="turns over every workload (30; quick 5)")
    ap.add_argument("--images", type=int, default=8, help="NIH PNGs cycled through")
    ap.add_argument("--out", type=Path, help="default bench/results/host_fingerprint.json")
    args = ap.parse_args(argv)
    args.turns = args.turns or (5 if args.quick else 30)
    if args.turns < 1 or args.images < 1:
        ap.error("--turns and --images must be at least 1")
    return args


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The first processor's model name, MHz and the flags that pick our kernels' and torch's code paths."""
    fields: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block only
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return {"model": platform.processor() or None, "mhz": None, "flags": {}}
    flags = set(fields.get("flags", "").split())
    mhz = fields.get("cpu MHz")
    return {
        "model": fields.get("model name"),
        "mhz": float(mhz) if mhz else None,
        "flags": {f: f in flags for f in CPU_FLAGS},
    }


def workloads(pngs: list[bytes]) -> dict[str, Callable[[int], object]]:
    """Each workload as a call on turn i (the image cycles with i)."""
    import cv2

    from cxr_serving import png_gray8, resize
    from cxr_serving.images import decode_image

    decoded = [decode_image(p).array for p in pngs]
    src = np.ones(64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)

    def python_loop(_: int) -> int:
        total = 0
        for k in range(200_000):
            total += k & 7
        return total

    out: dict[str, Callable[[int], object]] = {
        "decode_png": lambda i: decode_image(pngs[i % len(pngs)]),
        "opencv_png": lambda i: cv2.imdecode(np.frombuffer(pngs[i % len(pngs)], np.uint8), cv2.IMREAD_UNCHANGED),
        "copy_64mib": lambda _: np.copyto(dst, src),
        "python_loop": python_loop,
    }
    if resize.kernel_built():
        out["resize_normalize_224"] = lambda i: resize.resize_normalize(
            decoded[i % len(decoded)], 224, IMAGENET_MEAN, IMAGENET_STD
        )
    if png_gray8.kernel_built():
        out["png_gray8"] = lambda i: png_gray8.decode(pngs[i % len(pngs)])
    return out


def measure(calls: dict[str, Callable[[int], object]], turns: int) -> dict[str, dict[str, float]]:
    """p50 wall and thread-CPU ms per call, the workloads in rotating order each turn (one warm-up turn first)."""
    names = list(calls)
    for name in names:
        calls[name](0)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(turns):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.thread_time()
            calls[name](i)
            cpu[name].append((time.thread_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - w0) * 1e3)
    return {
        n: {"wall_p50_ms": round(statistics.median(wall[n]), 3), "cpu_p50_ms": round(statistics.median(cpu[n]), 3)}
        for n in names
    }


def fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    from cxr_serving import pixel_kernels

    pngs = nih_pngs(args.images)
    cells = measure(workloads(pngs), args.turns)
    copy_ms = cells["copy_64mib"]["wall_p50_ms"]
    return {
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_1m": round(os.getloadavg()[0], 2),
            **cpu_info(),
        },
        "thread_env": {v: os.environ.get(v) for v in THREAD_VARS},
        "pixel_kernels_missing": pixel_kernels.missing(),
        "turns": args.turns,
        "images": len(pngs),
        "cells": cells,
        "copy_gib_per_s": round(64 / 1024 / (copy_ms / 1e3), 2) if copy_ms > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = fingerprint(args)
    h = data["host"]
    print(f"{h['model']} ({h['cpu_count']} CPUs, {h['mhz']} MHz), kernels missing: {data['pixel_kernels_missing']}")
    for name, cell in data["cells"].items():
        print(f"   {name:22s} wall {cell['wall_p50_ms']:8.3f} ms  cpu {cell['cpu_p50_ms']:8.3f} ms", flush=True)
    write_result("host_fingerprint", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
