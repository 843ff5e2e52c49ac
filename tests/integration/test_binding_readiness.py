"""A binding's own readiness (the DICOM node's workers, say) reaches gRPC health without a model changing state."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_serving.server import READINESS_POLL_S
from tests.support.servers import make_settings, running_server
from tests.support.toy_service import build_toy


async def _status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


async def _wait_for(port: int, status: int, within_s: float) -> float:
    start = time.monotonic()
    while await _status(port) != status:
        assert time.monotonic() - start < within_s, f"health did not become {status} within {within_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_a_binding_readiness_change_flips_health_both_ways_within_the_poll_interval():
    ready = {"ok": True}
    settings = make_settings()
    binding = dataclasses.replace(build_toy(settings), readiness=lambda: ready["ok"])
    async with running_server(settings, binding) as server:
        assert await _status(server.port) == health_pb2.HealthCheckResponse.SERVING
        ready["ok"] = False  # e.g. a worker task died: nothing else tells the server
        await _wait_for(server.port, health_pb2.HealthCheckResponse.NOT_SERVING, READINESS_POLL_S + 3)
        ready["ok"] = True
        await _wait_for(server.port, health_pb2.HealthCheckResponse.SERVING, READINESS_POLL_S + 3)
