"""Frontend scale-out (issue 23, item 2): req/s of the classification service with a cheap model (the
serving path dominates) at `server_config.frontend_processes` N=1 and N=2, side by side in one run.

Both services run at once; they are measured in turn (rotating rounds), the idle one stopped (SIGSTOP of
its process group) so it takes no CPU from the one measured. The client opens several channels, each its
own TCP connection, so the kernel spreads them over the frontends (SO_REUSEPORT); a single connection
would reach one frontend only. By default there is one connection per caller (32 clients, as it were).
The kernel hashes connections, so one frontend may hold more than its share (6 of 8): each call goes to
the channel with the fewest calls in flight (as Envoy's LEAST_REQUEST or a gRPC client's least-request
policy would), which sends more calls to the frontend that answers faster; `--frontend-pick uniform`
sends call i to channel i mod channels. Requests are serialised once, before
the run, and sent as bytes with generic unary calls (the cheapest honest asyncio client). With
`--frontend-client-processes K` the callers and connections are split over K load-generator processes
(bench/_client_pool.py); a cell's rate is then its answers over the time to the last one's reply.

From /proc, per cell and per answered request: the client's CPU `c` (this process and any load-generator
processes), the executor's `e`
(the service's parent process; at N=1 the whole server is one process and counts as `f`) and the
frontends' `f` (its children), and how many of the client's connections each frontend holds. The load
generator shares the host's cores with the servers: its CPU is in the sum.

    .venv/bin/python -m bench.frontends            # also a stage of `bench.stack`
    .venv/bin/python -m bench.frontends --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._client_pool import ClientPool
from bench._common import (
    Recorder,
    add_thread_cpu,
    busiest_threads,
    drive_closed,
    free_port,
    grpc_serving,
    machine,
    nih_pngs,
    own_cpu_s,
    process_tree,
    stat_cpu_s,
    thread_cpu_s,
    tree_cpu_s,
    write_result,
)
from bench._peers import StackOptions, grpc_call, service_process, task_named
from bench._serving_path import cheap_settings

TARGET_RATIO = 1.4  # N=2 over N=1 on this 2-core host (issue 23)
TARGET_PER_FRONTEND_GPU = 0.85  # on a 16-core GPU host: N frontends >= 0.85 N times one, up to N=8 (issue 23)
MIN_CHANNELS = 8  # connections per service at the least (4 per frontend): the kernel hashes each to one frontend
PICKS = ("least", "uniform")


class ChannelPicker:
    """Which channel a call goes to: `least` the one with the fewest calls in flight (ties: the next in
    turn), `uniform` call i to channel i mod channels."""

    def __init__(self, channels: int, how: str = "least") -> None:
        if how not in PICKS:
            raise ValueError(f"channel pick {how!r}: one of {PICKS}")
        self.in_flight = [0] * channels
        self.how = how

    def pick(self, i: int) -> int:
        n = len(self.in_flight)
        if self.how == "uniform":
            return i % n
        return min(range(n), key=lambda k: (self.in_flight[k], (k - i) % n))


def picked_call(chans: list[Any], task: Any, pngs: list[bytes], how: str) -> Any:
    """The task's call over these channels, each call on the channel `ChannelPicker(how)` picks."""
    per_channel = [grpc_call(ch, task, pngs) for ch in chans]
    picker = ChannelPicker(len(chans), how)

    async def call(i: int) -> object:
        k = picker.pick(i)
        picker.in_flight[k] += 1
        try:
            return await per_channel[k](i)
        finally:
            picker.in_flight[k] -= 1

    return call


def connections_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections to `port` each of `pids` holds (from /proc: socket inodes)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    out = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        count = 0
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    count += os.readlink(fd) in inodes
        out[pid] = count
    return out


def scaling_settings(opts: StackOptions, folder: Path, frontends: int, input_size: int) -> Path:
    """The serving-path bench's cheap classifier, at `frontends` frontend processes."""
    path = cheap_settings(task_named("classification"), opts, folder / f"n{frontends}")
    settings = json.loads(path.read_text())
    settings["server_config"]["frontend_processes"] = frontends
    for section in settings["models"].values():
        section["input_size"] = input_size
    path.write_text(json.dumps(settings))
    return path


