"""Whole stack against its peers, side by side in ONE run (`make bench-stack`).

Same model, weights, settings JSON and real NIH PNGs for every peer; the same asyncio client:
  (a) ceiling   raw in-process batched forward on preprocessed tensors (no decode, no RPC);
                also the in-process cost of one image's decode+preprocess and postprocess+response
  (b) service   our service (`python -m cxr_<task>`), gRPC direct
  (c) gateway   the same service through the local gateway (Kong stand-in): REST and gRPC proxy
  (d) naive     a plain gRPC server (thread pool, one forward per request)
  (e) litserve  LitServe serving the same model with its dynamic batching (max_batch_size,
                batch_timeout = our max_batch_size, max_batch_delay_ms), JSON over HTTP
at concurrency 1/8/32: img/s, p50/p99, peak RSS of the server's process tree, time to READY;
ratios service/ceiling, service/LitServe, service/naive and the p50 the service and the gateway
add at concurrency 1. Segmentation: (a), (b), (d), (e) (and (c) with --seg-gateway).
Then, per task, the serving-path CPU per image by input format (PNG, JPEG, DICOM, DICOM JPEG baseline,
12-bit DICOM; segmentation also by mask encoding) with a cheap model: bench/_serving_path.py.
Last, the frontend scale-out: req/s of classification with a cheap model at frontend_processes 1 and 2,
in turn, with the client's CPU: bench/frontends.py.
Every measurement is bounded by a request count AND seconds. All peers run at once and are measured
in turn (rotating rounds per concurrency, the ceiling in the same rounds): load from other processes
on a shared host then hits every peer alike.

    .venv/bin/python -m bench.stack             # densenet121 @224, U-Net resnet34 @256: ~10 min on 2 cores
    .venv/bin/python -m bench.stack --quick     # smaller and shorter, ~3 min
    .venv/bin/python -m bench.stack --device cuda --max-batch-size 32 --input-size 224   # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import _serving_path as serving_path
from bench import frontends
from bench._common import (
    API_KEY,
    REPO,
    Call,
    Recorder,
    ServerProcess,
    add_thread_cpu,
    busiest_threads,
    drive_closed,
    environ_of,
    free_port,
    gpu_mib_by_pid,
    grpc_serving,
    http_ok,
    interleaved,
    machine,
    nih_pngs,
    only_running,
    own_cpu_s,
    paired_p50,
    stage,
    stat_cpu_s,
    stop_on_sigterm,
    summarize,
    thread_cpu_s,
    tree_cpu_s,
    tree_gpu_mib,
    write_result,
)
from bench._peers import (
    StackOptions,
    Task,
    default_model_instances,
    device_sync,
    gateway_process,
    grpc_call,
    http_call,
    load_settings_file,
    peer_process,
    service_process,
    task_named,
    write_settings,
)

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
SHORT_SPIN = "10000"  # GOMP_SPINCOUNT of the service_short_spin peer (libgomp's default: 300,000 turns)
THREAD_VARS = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs, short phases (a smoke run)")
    ap.add_argument("--tasks", default="classification,segmentation")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--input-size", type=int, help="classifier input (224; quick 128)")
    ap.add_argument("--seg-input-size", type=int, help="U-Net input (256; quick 128)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-delay-ms", type=float, default=2.0, help="our max_batch_delay_ms = LitServe batch_timeout")
    ap.add_argument("--num-workers", type=int, default=2, help="service decode/preprocess threads")
    ap.add_argument(
        "--torch-threads", type=int, default=1,
        help="intra-op threads of every peer and the ceiling (OMP_NUM_THREADS); 1 leaves a core for decoding",
    )  # fmt: skip
    ap.add_argument(
        "--model-instances", type=int,
        help="batches at once: our server_config.model_instances, LitServe's workers_per_device and the "
        "ceiling's forward threads (CPU default: cores / torch threads; GPU: 1)",
    )  # fmt: skip
    ap.add_argument(
        "--instance-mode", choices=["thread", "process"], default="thread",
        help="our server_config.model_instance_mode, and how the ceiling runs its forwards (threads or processes)",
    )  # fmt: skip
    ap.add_argument(
        "--amp", action="store_true",
        help="performance.use_amp for the service, the ceiling and litserve_folded also on CPU (bfloat16 where the "
        "CPU has it natively); litserve and naive, as a user writes them, stay float32 on CPU",
    )  # fmt: skip
    ap.add_argument(
        "--cudnn-benchmark", choices=["on", "off"], default="off",
        help="performance.cudnn_benchmark of every peer (GPU; off is the platform's default): on, cuDNN times "
        "its algorithms for every batch size the GPU warm-up runs, 20-60 s of start-up per model",
    )  # fmt: skip
    ap.add_argument("--mask-encoding", default="png", choices=["png", "rle", "none"])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, help="max requests per measurement (400, GPU 2000; quick 48)")
    ap.add_argument("--seconds", type=float, help="max seconds per measurement (15; quick 4)")
    ap.add_argument("--images", type=int, default=16, help="distinct NIH PNGs cycled through")
    ap.add_argument("--rounds", type=int, help="cells per peer and concurrency, taken in turn (3; quick 2)")
    ap.add_argument(
        "--peers", default="service,gateway_rest,gateway_grpc,naive,litserve,litserve_folded",
        help="also: service_other_mode (our service with the other --instance-mode), service_eager (our service "
        "without performance.cuda_graphs: GPU), service_one_frontend (our service with frontend_processes 1), "
        "service_two_instances (our service with server_config.model_instances 2: two batches at once), "
        "service_short_spin (our service with GOMP_SPINCOUNT=10000: torch's OpenMP workers stop spinning ~0.1-1 ms "
        "after a parallel region instead of several ms)",
    )  # fmt: skip
    ap.add_argument("--seg-gateway", action="store_true", help="also measure segmentation through the gateway")
    ap.add_argument(
        "--serving-path-requests", type=int,
        help="requests per input format (and mask encoding) in the serving-path CPU cells (320; quick 48); 0: none",
    )  # fmt: skip
    ap.add_argument(
        "--serving-path-baseline", type=Path,
        help="a source tree of the platform (e.g. `git worktree add DIR <commit>`): its service runs beside ours in "
        "the serving-path cells, in the same rotating rounds, for a before/after side by side",
    )  # fmt: skip
    ap.add_argument(
        "--serving-path-only",
        action="store_true",
        help="run only the serving-path cells of each task (with their own cheap-model ceiling; no main ceiling, "
        "peers or scale-out stage); the result goes to bench/results/stack-serving-path-only.json unless --out "
        "says otherwise",
    )
    ap.add_argument(
        "--frontend-processes", type=int,
        help="the service's server_config.frontend_processes (default: the platform's, 1 on CPU, cores/2 on a GPU)",
    )  # fmt: skip
    ap.add_argument(
        "--channels", type=int, default=1,
        help="gRPC connections per gRPC peer, calls spread over them: the kernel hands each connection to one "
        "frontend process, so a run with N frontends needs several",
    )  # fmt: skip
    frontends.add_arguments(ap)
    ap.add_argument(
        "--out", type=Path,
        help="default bench/results/stack.json (stack-quick.json with --quick; stack-serving-path-only[-quick].json "
        "with --serving-path-only)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    q = args.quick
    args.input_size = args.input_size or (128 if q else 224)
    args.seg_input_size = args.seg_input_size or (128 if q else 256)
    # a GPU answers ~10x faster: 400 requests a cell would be a few batches, shorter than its clocks take to rise
    args.requests = args.requests or (48 if q else 2000 if args.device.startswith("cuda") else 400)
    args.seconds = args.seconds or (4.0 if q else 15.0)
    args.rounds = args.rounds or (2 if q else 3)
    if args.serving_path_requests is None:
        args.serving_path_requests = 48 if q else 320
    if args.serving_path_only:
        if args.serving_path_requests <= 0:
            ap.error("--serving-path-only needs --serving-path-requests above 0")
        args.frontend_requests = 0
    if args.frontend_requests is None:
        args.frontend_requests = 120 if q else 600
    scales_out = args.frontend_requests > 0 and "classification" in args.tasks.split(",")
    if scales_out and (problem := frontends.client_processes_problem(args)):
        ap.error(problem)
    if args.model_instances is None:
        args.model_instances = default_model_instances(args.device, args.torch_threads)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.tasks = args.tasks.split(",")
    args.peers = args.peers.split(",")
    return args


def set_torch_threads(n: int) -> None:
    """The same intra-op thread count in this process (ceiling) and every server it starts (env)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def variant(task: Task, args: argparse.Namespace, tmp: Path, **changes: Any) -> Path:
    """The settings JSON of the run with some StackOptions changed, in its own folder."""
    folder = tmp / "-".join(f"{k}={v}" for k, v in sorted(changes.items()))
    folder.mkdir(exist_ok=True)
    return write_settings(task, replace(options(args), **changes), folder)


