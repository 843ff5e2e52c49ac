"""Graceful shutdown and rolling restart under steady load.

Two replicas of a real service process; clients use the retry policy we publish
(`cxr_client.retry_policy.SERVICE_CONFIG`: retries on UNAVAILABLE) plus round-robin with
client-side health checking (a NOT_SERVING replica is taken out of the pick list, which is
what a Kubernetes readiness probe does for a Service). Rolling restart: SIGTERM replica A,
start it again on the same port, then SIGTERM replica B. Promise: zero failed requests, and
each replica reports NOT_SERVING before it drains. A client without the policy is measured
for comparison."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_client.retry_policy import SERVICE_CONFIG
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from tests.support.load import Outcomes
from tests.support.results import report
from tests.support.servers import auth, free_port
from tests.support.service_process import service_process
from tests.support.targets import IMG

ENV = {
    "TOY_DELAY_S": "0.01",
    "CXR_SERVER_CONFIG__SHUTDOWN_DELAY_S": "1.0",  # keep accepting for 1 s after NOT_SERVING
    "CXR_SERVER_CONFIG__SHUTDOWN_GRACE_S": "10",
    "CXR_LOG_LEVEL": "INFO",
}
REQUEST = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))


def published_policy_with_balancing() -> str:
    config = {**SERVICE_CONFIG, "loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
    return json.dumps(config)


# A restarted replica comes back on the same address: cap the reconnect backoff (default up to
# 120 s) so the client sees it again within a second, as a Service's endpoint update would.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


def channel(ports: list[int], *, policy: bool) -> grpc.Channel:
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    if policy:
        config = published_policy_with_balancing()
        options = [("grpc.enable_retries", 1), ("grpc.service_config", config), *RECONNECT]
    else:
        config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        options = [("grpc.enable_retries", 0), ("grpc.service_config", config), *RECONNECT]
    return grpc.insecure_channel(target, options=options)


class SteadyLoad:
    """`workers` threads calling back to back on one channel until stopped (bounded by `max_s`)."""

    def __init__(self, ch: grpc.Channel, workers: int = 3, max_s: float = 90) -> None:
        self.stub = pb_grpc.ClassificationServiceStub(ch)
        self.out = Outcomes()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_s
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            started = time.perf_counter()
            try:
                self.stub.ClassifyImage(REQUEST, metadata=auth(), timeout=15)
                self.out.record(grpc.StatusCode.OK, time.perf_counter() - started)
            except grpc.RpcError as err:
                self.out.record(err.code(), time.perf_counter() - started, err.details() or "")
            time.sleep(0.005)

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def watch_health(port: int, seen: list[tuple[float, str]]) -> threading.Thread:
    """Record every health transition a replica streams (grpc.health.v1 Watch) until it goes away."""

    def run() -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                for resp in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    seen.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)))
        except grpc.RpcError:
            seen.append((time.monotonic(), "GONE"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_rolling_restart_under_load_loses_no_request(tmp_path):
    port_a, port_b = free_port(), free_port()
    with (
        service_process(tmp_path, env=ENV, port=port_a) as a,
        service_process(tmp_path, env=ENV, port=port_b) as b,
        channel([port_a, port_b], policy=True) as ch,
        channel([port_a, port_b], policy=False) as bare_ch,
    ):
        seen_a: list[tuple[float, str]] = []
        watcher = watch_health(port_a, seen_a)
        with SteadyLoad(ch) as load, SteadyLoad(bare_ch, workers=1) as bare:
            time.sleep(1.5)
            before = load.out.codes["OK"]
            t_term = time.monotonic()
            a.signal(signal.SIGTERM)
            assert a.wait_exit(30) == 0
            t_exit_a = time.monotonic()
            watcher.join(5)
            with service_process(tmp_path, env=ENV, port=port_a) as a2:  # A comes back on the same port
                time.sleep(2.5)  # readiness gate of a rolling update: the new replica is ready and seen
                b.signal(signal.SIGTERM)
                assert b.wait_exit(30) == 0
                time.sleep(1.5)  # A2 alone carries the load
                during = load.out.codes["OK"] - before
                load.__exit__()  # the last replica: stop the clients first, then it drains cleanly too
                bare.__exit__()
                a2.signal(signal.SIGTERM)
                assert a2.wait_exit(30) == 0
        logs = a.logs()

    states = [s for _, s in seen_a]
    numbers = {
        "with_published_policy": {"requests": load.out.total, "failed": load.out.failed(),
                                  "codes": dict(load.out.codes)},
        "without_policy": {"requests": bare.out.total, "failed": bare.out.failed(), "codes": dict(bare.out.codes)},
        "replica_a_health_stream": states,
        "replica_a_not_serving_to_exit_s": round(t_exit_a - t_term, 2),
        "requests_served_during_restart": during,
    }  # fmt: skip
    report("rolling_restart", numbers)
    assert load.out.failed() == 0, load.out.errors
    assert during > 20, numbers  # the load really went on through the restart
    assert states[:2] == ["SERVING", "NOT_SERVING"], states  # health went NOT_SERVING before the drain
    order = [logs.index(s) for s in ("received SIGTERM", "NOT_SERVING (shutting down)", "draining", "stopped")]
    assert order == sorted(order), logs[-2000:]


async def test_health_watchers_see_not_serving_and_do_not_hold_the_drain():
    """In process: a connected Watch stream sees NOT_SERVING, then ends; stop() takes the drain time,
    not the 10 s grace."""
    import asyncio

    from tests.support.servers import make_settings, running_server
    from tests.support.toy_service import build_toy

    settings = make_settings(server_config__shutdown_delay_s=0.3, server_config__shutdown_grace_s=10)
    seen: list[str] = []
    async with running_server(settings, build_toy(settings)) as server:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)

        async def read() -> None:
            async for resp in stream:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

        reader = asyncio.ensure_future(read())
        while not seen:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        await server.stop(grace=10)
        stop_s = time.monotonic() - started
        await asyncio.wait_for(reader, 5)
        await ch.close()
    assert seen == ["SERVING", "NOT_SERVING"], seen
    assert stop_s < 3, stop_s
