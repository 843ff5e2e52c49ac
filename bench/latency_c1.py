"""What the service adds at concurrency 1, split (`make bench-latency_c1`).

For each task, one request at a time, in turn call by call:
  service      the real service (`python -m cxr_<task>`), client-measured latency;
  in_process   the same image through the same code in this process: decode + preprocess,
               forward at batch 1, postprocess + response (the work with no server at all);
and, from the service's own access log (DEBUG), the time each call spent inside the server
(interceptor to interceptor). So:
  service - in_process   what serving adds end to end (the <= 5 ms target);
  service - server       gRPC transport, (de)serialisation, the client: outside the handler;
  inference              each side's inference (the service's `timing.inference_ms`, from its event loop: the
                         hand-off to the model thread, the batch wait and the way back included; in process
                         the forward alone), and
                         added_besides_inference: each call less its own inference, paired (classification);
  decode_preprocess      the image's decode + preprocessing on each side (the service's from its response's
                         `timing`, classification only): the same code, run by the service's threads after they
                         idled, in process after its own forward or after waiting for the service.
A 200 ms forward varies by more than the few ms being measured, hence many rounds and p50s.
Then both sides are loaded as bench/stack.py loads them before its own c=1 calls (this process runs
batched forwards, the service serves concurrency 8) and the rounds run again ("after_load"): the two
benchmarks' c=1 numbers then come from one process.

    .venv/bin/python -m bench.latency_c1               # both tasks, 80 rounds each (~3 min)
    .venv/bin/python -m bench.latency_c1 --quick       # 128 px, 20 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    Recorder,
    drive_closed,
    free_port,
    grpc_serving,
    machine,
    nih_pngs,
    paired_p50,
    stage,
    stop_on_sigterm,
    write_result,
)
from bench._peers import (
    StackOptions,
    Task,
    default_model_instances,
    grpc_call,
    load_settings_file,
    service_process,
    task_named,
    write_settings,
)
from bench.stack import GRPC_OPTIONS, set_torch_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default="classification,segmentation")
    ap.add_argument("--rounds", type=int, help="calls per path (80; quick 20)")
    ap.add_argument("--seconds", type=float, default=120.0, help="time budget per task")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument(
        "--load-seconds", type=float,
        help="then load both sides as bench/stack.py does before its c=1 calls (in-process batched forwards, "
        "the service at c=8), this long each, and measure again (20; quick 3; 0 skips)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (20 if args.quick else 80)
    args.load_seconds = args.load_seconds if args.load_seconds is not None else (3.0 if args.quick else 20.0)
    args.size = 128 if args.quick else None
    return args


def server_ms(log: str, method: str) -> list[float]:
    """Per-call server time from the service's JSON access log lines for `method`."""
    out = []
    for line in log.splitlines():
        if line.startswith("{") and f"/{method}" in line:
            rec = json.loads(line)
            if rec.get("msg") == "rpc" and rec.get("code") == "OK" and "ms" in rec:
                out.append(float(rec["ms"]))
    return out


def p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def summarise(r: Rounds, inside: list[float]) -> dict[str, Any]:
    client, local = r.client, r.local
    row: dict[str, Any] = {
        "rounds": len(client),
        "service_p50_ms": p50(client),
        "in_process_p50_ms": p50(local),
        "server_p50_ms": p50(inside),
        "server_calls_logged": len(inside),
    }
    if row["service_p50_ms"] is not None and row["in_process_p50_ms"] is not None:
        row["added_p50_ms"] = round(row["service_p50_ms"] - row["in_process_p50_ms"], 3)
        row["service_over_in_process"] = round(row["service_p50_ms"] / row["in_process_p50_ms"], 4)
        # each round's two calls carry the same image back to back: the median of their differences
        # cancels what varies between images and rounds, which the difference of two p50s keeps
        row["added_paired_p50_ms"] = paired_p50(local, client)
    if row["service_p50_ms"] is not None and row["server_p50_ms"] is not None:
        row["outside_handler_p50_ms"] = round(row["service_p50_ms"] - row["server_p50_ms"], 3)
    if row["server_p50_ms"] is not None and row["in_process_p50_ms"] is not None:
        row["inside_over_in_process_p50_ms"] = round(row["server_p50_ms"] - row["in_process_p50_ms"], 3)
    if r.service_prepare:  # the same decode + preprocessing code: the service's threads run it after idling
        row["decode_preprocess_p50_ms"] = {"service": p50(r.service_prepare), "in_process": p50(r.local_prepare)}
    if r.service_inference:
        # the service's from its event loop (the hand-off to the model's thread, the batch wait, the forward, the
        # way back); in process the forward alone: their difference mixes the hand-off with each side's forward speed
        row["inference_p50_ms"] = {"service": p50(r.service_inference), "in_process": p50(r.local_inference)}
        if len(r.service_inference) == len(r.client) and len(r.local_inference) == len(r.local):
            # a diagnostic, not the target: each call less its own inference, paired; what serving adds besides
            # the inference (the hand-off and batch wait, inside the service's inference, are left out with it)
            row["added_besides_inference_paired_p50_ms"] = paired_p50(
                [t - f for t, f in zip(r.local, r.local_inference, strict=True)],
                [t - f for t, f in zip(r.client, r.service_inference, strict=True)],
            )
    return row


