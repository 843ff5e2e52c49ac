"""Gateway overhead: the latency the Kong stand-in adds over calling the backend directly.

  make bench-gateway                  # bench/results/gateway.json
  .venv/bin/python -m bench.gateway --requests 300

One process: the toy classification service (tests/support/toy_service.py, a trivial model,
so the backend time is small and the gateway's share shows) and the stand-in, both in-process
on 127.0.0.1. Sequential calls (concurrency 1), the paths interleaved call by call, each case bounded by a
count AND a time limit:
  direct gRPC      -> backend
  gateway gRPC     -> stand-in gRPC proxy -> backend
  gateway REST     -> stand-in REST (JSON transcoding) -> backend
for ListModels (tiny messages) and ClassifyImage (one 1024x1024 NIH PNG, base64 in REST).
Reported: p50/p90/p99 per path and the added p50 (gateway - direct). This measures the
stand-in, not Kong: Kong's own overhead is typically lower (nginx/LuaJIT).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import grpc  # noqa: E402

from bench._common import paired_p50  # noqa: E402
from cxr_protos.classification.v1 import classification_service_pb2 as pb  # noqa: E402
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc  # noqa: E402
from cxr_protos.common.v1 import common_pb2  # noqa: E402
from tests.conftest import cxr14_images  # noqa: E402
from tests.support.gateway_helpers import running_gateway  # noqa: E402
from tests.support.servers import TEST_KEY, auth, make_settings, running_server  # noqa: E402
from tests.support.toy_service import build_toy  # noqa: E402


async def timed(
    paths: dict[str, Callable[[], Awaitable[Any]]], n: int, limit_s: float, warmup: int = 10
) -> dict[str, list[float]]:
    """Interleaved: each round calls every path once, so machine noise hits all paths alike."""
    for fn in paths.values():
        for _ in range(warmup):
            await fn()
    out: dict[str, list[float]] = {name: [] for name in paths}
    deadline = time.monotonic() + limit_s
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        for name, fn in paths.items():
            t0 = time.perf_counter()
            await fn()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100) if len(ms) >= 2 else [ms[0]] * 99
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(q[89], 3),
        "p99_ms": round(q[98], 3),
    }


async def run(n: int, limit_s: float) -> dict[str, Any]:
    png = cxr14_images(1)[0].read_bytes()
    s = make_settings(monitoring__enable_metrics=False)
    results: dict[str, Any] = {}
    async with running_server(s, build_toy(s)) as be, running_gateway({"classification": be.port}) as gw:
        # no rate limit in the way of the loop
        gw.policies.rate_limiter = lambda hit: None  # type: ignore[method-assign]
        direct = grpc.aio.insecure_channel(f"127.0.0.1:{be.port}")
        proxied = grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}")
        d_stub, p_stub = pb_grpc.ClassificationServiceStub(direct), pb_grpc.ClassificationServiceStub(proxied)
        base = f"http://127.0.0.1:{gw.ports.rest}"
        req = pb.ClassifyImageRequest(image=common_pb2.Image(data=png, content_type="image/png"))
        body = json.dumps({"image": {"data": base64.b64encode(png).decode(), "contentType": "image/png"}})
        headers = {"apikey": TEST_KEY, "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as http:

            async def rest_get() -> None:
                async with http.get(f"{base}/v1/classification/models", headers=headers) as r:
                    assert r.status == 200
                    await r.read()

            async def rest_classify() -> None:
                async with http.post(f"{base}/v1/classification:classifyImage", data=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

            cases: dict[str, dict[str, Callable[[], Awaitable[Any]]]] = {
                "list_models": {
                    "direct_grpc": lambda: d_stub.ListModels(pb.ListModelsRequest(), metadata=auth()),
                    "gateway_grpc": lambda: p_stub.ListModels(pb.ListModelsRequest(), metadata=auth()),
                    "gateway_rest": rest_get,
                },
                "classify_image": {
                    "direct_grpc": lambda: d_stub.ClassifyImage(req, metadata=auth()),
                    "gateway_grpc": lambda: p_stub.ClassifyImage(req, metadata=auth()),
                    "gateway_rest": rest_classify,
                },
            }
            for case, paths in cases.items():
                calls = await timed(paths, n, limit_s)
                res: dict[str, Any] = {name: summary(ms) for name, ms in calls.items()}
                d = res["direct_grpc"]["p50_ms"]
                res["added_p50_ms"] = {
                    "gateway_grpc": round(res["gateway_grpc"]["p50_ms"] - d, 3),
                    "gateway_rest": round(res["gateway_rest"]["p50_ms"] - d, 3),
                }
                res["added_paired_p50_ms"] = {  # round by round: what varies between rounds cancels
                    k: paired_p50(calls["direct_grpc"], calls[k]) for k in ("gateway_grpc", "gateway_rest")
                }
                results[case] = res
                print(case, json.dumps(res), flush=True)
        await direct.close()
        await proxied.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="timed calls per path (after 10 warm-up calls)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per case at most")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gateway.json"))
    args = ap.parse_args()
    results = asyncio.run(run(args.requests, args.time_limit))
    out = {
        "benchmark": "gateway overhead (Kong stand-in) vs direct gRPC, sequential calls",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "requests_per_path": args.requests,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
