"""Frontend scale-out (issue 23, item 2): req/s of the classification service with a cheap model (the
serving path dominates) at `server_config.frontend_processes` N=1 and N=2, side by side in one run.

Both services run at once; they are measured in turn (rotating rounds), the idle one stopped (SIGSTOP of
its process group) so it takes no CPU from the one measured. The client opens several channels, each its
own TCP connection, so the kernel spreads them over the frontends (SO_REUSEPORT); a single connection
would reach one frontend only. From /proc: the client's CPU (this process) and the server tree's CPU per
answered request. The load generator shares the host's cores with the servers: its CPU is reported.

    .venv/bin/python -m bench.frontends            # also a stage of `bench.stack`
    .venv/bin/python -m bench.frontends --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import Recorder, drive_closed, free_port, grpc_serving, machine, nih_pngs, tree_cpu_s, write_result
from bench._peers import StackOptions, grpc_call, service_process, task_named
from bench._serving_path import cheap_settings, own_cpu_s

TARGET_RATIO = 1.4  # N=2 over N=1 on this 2-core host (issue 23)
TARGET_PER_FRONTEND_GPU = 0.85  # on a 16-core GPU host: N frontends >= 0.85 N times one, up to N=8 (issue 23)
MIN_CHANNELS = 8  # connections per service (at least 4 per frontend): the kernel hashes each to one frontend


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
    channels_per_service = max(MIN_CHANNELS, 4 * max(counts))
    # one forward at a time: the executor is not what is measured
    opts = StackOptions(model_instances=1, device=device)
    task = task_named("classification")
    pngs = nih_pngs(args.images)
    servers, calls, channels = {}, {}, []
    loads = [os.getloadavg()[0]]
    rows: dict[int, dict[str, list[float]]] = {
        n: {"req_per_s": [], "client_cores": [], "server_cpu_ms": []} for n in counts
    }
    codes: dict[int, dict[str, int]] = {n: {} for n in counts}
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
            chans = [
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(channels_per_service)
            ]
            channels.extend(chans)
            per_channel = [grpc_call(ch, task, pngs) for ch in chans]

            async def call(i: int, per_channel: list[Any] = per_channel) -> object:
                return await per_channel[i % len(per_channel)](i // len(per_channel))

            calls[n] = call
            await drive_closed(call, args.frontend_concurrency, Recorder(), max_requests=4 * args.frontend_concurrency,
                               max_seconds=args.seconds)  # fmt: skip
        for r in range(args.rounds):
            order = list(counts[r % len(counts) :] + counts[: r % len(counts)])
            for n in order:
                for other, (svc, _) in servers.items():
                    (svc.resume if other == n else svc.pause)()
                svc, _ = servers[n]
                assert svc.proc is not None
                rec = Recorder()
                server_before, client_before = tree_cpu_s([svc.proc.pid]), own_cpu_s()
                wall = await drive_closed(calls[n], args.frontend_concurrency, rec,
                                          max_requests=args.frontend_requests, max_seconds=args.seconds)  # fmt: skip
                done = len(rec.ok)
                rows[n]["req_per_s"].append(round(done / wall, 2))
                rows[n]["client_cores"].append(round((own_cpu_s() - client_before) / wall, 3))
                rows[n]["server_cpu_ms"].append(
                    round(1000 * (tree_cpu_s([svc.proc.pid]) - server_before) / max(done, 1), 3)
                )
                for code, k in rec.codes().items():
                    codes[n][code] = codes[n].get(code, 0) + k
                loads.append(os.getloadavg()[0])
                print(
                    f"   frontends N={n} round {r}: {rows[n]['req_per_s'][-1]} req/s, client "
                    f"{rows[n]['client_cores'][-1]} cores, server {rows[n]['server_cpu_ms'][-1]} ms CPU/req",
                    flush=True,
                )
    finally:
        for ch in channels:
            await ch.close()
        for svc, _ in servers.values():
            svc.stop()
    base = statistics.mean(rows[counts[0]]["req_per_s"])
    out: dict[str, Any] = {
        "model": f"timm mobilenetv3_small_050 @{args.frontend_input_size}",
        "concurrency": args.frontend_concurrency,
        "channels": channels_per_service,
        "device": device,
        "load_average_1m": {"min": min(loads), "max": max(loads), "mean": round(statistics.mean(loads), 2)},
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--frontend-concurrency", type=int, default=32, help="closed-loop callers of the scaling cells")
    ap.add_argument("--frontend-requests", type=int, help="max requests per scaling cell (600; quick 120); 0: none")
    ap.add_argument("--frontend-input-size", type=int, default=64, help="the cheap classifier's input size")
    ap.add_argument(
        "--frontend-counts", type=frontend_counts, default=(1, 2),
        help="frontend_processes values measured in turn, starting at 1 (default 1,2; a 16-core GPU host: 1,2,4,8)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="rounds per frontend count, taken in turn (3; quick 2)")
    ap.add_argument("--seconds", type=float, help="max seconds per cell (15; quick 5)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the executor runs the cheap model")
    ap.add_argument("--out", type=Path)
    add_arguments(ap)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (5.0 if args.quick else 15.0)
    args.frontend_requests = args.frontend_requests or (120 if args.quick else 600)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    data = {
        "quick": args.quick,
        "machine": machine(),
        "note": "2-core host shared with other sessions; the client runs on the same cores as the servers",
        "scaling": result,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result["by_frontends"], indent=1), flush=True)
    write_result("frontends-quick" if args.quick else "frontends", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
