"""Performance regressions, caught by RATIO measured side by side, never by absolute time.

A small version of bench/stack.py and bench/openloop.py (densenet121 at 128 px, one torch thread):
the real classification service and the gateway in their own processes, the in-process batched
forward as the ceiling, everything on the same images in the same test. Thresholds are generous
(a loaded 2-core CI machine); the benchmark's targets are in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench._common import (
    ServerProcess,
    closed_loop,
    free_port,
    grpc_serving,
    http_ok,
    nih_pngs,
    open_loop,
)
from bench._peers import (
    ClassificationTask,
    StackOptions,
    gateway_process,
    grpc_call,
    http_call,
    service_process,
    write_settings,
)
from bench.stack import GRPC_OPTIONS, ceiling, set_torch_threads

pytestmark = pytest.mark.slow

TASK = ClassificationTask()
MAX_QUEUE = 8  # closed loop at concurrency 8 never sheds; the open-loop overload must


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.opts = StackOptions(input_size=128, max_batch_size=8, batch_delay_ms=2.0, max_queue_size=MAX_QUEUE)
        self.config = write_settings(TASK, self.opts, tmp)
        self.pngs = nih_pngs(8)
        self.port = free_port()
        self.service: ServerProcess | None = None
        self.gateway: ServerProcess | None = None
        self.tmp = tmp

    async def start(self) -> None:
        self.service = service_process(TASK, self.config, self.port)
        await self.service.wait_ready(lambda: grpc_serving(self.port), timeout=180)
        self.gateway, self.gw_ports = gateway_process({"classification": self.port}, self.tmp)
        await self.gateway.wait_ready(lambda: http_ok(f"http://127.0.0.1:{self.gw_ports.status}/status"), timeout=60)

    def stop(self) -> None:
        for proc in (self.gateway, self.service):
            if proc is not None:
                proc.stop()

    async def grpc(self, fn: Any) -> Any:
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_OPTIONS) as ch:
            return await fn(grpc_call(ch, TASK, self.pngs))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import torch

    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    saved_threads = torch.get_num_threads()
    set_torch_threads(1)  # as bench/stack.py: one intra-op thread everywhere (a busy 2-core host)
    s = Stack(tmp_path_factory.mktemp("perf"))
    try:
        asyncio.run(s.start())
        yield s
    finally:
        s.stop()
        torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_service_keeps_up_with_the_in_process_ceiling(stack: Stack) -> None:
    args = argparse.Namespace(max_batch_size=8, requests=64, seconds=6.0, device="cpu", quick=True, model_instances=1)
    ceil = ceiling(TASK, stack.config, stack.pngs, args)
    row = asyncio.run(stack.grpc(lambda call: closed_loop(call, 8, max_requests=96, max_seconds=8.0, warmup=1)))
    ratio = row["img_per_s"] / ceil["img_per_s"]
    print(json.dumps({"ceiling": ceil, "service_c8": row, "ratio": ratio}))
    assert row["codes"] == {"OK": row["requests"]}
    assert ratio >= 0.5, f"service/ceiling at concurrency 8 is {ratio:.2f} (bench target 0.9, CI floor 0.5)"


def test_gateway_adds_little_over_direct_grpc(stack: Stack) -> None:
    import aiohttp

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        body = [json.dumps(TASK.rest_body(p)).encode() for p in stack.pngs]
        url = f"http://127.0.0.1:{stack.gw_ports.rest}{TASK.rest_path}"
        direct = await stack.grpc(lambda call: closed_loop(call, 1, max_requests=30, max_seconds=5.0, warmup=2))
        async with aiohttp.ClientSession() as http:
            call = http_call(http, url, body)
            rest = await closed_loop(call, 1, max_requests=30, max_seconds=5.0, warmup=2)
        return direct, rest

    direct, rest = asyncio.run(both())
    print(json.dumps({"direct": direct, "gateway_rest": rest}))
    assert rest["codes"] == {"OK": rest["requests"]}
    # bench target: <= 3 ms added p50; CI floor: the gateway path is not grossly slower than the model path
    assert rest["p50_ms"] <= 1.5 * direct["p50_ms"] + 15, (direct["p50_ms"], rest["p50_ms"])


def test_overload_is_shed_fast_not_timed_out(stack: Stack) -> None:
    async def overload() -> dict[str, Any]:
        cap = await stack.grpc(lambda call: closed_loop(call, 8, max_requests=48, max_seconds=4.0))
        rate = max(10.0, 4 * cap["img_per_s"])
        return await stack.grpc(
            lambda call: open_loop(call, rate, max_requests=int(rate * 3), max_seconds=3.0, timeout=20.0)
        )

    r = asyncio.run(overload())
    print(json.dumps(r))
    assert r["shed"] > 0, r["codes"]
    assert r["codes"].get("TIMEOUT", 0) == 0, r["codes"]
    assert r["requests"] > 0, r["codes"]
    # a shed call comes back much faster than a served one waits
    assert r["time_to_shed_p50_ms"] <= 0.5 * r["p50_ms"], (r["time_to_shed_p50_ms"], r["p50_ms"])