def listeners(port: int) -> int:
    """Listening TCP sockets on `port` (/proc/net/tcp): one per frontend once each is up, as health
    answers SERVING when the first one is."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def frontend_counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(x) for x in text.split(",") if x.strip())
    if not counts or min(counts) < 1 or counts[0] != 1:
        raise argparse.ArgumentTypeError("frontend counts: a comma list starting at 1, e.g. 1,2 or 1,2,4,8")
    return counts


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """req/s, client CPU and server CPU per request at each frontend count, in rotating rounds (`args`: images,
    seconds, rounds, device and the --frontend-* options)."""
    import grpc

    counts: tuple[int, ...] = args.frontend_counts
    device = getattr(args, "device", "cpu")
    channels_per_service = scaling_channels(args)
    # one forward at a time: the executor is not what is measured
    opts = StackOptions(model_instances=1, device=device)
    task = task_named("classification")
    pngs = nih_pngs(args.images)
    servers, calls, channels = {}, {}, []
    loads = [os.getloadavg()[0]]
    pick_how = getattr(args, "frontend_pick", "least")
    client_processes = getattr(args, "frontend_client_processes", 1)
    problem = client_processes_problem(args)
    if problem:
        raise ValueError(problem)
    pool: ClientPool | None = None
    keys = ("req_per_s", "client_cores", "server_cpu_ms", "c_ms", "c_workers_ms", "e_ms", "f_ms", "cores_used")
    keys += ("connections_per_frontend", "client_workers", "executor_threads")
    rows: dict[int, dict[str, list[Any]]] = {n: {k: [] for k in keys} for n in counts}
    codes: dict[int, dict[str, int]] = {n: {} for n in counts}
    policies: dict[str, dict[str, int]] = {}
    try:
        for n in counts:
            port = free_port()
            config = scaling_settings(opts, tmp / "frontends", n, args.frontend_input_size)
            svc = service_process(task, config, port)
            servers[n] = (svc, port)
        for n, (svc, port) in servers.items():
            await svc.wait_ready(lambda port=port: grpc_serving(port))
            deadline = time.monotonic() + 120
            while listeners(port) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if client_processes > 1:
                continue  # the pool's workers hold the connections
            chans = [
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(channels_per_service)
            ]
            channels.extend(chans)
            calls[n] = call = picked_call(chans, task, pngs, pick_how)
            await drive_closed(call, args.frontend_concurrency, Recorder(), max_requests=4 * args.frontend_concurrency,
                               max_seconds=args.seconds)  # fmt: skip
        if client_processes > 1:
            targets = {n: port for n, (_, port) in servers.items()}
            pool = await asyncio.to_thread(
                ClientPool, client_processes, targets, channels_per_service, images=args.images, pick=pick_how
            )
            for n in counts:  # the same warm-up as one client's
                await pool.run(n, args.frontend_concurrency, max_requests=4 * args.frontend_concurrency,
                               max_seconds=args.seconds)  # fmt: skip
        for r in range(args.rounds):
            order = list(counts[r % len(counts) :] + counts[: r % len(counts)])
            for n in order:
                for other, (svc, _) in servers.items():
                    (svc.resume if other == n else svc.pause)()
                svc, port = servers[n]
                assert svc.proc is not None
                parent = svc.proc.pid
                server_before, exec_before = tree_cpu_s([parent]), stat_cpu_s(parent)
                threads_before = thread_cpu_s([parent])
                client_before = own_cpu_s()
                if pool is None:
                    rec = Recorder()
                    wall = await drive_closed(
                        calls[n], args.frontend_concurrency, rec, max_requests=args.frontend_requests,
                        max_seconds=args.seconds,
                    )  # fmt: skip
                    done, cell_codes, workers_s, worker_cells = len(rec.ok), rec.codes(), 0.0, []
                else:
                    cell = await pool.run(n, args.frontend_concurrency, max_requests=args.frontend_requests,
                                          max_seconds=args.seconds)  # fmt: skip
                    wall, done, cell_codes, workers_s = cell.wall_s, cell.ok, cell.codes, cell.client_cpu_s
                    worker_cells = [list(w) for w in zip(cell.per_worker_ok, cell.per_worker_s, strict=True)]
                client_s = own_cpu_s() - client_before + workers_s
                server_s, exec_s = tree_cpu_s([parent]) - server_before, stat_cpu_s(parent) - exec_before
                spent: dict[tuple[int, int], tuple[str, float]] = {}
                add_thread_cpu(spent, threads_before, thread_cpu_s([parent]))
                per_req = 1000 / max(done, 1)
                if n == 1:  # one process: the frontend and the executor are the same
                    exec_s = 0.0
                kids = [p for p in process_tree(parent) if p != parent] if n > 1 else [parent]
                rows[n]["req_per_s"].append(round(done / wall, 2))
                rows[n]["client_cores"].append(round(client_s / wall, 3))
                rows[n]["server_cpu_ms"].append(round(server_s * per_req, 3))
                rows[n]["c_ms"].append(round(client_s * per_req, 3))
                rows[n]["c_workers_ms"].append(round(workers_s * per_req, 3))  # of c: the load-generator processes
                rows[n]["e_ms"].append(round(exec_s * per_req, 3))
                rows[n]["f_ms"].append(round((server_s - exec_s) * per_req, 3))
                rows[n]["cores_used"].append(round((server_s + client_s) / wall, 3))  # client and server together
                rows[n]["connections_per_frontend"].append(sorted(connections_by_process(port, kids).values()))
                rows[n]["client_workers"].append(worker_cells)  # [answers, seconds] of each load-generator process
                rows[n]["executor_threads"].append(busiest_threads(spent, done, wall, top=3))  # N=1: the one process
                for code, k in cell_codes.items():
                    codes[n][code] = codes[n].get(code, 0) + k
                loads.append(os.getloadavg()[0])
                row, spent_top = rows[n], rows[n]["executor_threads"][-1]
                print(
                    f"   frontends N={n} round {r}: {row['req_per_s'][-1]} req/s, cores {row['cores_used'][-1]};"
                    f" ms CPU/req c {row['c_ms'][-1]} e {row['e_ms'][-1]} f {row['f_ms'][-1]};"
                    f" connections {row['connections_per_frontend'][-1]}; load {loads[-1]:.2f};"
                    f" executor's busiest threads {[(t['thread'], t['core_share']) for t in spent_top]}",
                    flush=True,
                )
        policies = {str(n): svc.thread_policies() for n, (svc, _) in servers.items()}
    finally:
        if pool is not None:
            pool.close()
        for ch in channels:
            await ch.close()
        for svc, _ in servers.values():
            svc.stop()
    base = statistics.mean(rows[counts[0]]["req_per_s"])
    used_n1 = statistics.mean(rows[counts[0]]["cores_used"])
    out: dict[str, Any] = {
        "model": f"timm mobilenetv3_small_050 @{args.frontend_input_size}",
        "concurrency": args.frontend_concurrency,
        "channels": channels_per_service,
        "channel_pick": pick_how,
        "client": "grpc.aio, generic unary calls of pre-serialised request bytes, responses parsed",
        "client_processes": client_processes,
        "device": device,
        "load_average_1m": {"min": min(loads), "max": max(loads), "mean": round(statistics.mean(loads), 2)},
        "server_thread_policies": policies,  # each service's threads per CPU scheduling policy, after the rounds
        # the most any N could reach over N=1 at N=1's CPU per request (client's included): the cores this
        # process may run on over the cores N=1 and the client used
        "cores_bound_over_n1": round(len(os.sched_getaffinity(0)) / used_n1, 3) if used_n1 else None,
        "by_frontends": {},
    }
    for n in counts:
        mean = statistics.mean(rows[n]["req_per_s"])
        paired = [round(a / b, 3) for a, b in zip(rows[n]["req_per_s"], rows[counts[0]]["req_per_s"], strict=True) if b]
        out["by_frontends"][str(n)] = {
            **rows[n],
            "codes": codes[n],
            "req_per_s_mean": round(mean, 2),
            "over_n1": round(mean / base, 3) if base else None,
            "over_n1_by_round": paired,
            "over_n1_per_frontend": round(mean / base / n, 3) if base else None,
            "c_e_f_ms_mean": [round(statistics.mean(rows[n][k]), 3) for k in ("c_ms", "e_ms", "f_ms")],
        }
    if device.startswith("cuda"):
        out["target_per_frontend"] = TARGET_PER_FRONTEND_GPU
        out["met"] = all(
            (row["over_n1_per_frontend"] or 0) >= TARGET_PER_FRONTEND_GPU for row in out["by_frontends"].values()
        )
    elif 2 in counts:
        ratio = out["by_frontends"]["2"]["over_n1"]
        out["target_n2_over_n1"] = TARGET_RATIO
        out["met"] = ratio is not None and ratio >= TARGET_RATIO
    return out


def scaling_channels(args: argparse.Namespace) -> int:
    """Client connections per service: --frontend-channels, or one per caller, at least 8 and 4 per frontend."""
    counts = args.frontend_counts
    return getattr(args, "frontend_channels", None) or max(MIN_CHANNELS, 4 * max(counts), args.frontend_concurrency)


def client_processes_problem(args: argparse.Namespace) -> str:
    """Why --frontend-client-processes cannot split these callers and connections ('' when it can)."""
    k, channels = getattr(args, "frontend_client_processes", 1), scaling_channels(args)
    if 1 <= k <= min(args.frontend_concurrency, channels):
        return ""
    return (
        f"--frontend-client-processes {k}: between 1 and the callers ({args.frontend_concurrency}) "
        f"and connections ({channels}) it splits"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--frontend-concurrency", type=int, default=32, help="closed-loop callers of the scaling cells")
    ap.add_argument("--frontend-requests", type=int, help="max requests per scaling cell (600; quick 120); 0: none")
    ap.add_argument("--frontend-input-size", type=int, default=64, help="the cheap classifier's input size")
    ap.add_argument(
        "--frontend-channels", type=int,
        help="client connections per service (default: one per caller, at least 8 and 4 per frontend)",
    )  # fmt: skip
    ap.add_argument(
        "--frontend-pick", choices=PICKS, default="least",
        help="channel of each call: fewest calls in flight (default) or call i on channel i mod channels",
    )  # fmt: skip
    ap.add_argument(
        "--frontend-client-processes", type=_positive, default=1,
        help="load-generator processes of the scaling cells, callers and connections split over them (default 1): "
        "for a host where one asyncio client could be what bounds the rate",
    )  # fmt: skip
    ap.add_argument(
        "--frontend-counts", type=frontend_counts, default=(1, 2),
        help="frontend_processes values measured in turn, starting at 1 (default 1,2; a 16-core GPU host: 1,2,4,8)",
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="rounds per frontend count, taken in turn (6; quick 2)")
    ap.add_argument("--seconds", type=float, help="max seconds per cell (15; quick 5)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the executor runs the cheap model")
    ap.add_argument("--out", type=Path)
    add_arguments(ap)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 6)  # a shared host: single rounds vary widely
    args.seconds = args.seconds or (5.0 if args.quick else 15.0)
    args.frontend_requests = args.frontend_requests or (120 if args.quick else 600)
    if problem := client_processes_problem(args):
        ap.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    data = {
        "quick": args.quick,
        "machine": machine(),
        "note": f"{len(os.sched_getaffinity(0))} cores, the client on the servers' cores (see the load averages)",
        "scaling": result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result["by_frontends"], indent=1), flush=True)
    write_result("frontends-quick" if args.quick else "frontends", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