def options(args: argparse.Namespace) -> StackOptions:
    return StackOptions(
        device=args.device,
        input_size=args.input_size,
        seg_input_size=args.seg_input_size,
        max_batch_size=args.max_batch_size,
        batch_delay_ms=args.batch_delay_ms,
        num_workers=args.num_workers,
        mask_encoding=args.mask_encoding,
        cpu_threads=args.torch_threads,
        model_instances=args.model_instances,
        instance_mode=args.instance_mode,
        use_amp=True if args.amp else None,
        cudnn_benchmark=args.cudnn_benchmark == "on",
        frontend_processes=args.frontend_processes,
    )


# -- (a) ceiling ---------------------------------------------------------------------------------
def parallel_forwards(model: Any, batch: list[Any], instances: int, max_images: int, max_seconds: float,
                      sync: Any) -> tuple[int, float]:  # fmt: skip
    """`instances` threads each running batched forwards back to back (the service's model_instances):
    images done and wall seconds, bounded by both."""
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    done = [0]
    started = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                if done[0] >= max_images or time.perf_counter() - started >= max_seconds:
                    return
                done[0] += len(batch)
            model.predict(batch)
            sync()

    with ThreadPoolExecutor(instances) as pool:
        for f in [pool.submit(worker) for _ in range(instances)]:
            f.result()
    return done[0], time.perf_counter() - started


