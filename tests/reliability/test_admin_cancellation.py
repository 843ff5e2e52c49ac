"""A LoadModel/UnloadModel whose caller goes away (deadline) still completes or cleans up, at the RPC
level on the toy service (aio clients on the server's own loop), and shutdown drains all models at once:

- in-place LoadModel with a deadline shorter than the load: DEADLINE_EXCEEDED to the caller, then
  the model is READY and health SERVING within 15 s (not stuck LOADING / NOT_SERVING);
- UnloadModel with a deadline shorter than the drain of a running forward (process instances): the
  model ends UNLOADED, health NOT_SERVING, and its worker process is gone within 15 s;
- three swapping LoadModels cut off by their deadline (process instances, model_instances=2): they
  run one after another (never more than 4 instance processes), and once a LoadModel without
  deadline returns, exactly 2 instance processes exist, and they answer;
- `ModelRepository.close` with two models each in a blocked forward returns after ~1 drain grace.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.lifecycle import BatchingConfig, ModelRepository
from tests.support.servers import auth, make_settings, running_server
from tests.support.targets import IMG
from tests.support.toy_service import BrightnessModel, build_toy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def instance_processes() -> int:
    """Live model instance processes under this test process (`python -m cxr_serving.instances`)."""
    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "cxr_serving.instances" in child.cmdline():
                n += 1
        except psutil.NoSuchProcess:
            pass
    return n


async def toy_state(stub) -> int:
    return (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models[0].state


async def health(ch) -> int:
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status


async def until(predicate, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return await predicate()


async def test_an_in_place_load_whose_caller_times_out_still_ends_ready():
    s = make_settings()
    async with running_server(s, build_toy(s, BrightnessModel(load_delay_s=2.0))) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            assert await until(lambda: _is(stub, common_pb2.MODEL_STATE_READY), 15)
            await stub.UnloadModel(pb.UnloadModelRequest(model_name="toy"), metadata=auth(), timeout=15)
            assert await toy_state(stub) == common_pb2.MODEL_STATE_UNLOADED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=auth(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await until(lambda: _is(stub, common_pb2.MODEL_STATE_READY), 15), await toy_state(stub)
            assert await health(ch) == SERVING
            req = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))
            assert (await stub.ClassifyImage(req, metadata=auth(), timeout=15)).predictions


async def _is(stub, state: int) -> bool:
    return await toy_state(stub) == state


async def test_an_unload_whose_caller_times_out_still_stops_the_worker():
    s = make_settings(server_config__model_instance_mode="process", server_config__model_instances=1)
    async with running_server(s, build_toy(s, BrightnessModel(delay_s=3.0))) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            assert await until(lambda: _is(stub, common_pb2.MODEL_STATE_READY), 30)
            assert instance_processes() == 1
            req = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))
            forward = asyncio.ensure_future(stub.ClassifyImage(req, metadata=auth(), timeout=20))
            await asyncio.sleep(1.0)  # the 3 s forward runs in the worker
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UnloadModel(pb.UnloadModelRequest(model_name="toy"), metadata=auth(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await forward).predictions  # the drain let the running forward finish

            async def freed() -> bool:
                return instance_processes() == 0 and await _is(stub, common_pb2.MODEL_STATE_UNLOADED)

            assert await until(freed, 15), (instance_processes(), await toy_state(stub))
            assert await health(ch) == NOT_SERVING


async def test_cancelled_swaps_leave_exactly_model_instances_processes():
    s = make_settings(server_config__model_instance_mode="process", server_config__model_instances=2)
    async with running_server(s, build_toy(s, BrightnessModel(load_delay_s=2.0))) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            assert await until(lambda: _is(stub, common_pb2.MODEL_STATE_READY), 30)
            assert instance_processes() == 2
            peak, stop = [0], asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], instance_processes())
                    await asyncio.sleep(0.05)

            sampler = asyncio.ensure_future(sample())
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=auth(), timeout=0.5)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # queued behind the three on the model's lock: when it returns, they have finished
            await stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=auth(), timeout=60)
            await asyncio.sleep(1.0)  # a leaked start would still be spawning
            stop.set()
            await sampler
            assert instance_processes() == 2
            assert peak[0] <= 4, peak[0]  # one swap at a time: the 2 serving + the 2 loading
            assert await toy_state(stub) == common_pb2.MODEL_STATE_READY and await health(ch) == SERVING
            req = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))
            assert (await stub.ClassifyImage(req, metadata=auth(), timeout=15)).predictions


async def test_close_drains_all_models_within_one_grace():
    """Three models whose forwards outlast the grace: one grace for all takes ~1 s, one each would take >= 3 s and
    waiting for the forwards >= 4 s; the upper bound leaves 1.5 s for a stalled loop on a loaded host."""
    grace = 1.0
    repo = ModelRepository(BatchingConfig(max_batch_delay_ms=1, drain_grace_s=grace))
    models = []
    started: list[float] = []
    for name in ("a", "b", "c"):
        m = BrightnessModel(delay_s=4.0)
        m.name = name
        forward = m.predict

        def timed(batch, forward=forward):
            started.append(time.monotonic())
            return forward(batch)

        m.predict = timed
        repo.add(m)
        models.append(m)
    await repo.load_all()
    assert repo.ready
    calls = [asyncio.ensure_future(repo.predict(m.name, np.zeros((8, 8), np.float32))) for m in models]
    deadline = time.monotonic() + 10
    while not all(m.batches for m in models) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert all(m.batches for m in models)  # every forward runs (4 s each)
    t0 = time.monotonic()
    # the three run at once, and each has >= 3 s left when close starts: waiting for any of them would show
    assert len(started) == 3 and max(started) - min(started) < grace and t0 - min(started) < grace, (started, t0)
    await repo.close()
    took = time.monotonic() - t0
    await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(3.5)  # let the sleeping forwards end before the loop closes
    assert grace * 0.9 <= took < grace * 2.5, took
