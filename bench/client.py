"""Client benchmark: what cxr_client adds on top of raw gRPC stubs, and analyze-study latency.

  make bench-client                      # bench/results/client.json
  .venv/bin/python -m bench.client --quick

Phases (every loop is bounded by a request count AND a time limit):
  1. overhead: the toy classification service (no model time) in-process on 127.0.0.1; the same
     images sent (a) with a raw grpc.aio stub, (b) with AsyncCxrClient.classify (path reading,
     content-type sniffing, API key, retry policy, error translation), (c) with
     batch_process_images (folder expansion, bounded concurrency, progress bar off). Images/s each,
     at concurrency 1 and 8.
  2. analyze (skipped with --quick): the three real services (untrained, CPU, small inputs, see
     tests/support/client_stack.py); analyze_study latency p50/p95 over N studies, and its parts
     (classify, segment, one literature search) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402

from cxr_client import AsyncCxrClient, ClientConfig, batch_process_images  # noqa: E402
from cxr_client.analyze import analyze_study  # noqa: E402
from cxr_protos.classification.v1 import classification_service_pb2 as pb  # noqa: E402
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc  # noqa: E402
from cxr_protos.common.v1 import common_pb2  # noqa: E402
from tests.conftest import cxr14_images  # noqa: E402
from tests.support.servers import TEST_KEY, make_settings, running_server  # noqa: E402
from tests.support.toy_service import build_toy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small and fast (CI smoke): phase 1 only")
    ap.add_argument("--requests", type=int, help="max requests per measurement (default 200, quick 24)")
    ap.add_argument("--seconds", type=float, help="max seconds per measurement (default 20, quick 3)")
    ap.add_argument("--studies", type=int, default=10, help="analyze_study runs in phase 2")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "client.json"))
    args = ap.parse_args(argv)
    args.requests = args.requests or (24 if args.quick else 200)
    args.seconds = args.seconds or (3.0 if args.quick else 20.0)
    return args


async def _bounded(concurrency: int, n: int, seconds: float, call: Any) -> dict[str, float]:
    """Run `call(i)` up to n times (or until `seconds`), `concurrency` at a time; images/s and p50 ms."""
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "images_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
    }


async def phase_overhead(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    images = sorted(folder.glob("*.png"))
    blobs = [p.read_bytes() for p in images]
    s = make_settings(**{"server_config__max_batch_delay_ms": 1})
    out: dict[str, Any] = {}
    async with running_server(s, build_toy(s)) as server:
        target = f"127.0.0.1:{server.port}"
        async with (
            grpc.aio.insecure_channel(target) as ch,
            AsyncCxrClient(ClientConfig(endpoint=target, api_key=TEST_KEY)) as client,
        ):
            stub = pb_grpc.ClassificationServiceStub(ch)
            md = (("x-api-key", TEST_KEY),)

            async def raw(i: int) -> None:
                img = common_pb2.Image(data=blobs[i % len(blobs)], content_type="image/png")
                await stub.ClassifyImage(pb.ClassifyImageRequest(image=img), metadata=md, timeout=30)

            async def typed(i: int) -> None:
                await client.classify(images[i % len(images)])

            await _bounded(4, 8, 5, raw)  # warm-up
            for conc in (1, 8):
                r = await _bounded(conc, args.requests, args.seconds, raw)
                c = await _bounded(conc, args.requests, args.seconds, typed)
                t0 = time.perf_counter()
                summary = await batch_process_images(
                    client, [folder] * max(1, args.requests // len(images)), concurrency=conc, progress=False
                )
                b = {
                    "requests": len(summary.results),
                    "images_per_s": round(len(summary.results) / (time.perf_counter() - t0), 1),
                    "failed": len(summary.failed),
                }
                out[f"concurrency_{conc}"] = {
                    "raw_stub": r,
                    "cxr_client": c,
                    "batch_process_images": b,
                    "client_vs_raw": round(c["images_per_s"] / r["images_per_s"], 3),
                }
                print(f"concurrency {conc}: raw {r} | client {c} | batch {b}", flush=True)
    return out


async def phase_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.client_stack import get_stack

    t0 = time.perf_counter()
    stack = get_stack("real")
    startup = time.perf_counter() - t0
    images = cxr14_images(8)
    async with AsyncCxrClient(stack.config()) as client:
        await analyze_study(client, images[0])  # warm-up
        parts: dict[str, list[float]] = {"analyze_study": [], "classify": [], "segment": [], "search_literature": []}
        deadline = time.perf_counter() + args.seconds * 3
        for i in range(args.studies):
            if time.perf_counter() > deadline:
                break
            img = images[i % len(images)]
            for name, coro in (
                ("analyze_study", lambda img=img: analyze_study(client, img)),
                ("classify", lambda img=img: client.classify(img)),
                ("segment", lambda img=img: client.segment(img, mask_encoding="none", include_overlay=True)),
                ("search_literature", lambda: client.search_literature("Effusion chest radiograph", top_k=3)),
            ):
                t = time.perf_counter()
                await coro()
                parts[name].append(time.perf_counter() - t)
    result: dict[str, Any] = {"stack_startup_s": round(startup, 1)}
    for name, lat in parts.items():
        lat.sort()
        result[name] = {
            "runs": len(lat),
            "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000, 1),
        }
    print("analyze:", result, flush=True)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for p in cxr14_images(8):
            (folder / p.name).write_bytes(p.read_bytes())
        result: dict[str, Any] = {"overhead": await phase_overhead(args, folder)}
    if not args.quick:
        result["analyze"] = await phase_analyze(args)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = {
        "benchmark": "client",
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        **asyncio.run(run(args)),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
