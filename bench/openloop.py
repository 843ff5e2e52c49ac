"""Latency under a fixed arrival rate, the saturation point, and how overload is shed (`make bench-openloop`).

Open loop: requests are sent at a fixed rate whatever the answers (closed-loop clients slow down
with the server and hide queueing). On the classification service with a bounded queue
(`max_queue_size`), direct gRPC and through the gateway's REST route:
  1. capacity: closed-loop throughput at concurrency 16 (a short run) = C img/s;
  2. offered rates 0.25C .. 3C, each for a fixed time (bounded in count): achieved OK/s, p50/p99 of
     the answered calls, how many were shed (RESOURCE_EXHAUSTED / HTTP 429) and how fast
     (time-to-shed p50/p99), how many hit the client deadline;
  3. saturation = the highest offered rate served in full (all OK, none shed or timed out, answers
     keeping pace with arrivals);
  4. the same 3C overload against LitServe (no queue bound: it queues until the deadline).

    .venv/bin/python -m bench.openloop [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    closed_loop,
    free_port,
    grpc_serving,
    http_ok,
    machine,
    nih_pngs,
    open_loop,
    stage,
    stop_on_sigterm,
    write_result,
)
from bench._peers import (
    ClassificationTask,
    StackOptions,
    default_model_instances,
    gateway_process,
    grpc_call,
    http_call,
    peer_process,
    service_process,
    write_settings,
)
from bench.stack import GRPC_OPTIONS, set_torch_threads

FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 3.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--input-size", type=int, help="classifier input (224; quick 128)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-queue-size", type=int, default=16, help="the service sheds beyond this many waiting")
    ap.add_argument("--seconds", type=float, help="seconds per offered rate (10; quick 4)")
    ap.add_argument("--timeout", type=float, default=10.0, help="client deadline per call")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--model-instances", type=int, help="model_instances (default: cores / torch threads)")
    ap.add_argument("--skip-litserve", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.input_size = args.input_size or (128 if args.quick else 224)
    args.seconds = args.seconds or (4.0 if args.quick else 10.0)
    return args


def saturation(rows: list[dict[str, Any]]) -> float | None:
    """The highest offered rate served in full: every call answered OK (none shed or timed out) and
    the answers keep pace with the arrivals (>= 95 % of the offered rate, so no queue builds up)."""
    full = [
        r["offered_per_s"]
        for r in rows
        if r["requests"] >= 0.95 * r["sent"]
        and r["ok_per_s"] >= 0.95 * r["offered_per_s"]
        and not r["shed"]
        and not r["codes"].get("TIMEOUT")
    ]
    return max(full) if full else None


def show(path: str, r: dict[str, Any]) -> None:
    print(
        f"   {path:<6} offered {r['offered_per_s']:7.2f}/s  ok {r['ok_per_s']:7.2f}/s  "
        f"p50 {r['p50_ms'] or 0:8.1f}  p99 {r['p99_ms'] or 0:8.1f} ms  shed {r['shed']:>4} "
        f"(p50 {r['time_to_shed_p50_ms'] or 0:.1f} ms)  {r['codes']}",
        flush=True,
    )


async def sweep(name: str, call: Any, capacity: float, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for f in FACTORS:
        rate = capacity * f
        r = await open_loop(call, rate, max_requests=int(rate * args.seconds) + 1, max_seconds=args.seconds,
                            timeout=args.timeout)  # fmt: skip
        r["factor"] = f
        show(name, r)
        rows.append(r)
        await asyncio.sleep(1.0)  # let the queue drain between rates
    return {"rates": rows, "saturation_per_s": saturation(rows)}


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import aiohttp
    import grpc

    task = ClassificationTask()
    instances = args.model_instances or default_model_instances("cpu", args.torch_threads)
    opts = StackOptions(input_size=args.input_size, max_batch_size=args.max_batch_size,
                        max_queue_size=args.max_queue_size, cpu_threads=args.torch_threads,
                        model_instances=instances)  # fmt: skip
    config = write_settings(task, opts, tmp)
    pngs = nih_pngs(8)
    bodies = [json.dumps(task.rest_body(p)).encode() for p in pngs]
    out: dict[str, Any] = {"settings": json.loads(config.read_text())}
    port = free_port()
    svc = service_process(task, config, port)
    try:
        await svc.wait_ready(lambda: grpc_serving(port))
        gw, gp = gateway_process({"classification": port}, tmp)
        try:
            await gw.wait_ready(lambda: http_ok(f"http://127.0.0.1:{gp.status}/status"))
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
            ):
                grpc_fn = grpc_call(ch, task, pngs)
                with stage("capacity (closed loop, concurrency 16)"):
                    cap = await closed_loop(grpc_fn, 16, max_requests=200, max_seconds=args.seconds, warmup=1)
                    print(f"   {cap['img_per_s']:.2f} img/s", flush=True)
                out["capacity"] = cap
                with stage("open loop, gRPC direct"):
                    out["grpc"] = await sweep("gRPC", grpc_fn, cap["img_per_s"], args)
                url = f"http://127.0.0.1:{gp.rest}{task.rest_path}"
                with stage("open loop, gateway REST"):
                    out["rest"] = await sweep("REST", http_call(http, url, bodies), cap["img_per_s"], args)
        finally:
            gw.stop()
    finally:
        svc.stop()
    if not args.skip_litserve:
        out["litserve_overload"] = await litserve_overload(task, config, bodies, out["capacity"]["img_per_s"], args)
    return out


async def litserve_overload(task: Any, config: Path, bodies: list[bytes], capacity: float, args: Any) -> dict:
    import aiohttp

    port = free_port()
    lit = peer_process("litserve", task, config, port)
    try:
        await lit.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/health"))
        with stage("LitServe at 3x capacity (no queue bound)"):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                call = http_call(http, f"http://127.0.0.1:{port}/predict", bodies)
                rate = capacity * FACTORS[-1]
                r = await open_loop(call, rate, max_requests=int(rate * args.seconds) + 1, max_seconds=args.seconds,
                                    timeout=args.timeout)  # fmt: skip
                show("lit", r)
    finally:
        lit.stop()
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    set_torch_threads(args.torch_threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    for path in ("grpc", "rest"):
        print(f"{path}: saturation at {result[path]['saturation_per_s']} req/s offered")
    result.update(
        quick=args.quick,
        machine=machine(),
        factors=list(FACTORS),
        timeout_s=args.timeout,
        seconds=round(time.perf_counter() - started, 1),
    )
    write_result("openloop-quick" if args.quick else "openloop", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
