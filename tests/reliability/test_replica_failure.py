"""kill -9 of one of two replicas behind the gateway (the Kong stand-in, configured from
gateway/kong.yml with its own retry and health-check settings: `retries: 2`, active checks
every 2 s while unhealthy / 5 s while healthy, passive `tcp_failures: 3`).

A hard kill gives no NOT_SERVING, no drain: calls in flight on the killed replica and calls
routed to it before the gateway notices are at risk. The gateway retries connection failures on
the next target; clients add the published retry policy (UNAVAILABLE). We measure the failed
requests for clients with and without the policy and bound them; the killed replica is then
restarted and takes traffic again."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import grpc
import pytest

from cxr_client.retry_policy import channel_options
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from tests.support.load import Outcomes
from tests.support.results import report
from tests.support.servers import auth, free_port
from tests.support.service_process import service_process
from tests.support.targets import IMG

gateway_helpers = pytest.importorskip("tests.support.gateway_helpers")
kong_model = pytest.importorskip("cxr_gateway.kong_model")

ENV = {"TOY_DELAY_S": "0.02", "CXR_LOG_LEVEL": "WARNING"}
REQUEST = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))


def gateway_backends(status_port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=5) as r:
        return json.loads(r.read())["backends"]["classification"]


async def steady(stub, out: Outcomes, stop: asyncio.Event, max_s: float = 60) -> None:
    deadline = time.monotonic() + max_s
    while not stop.is_set() and time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            await stub.ClassifyImage(REQUEST, metadata=auth(), timeout=15)
            out.record(grpc.StatusCode.OK, time.perf_counter() - started)
        except grpc.aio.AioRpcError as err:
            out.record(err.code(), time.perf_counter() - started, err.details() or "")
        await asyncio.sleep(0.005)


@pytest.mark.slow
async def test_kill_9_of_one_replica_behind_the_gateway(tmp_path):
    port_a, port_b = free_port(), free_port()

    def two_replicas(kong) -> None:
        up = kong.upstream("classification.upstream")
        up.targets = [kong_model.Target(target=f"127.0.0.1:{port_a}"), kong_model.Target(target=f"127.0.0.1:{port_b}")]
        gateway_helpers.global_plugin(kong, "rate-limiting").config.minute = 10**7  # load test, not a limit test

    with (
        service_process(tmp_path, env=ENV, port=port_a) as a,
        service_process(tmp_path, env=ENV, port=port_b),
    ):
        async with gateway_helpers.running_gateway({"classification": port_a}, two_replicas) as gw:
            target = f"127.0.0.1:{gw.ports.grpc}"
            async with (
                grpc.aio.insecure_channel(target, options=channel_options()) as ch,
                grpc.aio.insecure_channel(target, options=channel_options(retries=False)) as bare_ch,
            ):
                with_policy, without_policy, stop = Outcomes(), Outcomes(), asyncio.Event()
                stub, bare = pb_grpc.ClassificationServiceStub(ch), pb_grpc.ClassificationServiceStub(bare_ch)
                tasks = [asyncio.ensure_future(steady(stub, with_policy, stop)) for _ in range(3)]
                tasks += [asyncio.ensure_future(steady(bare, without_policy, stop)) for _ in range(3)]
                await asyncio.sleep(1.5)
                ok_before = with_policy.codes["OK"]
                a.signal(signal.SIGKILL)
                a.wait_exit(10)
                killed_at = time.monotonic()
                await asyncio.sleep(6)  # covers the gateway's unhealthy detection (2 s interval x 2 failures)
                ok_after_kill = with_policy.codes["OK"] - ok_before
                with service_process(tmp_path, env=ENV, port=port_a) as a2:
                    restarted_at = time.monotonic()
                    await asyncio.sleep(7)  # healthy interval 5 s: the gateway brings A back
                    stop.set()
                    await asyncio.gather(*tasks)
                    backends = await asyncio.to_thread(gateway_backends, gw.ports.status)
                    assert a2.proc.poll() is None

    numbers = {
        "gateway_settings": "kong.yml: retries 2; active unhealthy interval 2 s / tcp_failures 2; healthy interval 5 s",
        "with_published_policy": {"requests": with_policy.total, "failed": with_policy.failed(),
                                  "codes": dict(with_policy.codes), "errors": with_policy.errors[:5]},
        "without_policy": {"requests": without_policy.total, "failed": without_policy.failed(),
                           "codes": dict(without_policy.codes), "errors": without_policy.errors[:5]},
        "ok_in_6s_after_kill_with_policy": ok_after_kill,
        "restart_to_end_s": round(time.monotonic() - restarted_at, 1),
        "kill_to_end_s": round(time.monotonic() - killed_at, 1),
        "gateway_backends_at_end": backends,
    }  # fmt: skip
    report("kill_9_behind_gateway", numbers)
    assert ok_after_kill > 50, numbers  # the surviving replica carried the load
    assert with_policy.failed() <= 3, numbers  # at most the calls in flight on the killed replica
    assert with_policy.failed(("OK", "UNAVAILABLE")) == 0, numbers  # a failure is UNAVAILABLE, nothing else
    assert all(b["healthy"] for b in backends) and len(backends) == 2, backends  # A is back in rotation