def _ms_p50(fn: Any, n: int, budget_s: float) -> float:
    times: list[float] = []
    stop_at = time.perf_counter() + budget_s
    while len(times) < n and time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        fn(len(times))
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def ceiling(task: Task, config: Path, pngs: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Batched forward passes on prepared inputs; and the per-image CPU work around the forward."""

    model = task.load(load_settings_file(str(config)))
    prepared = [task.prepare(model, p) for p in pngs]
    bs = args.max_batch_size
    batch = [prepared[i % len(prepared)][1] for i in range(bs)]
    model.predict(batch)  # warm the full batch shape
    sync = device_sync(args.device)
    images, wall = parallel_forwards(model, batch, args.model_instances, args.requests, args.seconds, sync)
    ips = images / wall
    outs = model.predict(batch)
    n = 20 if not args.quick else 5
    result = {
        "batch_size": bs,
        "forward_threads": args.model_instances,
        "img_per_s": round(ips, 3),
        "images": images,
        "forward_b1_p50_ms": _ms_p50(lambda i: model.predict([batch[i % bs]]), n, args.seconds),
        "prepare_p50_ms": _ms_p50(lambda i: task.prepare(model, pngs[i % len(pngs)]), n, args.seconds),
        # batch item j is prepared[j % len(prepared)] (the batch can be larger than the image set)
        "finish_p50_ms": _ms_p50(
            lambda i: task.finish(model, prepared[(i % bs) % len(prepared)][0], outs[i % bs]), n, args.seconds
        ),
    }
    # one image end to end in process: what a client could get with no server at all (concurrency 1)
    result["pipeline_b1_p50_ms"] = round(
        result["forward_b1_p50_ms"] + result["prepare_p50_ms"] + result["finish_p50_ms"], 3
    )
    model.unload()
    return result


# -- (b)-(e) peers, measured in turn ------------------------------------------------------------------
@dataclass
class Target:
    server: ServerProcess
    call: Call
    behind: ServerProcess | None = None  # the service a gateway row needs running too

    @property
    def processes(self) -> list[ServerProcess]:
        return [self.server] + ([self.behind] if self.behind is not None else [])


class CeilingCell:
    """The batched forward, with no decode and no RPC, as one more 'peer' in the rotation: on as many
    threads of this process (instance mode thread) or processes (`bench._peers ceiling`, instance mode
    process) as the service has model instances. `model` also serves the in-process pipeline."""

    def __init__(self, task: Task, config: Path, pngs: list[bytes], args: argparse.Namespace) -> None:
        self.model = task.load(load_settings_file(str(config)))
        prepared = [task.prepare(self.model, p)[1] for p in pngs]
        self.batch = [prepared[i % len(prepared)] for i in range(args.max_batch_size)]
        self.sync = device_sync(args.device)
        self.instances = args.model_instances
        self.model.predict(self.batch)
        self.workers: list[subprocess.Popen[str]] = []
        if args.instance_mode == "process":
            cmd = [sys.executable, "-m", "bench._peers", "ceiling", "--task", task.name,
                   "--config", str(config), "--images", str(len(pngs))]  # fmt: skip
            self.workers = [
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
                for _ in range(self.instances)
            ]
            for w in self.workers:
                assert w.stdout is not None
                if w.stdout.readline().strip() != "ready":
                    self.close()
                    raise RuntimeError("a ceiling worker did not start (see its stderr)")

    def run(self, max_images: int, max_seconds: float) -> tuple[int, float]:
        if not self.workers:
            return parallel_forwards(self.model, self.batch, self.instances, max_images, max_seconds, self.sync)
        share = max(1, max_images // len(self.workers))
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"{share} {max_seconds}\n")
            w.stdin.flush()
        replies = [w.stdout.readline().split() for w in self.workers if w.stdout is not None]
        return sum(int(r[0]) for r in replies), max(float(r[1]) for r in replies)

    def cpu_s(self) -> float:
        """CPU seconds of the ceiling's forwards so far: this process (threads), or its worker processes."""
        if self.workers:
            return tree_cpu_s([w.pid for w in self.workers])
        return own_cpu_s()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
            w.wait()
        self.model.unload()


def per_image_ms(cpu_s: float, images: int) -> float | None:
    return round(1000 * cpu_s / images, 2) if images else None


def server_processes(targets: dict[str, Target]) -> list[ServerProcess]:
    """Every server process behind the targets, once each (gateway rows share the service's)."""
    return list({id(p): p for t in targets.values() for p in t.processes}.values())


async def measure_in_turn(
    targets: dict[str, Target], ceiling_cell: CeilingCell, args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every concurrency level: `rounds` rounds, each giving every peer (and the ceiling) one cell of
    requests/rounds calls or seconds/rounds seconds, in a rotating order: load from other processes on
    the host then hits every peer alike instead of whichever ran at the wrong moment. The servers a cell
    does not use are paused (SIGSTOP) during it, so an idle peer's polling costs the measured one nothing."""
    rounds = args.rounds
    servers = server_processes(targets)
    peers: dict[str, Any] = {name: {"levels": []} for name in targets}
    ceilings = []
    names = [*targets, "ceiling"]
    for c in args.levels:
        recs = {name: Recorder() for name in targets}
        walls = dict.fromkeys(names, 0.0)
        rss = dict.fromkeys(targets, 0.0)
        by_round: dict[str, list[float]] = {name: [] for name in names}  # img/s of each cell, round by round
        # CPU seconds spent in each one's cells; "top": the server's own processes without their children (with
        # frontend processes, the model executor alone)
        cpu = {name: {"server": 0.0, "top": 0.0, "client": 0.0} for name in names}
        threads: dict[str, dict[tuple[int, int], tuple[str, float]]] = {name: {} for name in names}
        ceiling_images = 0
        for t in targets.values():  # warm-up: one call per caller
            await asyncio.gather(*(t.call(k) for k in range(c)))
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name == "ceiling":
                    with only_running(servers, []):
                        before = ceiling_cell.cpu_s()
                        images, wall = ceiling_cell.run(max(args.max_batch_size, args.requests // rounds),
                                                        args.seconds / rounds)  # fmt: skip
                        cpu[name]["server"] += ceiling_cell.cpu_s() - before
                    ceiling_images += images
                    walls[name] += wall
                    by_round[name].append(round(images / wall, 3))
                    continue
                done_before = len(recs[name].ok)
                pids = [p.proc.pid for p in targets[name].processes if p.proc is not None]
                with only_running(servers, targets[name].processes):
                    async with targets[name].server.sampling_rss() as peak:
                        server_before, client_before = tree_cpu_s(pids), own_cpu_s()
                        top_before = sum(stat_cpu_s(pid) for pid in pids)
                        threads_before = thread_cpu_s(pids)
                        wall = await drive_closed(targets[name].call, c, recs[name],
                                                  max_requests=max(c, args.requests // rounds),
                                                  max_seconds=args.seconds / rounds)  # fmt: skip
                        top_after = sum(stat_cpu_s(pid) for pid in pids)  # inside the tree's window: top <= server
                        add_thread_cpu(threads[name], threads_before, thread_cpu_s(pids))
                        cpu[name]["server"] += tree_cpu_s(pids) - server_before
                        cpu[name]["top"] += top_after - top_before
                        cpu[name]["client"] += own_cpu_s() - client_before
                walls[name] += wall
                by_round[name].append(round((len(recs[name].ok) - done_before) / wall, 3))
                rss[name] = max(rss[name], peak["rss_peak_mb"])
        gpu_table = gpu_mib_by_pid() if args.device.startswith("cuda") else {}  # after the level: its peak cache
        ceilings.append({"concurrency": c, "img_per_s": round(ceiling_images / walls["ceiling"], 3),
                         "gpu_mib": tree_gpu_mib(os.getpid(), gpu_table),
                         "images": ceiling_images, "img_per_s_by_round": by_round["ceiling"],
                         "cpu_ms_per_img": per_image_ms(cpu["ceiling"]["server"], ceiling_images)})  # fmt: skip
        print(f"   ceiling       c={c:<3} {ceilings[-1]['img_per_s']:8.2f} img/s (in the same rounds)"
              f"  cpu {ceilings[-1]['cpu_ms_per_img']} ms/img", flush=True)  # fmt: skip
        for name in targets:
            done = len(recs[name].ok)
            row = summarize(recs[name], walls[name], concurrency=c, rss_peak_mb=rss[name], rounds=rounds,
                            img_per_s_by_round=by_round[name],
                            server_cpu_ms_per_img=per_image_ms(cpu[name]["server"], done),
                            server_top_cpu_ms_per_img=per_image_ms(cpu[name]["top"], done),
                            server_top_threads=busiest_threads(threads[name], done, walls[name]),
                            client_cpu_ms_per_img=per_image_ms(cpu[name]["client"], done),
                            gpu_mib=sum_gpu_mib(targets[name], gpu_table))  # fmt: skip
            peers[name]["levels"].append(row)
            p50, p99 = row["p50_ms"] or float("nan"), row["p99_ms"] or float("nan")
            print(
                f"   {name:<13} c={c:<3} {row['img_per_s']:8.2f} img/s  p50 {p50:8.1f} ms  p99 {p99:8.1f} ms"
                f"  rss {row['rss_peak_mb']:7.0f} MB  cpu/img server {row['server_cpu_ms_per_img']} ms"
                f" (top {row['server_top_cpu_ms_per_img']}{busiest_note(row['server_top_threads'])})"
                f" client {row['client_cpu_ms_per_img']} ms  {row['codes']}",
                flush=True,
            )
    return peers, ceilings


def busiest_note(threads: list[dict[str, Any]]) -> str:
    """The busiest thread for the console line: its name and share of a core."""
    return f"; busiest thread {threads[0]['thread']} {threads[0]['core_share']} core" if threads else ""


def sum_gpu_mib(target: Target, table: dict[int, float]) -> float | None:
    """GPU memory of every process behind a peer (None on CPU)."""
    if not table:
        return None
    return round(sum(tree_gpu_mib(p.proc.pid, table) or 0.0 for p in target.processes if p.proc is not None), 1)


async def service_interleaved(task: Task, model: Any, service: Call, pngs: list[bytes],
                              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """p50 the service adds at concurrency 1: one image through the service, then the same image in
    process (decode+preprocess, forward at batch 1, postprocess+response), call by call in turn."""

    async def in_process(i: int) -> object:
        ctx, item = task.prepare(model, pngs[i % len(pngs)])
        (out,) = model.predict([item])
        return task.finish(model, ctx, out)

    out = await interleaved({"in_process": in_process, "service": service},
                            rounds=args.requests // 4, max_seconds=2 * args.seconds)  # fmt: skip
    out["added_p50_ms"] = round(out["service"]["p50_ms"] - out["in_process"]["p50_ms"], 3)
    out["added_paired_p50_ms"] = paired_p50(out["calls_ms"]["in_process"], out["calls_ms"]["service"])
    print(f"   service interleaved c=1: in-process p50 {out['in_process']['p50_ms']:.1f} ms, "
          f"service adds {out['added_p50_ms']:+.1f} ms (paired {out['added_paired_p50_ms']})", flush=True)  # fmt: skip
    return out


async def gateway_interleaved(
    task: Task, port: int, gp: Any, pngs: list[bytes], bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """p50 the gateway adds: direct gRPC, gateway REST and gateway gRPC called in turn (concurrency 1)."""
    import aiohttp
    import grpc

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as direct,
        grpc.aio.insecure_channel(f"127.0.0.1:{gp.grpc}", options=GRPC_OPTIONS) as proxied,
        aiohttp.ClientSession() as http,
    ):
        calls = {
            "direct_grpc": grpc_call(direct, task, pngs),
            "gateway_rest": http_call(http, f"http://127.0.0.1:{gp.rest}{task.rest_path}", bodies),
            "gateway_grpc": grpc_call(proxied, task, pngs),
        }
        out = await interleaved(calls, rounds=args.requests // 2, max_seconds=2 * args.seconds)
    d = out["direct_grpc"]["p50_ms"]
    out["added_p50_ms"] = {k: round(out[k]["p50_ms"] - d, 3) for k in ("gateway_rest", "gateway_grpc")}
    calls = out["calls_ms"]
    gateways = ("gateway_rest", "gateway_grpc")
    out["added_paired_p50_ms"] = {k: paired_p50(calls["direct_grpc"], calls[k]) for k in gateways}
    print(f"   gateway interleaved c=1: direct p50 {d:.1f} ms, added {out['added_p50_ms']}", flush=True)
    return out


async def run_peers(
    task: Task, config: Path, pngs: list[bytes], args: argparse.Namespace, extra: dict[str, Any]
) -> dict[str, Any]:
    """Start every peer (all at once, each in its own process), measure them in turn, stop them."""
    import aiohttp
    import grpc

    bodies = [json.dumps(task.rest_body(p)).encode() for p in pngs]
    want = set(args.peers)
    if task.name == "segmentation" and not args.seg_gateway:
        want -= {"gateway_rest", "gateway_grpc"}
    gateway = bool(want & {"gateway_rest", "gateway_grpc"})
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

        async def channel(port: int) -> Any:
            return await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS))

        async def spread_call(port: int) -> Any:
            """The task's call over --channels connections of their own (no shared subchannel), in turn."""
            if args.channels <= 1:
                return grpc_call(await channel(port), task, pngs)
            own = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
            calls = [
                grpc_call(
                    await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own)),
                    task,
                    pngs,
                )
                for _ in range(args.channels)
            ]

            async def call(i: int) -> object:
                return await calls[i % len(calls)](i // len(calls))

            return call

        def started(proc: ServerProcess) -> ServerProcess:
            stack.callback(proc.stop)
            return proc

        ports = {
            name: free_port()
            for name in (
                "service",
                "service_other_mode",
                "service_eager",
                "service_one_frontend",
                "service_two_instances",
                "service_short_spin",
                "naive",
                "litserve",
                "litserve_folded",
            )
        }
        svc = started(service_process(task, config, ports["service"])) if "service" in want or gateway else None
        # the same service with one setting changed: the other model_instance_mode; every kernel
        # launched from Python (no CUDA graphs)
        service_variants = {
            "service_other_mode": {"instance_mode": "process" if args.instance_mode == "thread" else "thread"},
            "service_eager": {"cuda_graphs": False},
            "service_one_frontend": {"frontend_processes": 1},
            "service_two_instances": {"model_instances": 2},
        }
        variant_services = {
            name: started(service_process(task, variant(task, args, tmp, **changes), ports[name]))
            for name, changes in service_variants.items()
            if name in want
        }
        if "service_short_spin" in want:  # the same settings; torch's OpenMP workers idle-spin 10k turns, not 300k
            variant_services["service_short_spin"] = started(
                service_process(task, config, ports["service_short_spin"], env={"GOMP_SPINCOUNT": SHORT_SPIN})
            )
        # The peers a user would write serve the network as it loads: no BatchNorm folding (optimize/fold.py),
        # on CPU no autocast (optimize/amp.py), glibc's malloc as it comes (optimize/allocator.py), the eager
        # network (optimize/torchscript.py) and on a GPU no CUDA graphs (optimize/cuda_graphs.py).
        plain = variant(
            task,
            args,
            tmp,
            fold_batchnorm=False,
            use_amp=args.device.startswith("cuda"),
            cpu_heap_pad_mb=0,
            trace_models=False,
            cuda_graphs=False,
        )
        naive = (
            started(peer_process("naive", task, plain, ports["naive"], args.mask_encoding)) if "naive" in want else None
        )
        lits = {
            name: started(peer_process("litserve", task, cfg, ports[name], args.mask_encoding))
            for name, cfg in (("litserve", plain), ("litserve_folded", config))
            if name in want
        }
        targets: dict[str, Target] = {}
        startup: dict[str, float] = {}
        if svc is not None:
            startup["service"] = await svc.wait_ready(lambda: grpc_serving(ports["service"]))
            targets["service"] = Target(svc, await spread_call(ports["service"]))
        for name, proc in variant_services.items():
            port = ports[name]
            startup[name] = await proc.wait_ready(lambda port=port: grpc_serving(port))
            targets[name] = Target(proc, await spread_call(port))
        if gateway and svc is not None:
            gw, gp = gateway_process({task.name: ports["service"]}, tmp)
            started(gw)
            startup["gateway_rest"] = startup["gateway_grpc"] = await gw.wait_ready(
                lambda: http_ok(f"http://127.0.0.1:{gp.status}/status")
            )
            if "gateway_rest" in want:
                targets["gateway_rest"] = Target(
                    gw, http_call(http, f"http://127.0.0.1:{gp.rest}{task.rest_path}", bodies), behind=svc
                )
            if "gateway_grpc" in want:
                targets["gateway_grpc"] = Target(gw, grpc_call(await channel(gp.grpc), task, pngs), behind=svc)
        if naive is not None:
            startup["naive"] = await naive.wait_ready(lambda: grpc_serving(ports["naive"]))
            targets["naive"] = Target(naive, await spread_call(ports["naive"]))
        for name, lit in lits.items():
            base = f"http://127.0.0.1:{ports[name]}"
            startup[name] = await lit.wait_ready(lambda base=base: http_ok(f"{base}/health"))
            targets[name] = Target(lit, http_call(http, f"{base}/predict", bodies))
        print(f"   start-up to READY (s): {startup}", flush=True)
        cell = CeilingCell(task, config, pngs, args)
        stack.callback(cell.close)
        peers, ceilings = await measure_in_turn(targets, cell, args)
        if "service" in targets:
            servers = server_processes(targets)
            with only_running(servers, [targets["service"].server]):
                extra["service_interleaved_c1"] = await service_interleaved(
                    task, cell.model, targets["service"].call, pngs, args
                )
        for name, s in startup.items():
            if name in peers:
                peers[name]["startup_s"] = s
        for name, target in targets.items():  # the thread variables each server runs with, as its /proc shows them
            if name in peers and target.server.proc is not None:
                peers[name]["server_env"] = environ_of(target.server.proc.pid, THREAD_VARS)
        extra["ceiling_in_turn"] = ceilings
        if gateway and svc is not None:  # the other peers paused, as for every other cell (LitServe's idle
            # workers poll: left running they added ~1-2 ms to these c=1 calls on 2 cores)
            with only_running(server_processes(targets), [svc, gw]):
                extra["gateway_interleaved_c1"] = await gateway_interleaved(
                    task, ports["service"], gp, pngs, bodies, args
                )
    return peers


def _level(peer: dict[str, Any] | None, c: int) -> dict[str, Any] | None:
    if peer is None:
        return None
    return next((r for r in peer["levels"] if r["concurrency"] == c), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """a's img/s over b's, round by round (each pair measured within one rotation)."""
    pairs = zip(a.get("img_per_s_by_round", []), b.get("img_per_s_by_round", []), strict=False)
    return [round(x / y, 3) for x, y in pairs if y]


def ratios(
    ceil: dict[str, Any],
    peers: dict[str, Any],
    levels: list[int],
    inter: dict[str, Any] | None = None,
    ceiling_in_turn: list[dict[str, Any]] | None = None,
    service_inter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """service/ceiling (the ceiling measured in the same rounds), service/LitServe, service/naive by
    concurrency; p50 added at concurrency 1."""
    out: dict[str, Any] = {}
    svc = peers.get("service")
    by_level = {r["concurrency"]: r["img_per_s"] for r in ceiling_in_turn or []}
    for c in levels:
        s = _level(svc, c)
        if s is None:
            continue
        row: dict[str, Any] = {"service_over_ceiling": _ratio(s["img_per_s"], by_level.get(c, ceil["img_per_s"]))}
        ceiling_cpu = next((r.get("cpu_ms_per_img") for r in ceiling_in_turn or [] if r["concurrency"] == c), None)
        if s.get("server_cpu_ms_per_img") is not None and ceiling_cpu is not None:  # with the run's own model
            row["serving_path_cpu_ms_per_img"] = round(s["server_cpu_ms_per_img"] - ceiling_cpu, 2)
        for peer in (
            "litserve",
            "litserve_folded",
            "naive",
            "service_other_mode",
            "service_eager",
            "service_one_frontend",
            "service_two_instances",
            "service_short_spin",
            "gateway_rest",
            "gateway_grpc",
        ):
            p = _level(peers.get(peer), c)
            if p is not None:
                row[f"service_over_{peer}"] = _ratio(s["img_per_s"], p["img_per_s"])
                paired = round_ratios(s, p)
                if paired:  # the same ratio cell by cell in each round (measured minutes apart at most)
                    row[f"service_over_{peer}_by_round"] = paired
                    row[f"service_over_{peer}_won_rounds"] = f"{sum(x > 1 for x in paired)}/{len(paired)}"
        out[f"c{c}"] = row
    s1 = _level(svc, 1)
    if s1 is not None and s1["p50_ms"] is not None:
        out["service_added_p50_ms_c1"] = {
            "over_in_process_pipeline": round(s1["p50_ms"] - ceil["pipeline_b1_p50_ms"], 3),
            "over_forward_only": round(s1["p50_ms"] - ceil["forward_b1_p50_ms"], 3),
        }
    if service_inter is not None:  # measured call by call in turn with the in-process pipeline
        added = out.setdefault("service_added_p50_ms_c1", {})
        added["interleaved"] = service_inter["added_p50_ms"]
        added["interleaved_paired"] = service_inter.get("added_paired_p50_ms")
    if inter is not None:  # measured call by call in turn with direct gRPC: the noise cancels
        for gw, added_ms in inter["added_p50_ms"].items():
            out[f"{gw}_added_p50_ms_c1"] = added_ms
            out[f"{gw}_added_paired_p50_ms_c1"] = inter.get("added_paired_p50_ms", {}).get(gw)
    return out


TARGETS = {
    "service_over_ceiling_c32": ">= 0.9",
    "service_added_p50_ms_c1": "<= 5 (CPU)",
    "service_over_litserve": "> 1 at every concurrency >= 8",
    "gateway_added_p50_ms_c1": "<= 3",
}


def print_table(task: str, ceil: dict[str, Any], peers: dict[str, Any], levels: list[int]) -> None:
    print(f"\n{task}: ceiling {ceil['img_per_s']:.2f} img/s at batch {ceil['batch_size']}")
    print(f"{'peer':<20}" + "".join(f"{'c=' + str(c):>28}" for c in levels))
    for name, peer in peers.items():
        cells = []
        for c in levels:
            r = _level(peer, c)
            cells.append(f"{r['img_per_s']:7.2f}/s {r['p50_ms'] or 0:7.1f}/{r['p99_ms'] or 0:7.1f}ms" if r else "")
        print(f"{name:<20}" + "".join(f"{cell:>28}" for cell in cells))


async def serving_path_stage(task: Task, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with stage(f"{task.name}: serving-path CPU per image by input format (cheap model, in turn with its ceiling)"):
        return await serving_path.measure(task.name, args, options(args), tmp)


async def run_task(task: Task, pngs: list[bytes], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.serving_path_only:
        return {"serving_path": await serving_path_stage(task, args, tmp)}
    config = write_settings(task, options(args), tmp)
    with stage(f"{task.name}: (a) ceiling and the in-process cost of one image"):
        ceil = ceiling(task, config, pngs, args)
        print(f"   {json.dumps(ceil)}", flush=True)
    extra: dict[str, Any] = {}
    with stage(f"{task.name}: peers in turn, {args.rounds} rounds per concurrency"):
        peers = await run_peers(task, config, pngs, args, extra)
    in_turn = extra.get("ceiling_in_turn", [])
    if in_turn:  # the ceiling's throughput from the same rounds as the peers
        ceil["img_per_s_before"] = ceil["img_per_s"]
        ceil["img_per_s"] = round(statistics.mean(r["img_per_s"] for r in in_turn), 3)
    print_table(task.name, ceil, peers, args.levels)
    r = ratios(ceil, peers, args.levels, extra.get("gateway_interleaved_c1"), in_turn,
               extra.get("service_interleaved_c1"))  # fmt: skip
    print("ratios:", json.dumps(r), flush=True)
    if args.serving_path_requests > 0:
        extra["serving_path"] = await serving_path_stage(task, args, tmp)
    return {"settings": json.loads(config.read_text()), "ceiling": ceil, "peers": peers, "ratios": r, **extra}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    set_torch_threads(args.torch_threads)
    pngs = nih_pngs(args.images)
    started = time.perf_counter()
    info = machine()
    print(f"stack bench on {info['gpu'] or info['platform']}: levels {args.levels}, "
          f"<= {args.requests} requests / {args.seconds:.0f} s per measurement", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            results[name] = asyncio.run(run_task(task_named(name, args.mask_encoding), pngs, args, Path(tmp)))
        scaling = None
        if args.frontend_requests > 0 and "classification" in args.tasks:  # the scale-out stage serves a classifier
            with stage("frontend scale-out: classification with a cheap model at each of --frontend-counts, in turn"):
                scaling = asyncio.run(frontends.measure(args, Path(tmp)))
    data = {
        "quick": args.quick,
        "machine": info,
        "load_average_1m_after": machine()["load_average_1m"],
        "api_key_header": bool(API_KEY),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in {"out"}},
        "targets": TARGETS,
        "tasks": results,
        **({} if scaling is None else {"frontend_scaling": scaling}),
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = "stack-serving-path-only" if args.serving_path_only else "stack"
    write_result(f"{name}-quick" if args.quick else name, data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
