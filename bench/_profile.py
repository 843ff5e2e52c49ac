"""Profile a service under load with py-spy: where the service path spends its time.

    .venv/bin/python -m bench._profile --task segmentation --concurrency 8 --seconds 20
    .venv/bin/python -m bench._profile --task classification --format speedscope   # open in speedscope.app

Starts the real service (the settings bench/stack.py uses), drives it closed-loop at the given
concurrency while `py-spy record` samples every thread (on CPU only; --idle adds waiting), then prints the
functions with the most samples, own time and with callees, so decode, copies, serialisation
and hand-offs show. The raw profile goes to bench/results/profile-<task>.<ext> (not committed).

`--gil` samples only the thread holding the GIL. One process can run at most 1 000 / (GIL ms per
image) images per second whatever its cores, so the GIL ms per image it prints is the ceiling of one
service process on a GPU node, where the forward no longer dominates (bench/README.md, "GPU").

    .venv/bin/python -m bench._profile --task classification --concurrency 32 --gil --max-batch-size 32
    python -m bench._profile --device cuda --gil --concurrency 32 --max-batch-size 32 --num-workers 8
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import RESULTS, closed_loop, free_port, grpc_serving, nih_pngs
from bench._peers import StackOptions, grpc_call, service_process, task_named, write_settings
from bench.stack import GRPC_OPTIONS, set_torch_threads

RATE_HZ = 200  # py-spy samples per second


def gil_ms_per_image(samples: int, seconds: float, img_per_s: float) -> float:
    """With --gil every sample is one moment some thread held the GIL: held ms per image served."""
    held_s = samples / RATE_HZ
    return round(1000 * held_s / (img_per_s * seconds), 3)


def top_functions(collapsed: Path, n: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(own samples, inclusive samples, total) per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        k = int(count)
        total += k
        own[frames[-1]] += k
        for f in set(frames[1:]):  # frames[0] is the thread
            inclusive[f] += k
    return own.most_common(n), inclusive.most_common(n), total


async def drive(
    task_name: str, config: Path, port: int, concurrency: int, seconds: float, fmt: str, idle: bool, gil: bool = False
) -> tuple[Path, dict[str, Any]]:
    import grpc

    task = task_named(task_name)
    svc = service_process(task, config, port)
    ext = {"raw": "txt", "speedscope": "json", "flamegraph": "svg"}[fmt]
    out = RESULTS / f"profile-{task_name}.{ext}"
    try:
        await svc.wait_ready(lambda: grpc_serving(port))
        assert svc.proc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            call = grpc_call(ch, task, nih_pngs(8))
            await closed_loop(call, concurrency, max_requests=2 * concurrency, max_seconds=seconds)  # warm-up
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(svc.proc.pid), "--duration", str(int(seconds)), "--threads",
                 *(["--idle"] if idle else []), *(["--gil"] if gil else []), "--rate", str(RATE_HZ),
                 "--format", fmt, "--output", str(out)],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            row = await closed_loop(call, concurrency, max_requests=100000, max_seconds=seconds + 1)
            spy.wait(timeout=seconds + 60)
        print(f"under profile: {row['img_per_s']} img/s, p50 {row['p50_ms']} ms at concurrency {concurrency}")
    finally:
        svc.stop()
    return out, row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["classification", "segmentation"], default="classification")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--format", choices=["raw", "speedscope", "flamegraph"], default="raw")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--idle", action="store_true", help="also sample waiting threads (wall-clock view)")
    ap.add_argument("--model-instances", type=int, default=1, help="server_config.model_instances")
    ap.add_argument("--batch-delay-ms", type=float, default=2.0, help="server_config.max_batch_delay_ms")
    ap.add_argument("--instance-mode", choices=["thread", "process"], default="thread",
                    help="server_config.model_instance_mode (py-spy follows the instance processes too)")  # fmt: skip
    ap.add_argument("--amp", action="store_true", help="performance.use_amp (bfloat16 on CPUs with native bf16)")
    ap.add_argument("--gil", action="store_true", help="only the thread holding the GIL: GIL ms per image")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=2, help="server_config.num_workers (decode threads)")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install -r requirements/dev.txt", file=sys.stderr)
        return 2
    set_torch_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts = StackOptions(
            device=args.device,
            max_batch_size=args.max_batch_size,
            num_workers=args.num_workers,
            cpu_threads=args.torch_threads,
            input_size=args.input_size,
            seg_input_size=args.input_size,
            model_instances=args.model_instances,
            batch_delay_ms=args.batch_delay_ms,
            instance_mode=args.instance_mode,
            use_amp=True if args.amp else None,
        )
        config = write_settings(task_named(args.task), opts, Path(tmp))
        out, row = asyncio.run(
            drive(args.task, config, free_port(), args.concurrency, args.seconds, args.format, args.idle, args.gil)
        )
    print(f"wrote {out}")
    if args.format == "raw":
        own, inclusive, total = top_functions(out, args.top)
        if args.gil:
            per_image = gil_ms_per_image(total, int(args.seconds), row["img_per_s"])
            print(f"GIL held {per_image} ms per image: one process tops out near {1000 / per_image:.0f} img/s")
        print(f"\nown time (of {total} samples):")
        for name, k in own:
            print(f"  {100 * k / total:5.1f}%  {name}")
        print("\nwith callees:")
        for name, k in inclusive:
            print(f"  {100 * k / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
