"""The shared runtime end to end: a real grpc.aio server on port 0 with a trivial model."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from tests.support.concurrency import PeakGauge
from tests.support.frontends import total, wait_metric
from tests.support.paths import REPO
from tests.support.servers import TEST_KEY, auth, free_port, make_settings, running_server
from tests.support.toy_service import SERVICE, BrightnessModel, ToyGate, build_toy


def channel(server):
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


async def health_status(ch, service=""):
    stub = health_pb2_grpc.HealthStub(ch)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_not_serving_until_model_loaded():
    s = make_settings()
    binding = build_toy(s, BrightnessModel(load_delay_s=1.0))
    async with running_server(s, binding, wait_ready=False) as server, channel(server) as ch:
        assert await health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_status(ch, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.ClassificationServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.Image(data=b"x" * 10)), metadata=auth())
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
        await server.wait_until_ready(10)
        await asyncio.sleep(0.05)
        assert await health_status(ch) == health_pb2.HealthCheckResponse.SERVING


async def test_failed_load_stays_not_serving_and_reports_why():
    s = make_settings()
    async with running_server(s, build_toy(s, BrightnessModel(fail_load=True))) as server, channel(server) as ch:
        assert await health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        models = await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth())
        assert models.models[0].state == common_pb2.MODEL_STATE_FAILED
        assert "checkpoint corrupt" in models.models[0].error


async def test_classify_and_metrics_scrape(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        call = stub.ClassifyImage(
            pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png, content_type="image/png")),
            metadata=(*auth(), ("x-correlation-id", "abc-123")),
        )
        resp = await call
        md = dict(await call.initial_metadata())
        assert md["x-correlation-id"] == "abc-123"
        assert resp.untrained and resp.predictions[0].model.version == "untrained"
        assert 0 < resp.predictions[0].findings[0].probability < 1
        assert resp.image.width == 512
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()
        for needle in (
            'cxr_inference_total{model="toy"}',
            'cxr_model_loaded{model="toy"} 1.0',
            "cxr_gpu_memory_used_bytes",
            "cxr_inference_duration_seconds_bucket",
            "cxr_batch_size_bucket",
            "cxr_queue_depth",
            'cxr_grpc_requests_total{code="OK",method="/cxr.classification.v1.ClassificationService/ClassifyImage"}',
        ):
            assert needle in body, needle


async def test_api_key_required_everywhere_but_health(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        req = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png))
        for md, reason in ((None, "API_KEY_MISSING"), (auth("wrong-key"), "API_KEY_INVALID")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ClassifyImage(req, metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            st = rpc_status.from_call(err.value)
            assert error_info(st).reason == reason
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListModels(pb.ListModelsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # reflection is not exempt
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health is exempt so that kubelet gRPC probes work
        assert await health_status(ch) == health_pb2.HealthCheckResponse.SERVING
        await stub.ClassifyImage(req, metadata=(("apikey", TEST_KEY),))  # Kong's header name works too


async def test_reflection_lists_services():
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        names = []
        async for resp in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=auth()
        ):
            names = [svc.name for svc in resp.list_services_response.service]
        assert SERVICE in names and "grpc.health.v1.Health" in names


async def test_error_map(sample_png):
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        cases = [
            (
                pb.ClassifyImageRequest(image=common_pb2.Image(data=b"not an image")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "IMAGE_FORMAT_UNKNOWN",
            ),
            (
                pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png), model_names=["bad"]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_INPUT",
            ),
            (
                pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png), model_names=["explode"]),
                grpc.StatusCode.INTERNAL,
                "INTERNAL",
            ),
        ]
        for req, code, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ClassifyImage(req, metadata=auth())
            assert err.value.code() == code
            assert error_info(rpc_status.from_call(err.value)).reason == reason
            assert "secret internal detail" not in (err.value.details() or "")
        # still serving afterwards
        await stub.ClassifyImage(pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png)), metadata=auth())


async def test_api_key_rotation_from_file_without_restart(tmp_path, sample_png):
    key_file = tmp_path / "keys"
    key_file.write_text("old-key\n")
    s = make_settings(security__api_keys=[], security__api_key_file=str(key_file))
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        await stub.ListModels(pb.ListModelsRequest(), metadata=auth("old-key"))
        key_file.write_text("new-key\n")
        os.utime(key_file, (time.time() + 5, time.time() + 5))
        await asyncio.sleep(1.1)
        await stub.ListModels(pb.ListModelsRequest(), metadata=auth("new-key"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListModels(pb.ListModelsRequest(), metadata=auth("old-key"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _wait_serving(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError("toy server did not become SERVING")


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(sample_png, tmp_path):
    port, metrics_port = free_port(), free_port()
    gate = ToyGate(tmp_path)
    env = {
        **os.environ,
        "TOY_DELAY_S": "1.0",
        "TOY_GATE_DIR": str(gate.dir),
        "CXR_API_KEY": TEST_KEY,
        "CXR_SERVICES__CLASSIFICATION__PORT": str(port),
        "CXR_SERVICES__CLASSIFICATION__HOST": "127.0.0.1",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": str(metrics_port),
        "CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "1",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.toy_service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            req = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png))
            futures = [stub.ClassifyImage.future(req, metadata=auth(), timeout=30) for _ in range(3)]
            assert gate.wait_entered() == 1  # the first is on the model, held
            depth = wait_metric(metrics_port, "cxr_queue_depth", 2, timeout=30, model="toy")
            assert total(depth, "cxr_queue_depth", model="toy") == 2  # the other two wait behind it
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the drain's 0.5 s to begin while the forward is held
            gate.release()
            results = [f.result() for f in futures]  # none fails
            assert all(r.predictions for r in results)
            with pytest.raises(grpc.RpcError):  # after the drain nothing new is accepted
                stub.ClassifyImage(req, metadata=auth(), timeout=5)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        order = [out.index(s) for s in ("NOT_SERVING (shutting down)", "draining", "classification stopped")]
        assert order == sorted(order), out
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_grpcurl_lists_services_through_reflection():
    grpcurl = os.path.join(os.path.dirname(sys.executable), "grpcurl")
    s = make_settings()
    async with running_server(s, build_toy(s)) as server:
        addr = f"127.0.0.1:{server.port}"
        proc = await asyncio.create_subprocess_exec(
            grpcurl,
            "-plaintext",
            "-H",
            f"x-api-key: {TEST_KEY}",
            addr,
            "list",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        listed = out.decode().split()
        assert SERVICE in listed and "grpc.health.v1.Health" in listed
        proc = await asyncio.create_subprocess_exec(
            grpcurl, "-plaintext", addr, "list", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0 and b"Unauthenticated" in err


class OverlapModel(BrightnessModel):
    """Counts forwards running at the same time."""

    def __init__(self, delay_s: float, meet: int = 1) -> None:
        super().__init__(delay_s=delay_s)
        self.gauge = PeakGauge(meet)

    def predict(self, batch):
        with self.gauge.running():
            return super().predict(batch)


@pytest.mark.parametrize("instances", [1, 2])
async def test_model_instances_setting_runs_that_many_batches_at_once(sample_png, instances):
    from cxr_serving.settings import load_settings

    s = load_settings(
        None,
        environ={
            "CXR_API_KEY": TEST_KEY,
            "CXR_SERVER_CONFIG__MODEL_INSTANCES": str(instances),
            "CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "1",
        },
    )
    model = OverlapModel(delay_s=0.15, meet=instances)
    async with running_server(s, build_toy(s, model)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        req = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png, content_type="image/png"))
        replies = await asyncio.gather(*(stub.ClassifyImage(req, metadata=auth(), timeout=30) for _ in range(6)))
    assert len(replies) == 6 and model.batches == [1] * 6
    assert model.gauge.peak == instances


async def test_a_lone_request_does_not_wait_out_the_batch_delay(sample_png):
    """The servicer announces each request before decoding, so the batcher never waits
    max_batch_delay_ms for requests that do not exist; concurrent ones still share a batch."""
    s = make_settings(server_config__max_batch_delay_ms=5000, server_config__max_batch_size=8)
    model = BrightnessModel()
    async with running_server(s, build_toy(s, model)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        req = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png, content_type="image/png"))
        await stub.ClassifyImage(req, metadata=auth(), timeout=30)  # warm
        t0 = time.perf_counter()
        await stub.ClassifyImage(req, metadata=auth(), timeout=30)
        assert time.perf_counter() - t0 < 2.5  # not the 5 s delay
        model.batches.clear()
        await asyncio.gather(*(stub.ClassifyImage(req, metadata=auth(), timeout=30) for _ in range(4)))
        assert sum(model.batches) == 4 and max(model.batches) > 1, model.batches