@dataclass
class Rounds:
    """Per path, ms per call: the client's whole call, and the image's decode + preprocessing (for the service,
    as its response's `timing` reports it; absent for a response without one) and its inference (the service's
    `timing.inference_ms`; in process the forward alone)."""

    client: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    service_prepare: list[float] = field(default_factory=list)
    local_prepare: list[float] = field(default_factory=list)
    service_inference: list[float] = field(default_factory=list)
    local_inference: list[float] = field(default_factory=list)


async def rounds_in_turn(call: Any, task: Task, model: Any, pngs: list[bytes], rounds: int,
                         seconds: float) -> Rounds:  # fmt: skip
    """`rounds` times: one call to the service and the same image in process (client ms each), the
    service first in even rounds and second in odd ones (a fixed order carries a position effect of
    0.6-0.9 ms: bench/README.md, "What the service adds at concurrency 1")."""
    out = Rounds()
    stop_at = time.perf_counter() + seconds

    async def remote(i: int) -> None:
        t0 = time.perf_counter()
        response = await call(i)
        out.client.append((time.perf_counter() - t0) * 1000)
        if "timing" in type(response).DESCRIPTOR.fields_by_name and response.HasField("timing"):
            out.service_prepare.append(response.timing.decode_ms + response.timing.preprocess_ms)
            out.service_inference.append(response.timing.inference_ms)

    def in_process(i: int) -> None:
        t0 = time.perf_counter()
        ctx, item = task.prepare(model, pngs[i % len(pngs)])
        t1 = time.perf_counter()
        (result,) = model.predict([item])
        t2 = time.perf_counter()
        task.finish(model, ctx, result)
        out.local.append((time.perf_counter() - t0) * 1000)
        out.local_prepare.append((t1 - t0) * 1000)
        out.local_inference.append((t2 - t1) * 1000)

    for i in range(rounds):
        if time.perf_counter() > stop_at:
            break
        if i % 2:
            in_process(i)
            await remote(i)
        else:
            await remote(i)
            in_process(i)
    return out


async def load_both(call: Any, task: Task, model: Any, pngs: list[bytes], instances: int, seconds: float) -> None:
    """What bench/stack.py does before its c=1 interleaved calls: batched forwards of this process's model
    on `instances` threads (its ceiling cells) and the service driven at concurrency 8 (its peer cells)."""
    from bench.stack import parallel_forwards

    batch = [task.prepare(model, p)[1] for p in pngs]
    parallel_forwards(model, batch, instances, 10_000, seconds, lambda: None)
    await drive_closed(call, 8, Recorder(), max_requests=10_000, max_seconds=seconds)


async def measure(task: Task, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import grpc

    sizes = {"input_size": args.size, "seg_input_size": args.size} if args.size else {}
    opts = StackOptions(model_instances=default_model_instances("cpu", args.torch_threads), **sizes)
    config = write_settings(task, opts, tmp)
    settings = json.loads(config.read_text())
    settings["server_config"]["log_level"] = "DEBUG"  # one access-log line per call, with its ms
    config.write_text(json.dumps(settings))
    pngs = nih_pngs(8)
    model = task.load(load_settings_file(str(config)))
    port = free_port()
    svc = service_process(task, config, port)
    warmup = 5
    phases: dict[str, Rounds] = {}
    calls_before_load = 0
    policies: dict[str, int] = {}
    try:
        await svc.wait_ready(lambda: grpc_serving(port))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            call = grpc_call(ch, task, pngs)
            for i in range(warmup):
                await call(i)
                _ctx, item = task.prepare(model, pngs[i % len(pngs)])
                model.predict([item])
            phases["fresh"] = await rounds_in_turn(call, task, model, pngs, args.rounds, args.seconds / 2)
            if args.load_seconds > 0:
                calls_before_load = warmup + len(phases["fresh"].client)
                await load_both(call, task, model, pngs, opts.model_instances, args.load_seconds)
                phases["after_load"] = await rounds_in_turn(call, task, model, pngs, args.rounds, args.seconds / 2)
        policies = svc.thread_policies()
    finally:
        log = svc.log_tail(1 << 30)
        svc.stop()
        model.unload()
    method = task.grpc_method.rsplit("/", 1)[-1]
    logged = server_ms(log, method)
    row = summarise(phases["fresh"], logged[warmup : warmup + len(phases["fresh"].client)])
    if "after_load" in phases:
        n = len(phases["after_load"].client)
        row["after_load"] = summarise(phases["after_load"], logged[len(logged) - n :] if n else [])
        row["after_load"]["load_seconds"] = args.load_seconds
        row["after_load"]["calls_logged_before_load"] = calls_before_load
    row["server_thread_policies"] = policies  # the service's threads per CPU scheduling policy, after the rounds
    print(f"   {json.dumps(row)}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    set_torch_threads(args.torch_threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks.split(","):
            with stage(f"{name}: service vs in process, concurrency 1, {args.rounds} rounds in turn"):
                results[name] = asyncio.run(measure(task_named(name), args, Path(tmp)))
    data = {"quick": args.quick, "machine": machine(), "target": "added_p50_ms <= 5 (CPU)", "tasks": results}
    write_result("latency_c1-quick" if args.quick else "latency_c1", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
