"""Priority and deadlines through gRPC (issue 26 item 5): a STAT request jumps a full routine queue, and
requests whose deadline passes in the queue are never run and are counted. Real servers on 127.0.0.1;
the forward is held by a gate (tests/support/gated_forward.py) so the queue fills behind it, and every
assertion counts what the model received, in order, never wall time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.images import decode_image
from cxr_serving.lifecycle import ServedModel
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings
from tests.support.gated_forward import GatedForward
from tests.support.paths import cxr14_images
from tests.support.servers import auth, make_settings, running_server
from tests.support.toy_service import BrightnessModel, build_toy

QUEUE = 4  # max_queue_size
BATCH = 2  # max_batch_size
ROUTINE_IMG, STAT_IMG = (p.read_bytes() for p in cxr14_images(2))


def _queue_settings(**extra: Any) -> Settings:
    return make_settings(
        server_config__max_batch_size=BATCH,
        server_config__max_queue_size=QUEUE,
        server_config__max_batch_delay_ms=0,
        **extra,
    )


def _toy() -> tuple[Settings, ServiceBinding, ServedModel, str, Callable[[bytes], Any]]:
    settings = _queue_settings()
    model = BrightnessModel()
    return settings, build_toy(settings, model), model, "toy", lambda data: float(np.mean(decode_image(data).pixels))


def _classification() -> tuple[Settings, ServiceBinding, ServedModel, str, Callable[[bytes], Any]]:
    from cxr_classification.service import build_binding

    models = {"binary_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": 64}}
    settings = _queue_settings(models=models, performance__warmup_batches=0)
    binding = build_binding(settings)
    model = binding.extra["servicer"].classifiers.models["binary_classifier"]
    return settings, binding, model, "binary_classifier", lambda data: _tensor_sum(model.preprocess(decode_image(data)))


def _tensor_sum(x: Any) -> float:
    return round(float(x.sum()), 3)


STACKS = {"toy": _toy, "classification": _classification}
FINGERPRINT = {"toy": lambda x: float(np.mean(x)), "classification": lambda x: _tensor_sum(x.image)}


def _request(data: bytes, model: str, priority: int = common_pb2.PRIORITY_UNSPECIFIED) -> pb.ClassifyImageRequest:
    image = common_pb2.Image(data=data, content_type="image/png")
    return pb.ClassifyImageRequest(image=image, model_names=[model], priority=priority)


async def _code(call: Any) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as err:
        return err.code().name


async def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_a_stat_request_jumps_a_full_routine_queue(stack):
    """One routine forward held; QUEUE routine requests fill the queue; a STAT one is still admitted (a
    fifth routine one is shed) and runs in the very next batch, before every queued routine request."""
    settings, binding, model, name, fingerprint_of = STACKS[stack]()
    gate = GatedForward(model, FINGERPRINT[stack])
    stat_print, routine_print = fingerprint_of(STAT_IMG), fingerprint_of(ROUTINE_IMG)
    assert stat_print != routine_print  # the STAT item is recognisable in the forwards
    depth = {"model": name}
    async with (
        running_server(settings, binding) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)

        def call(data: bytes, priority: int = common_pb2.PRIORITY_UNSPECIFIED) -> Any:
            return asyncio.ensure_future(
                _code(stub.ClassifyImage(_request(data, name, priority), metadata=auth(), timeout=60))
            )

        gate.arm()
        try:
            running = call(ROUTINE_IMG)
            await asyncio.to_thread(gate.entered.wait, 30)  # the first routine request is in the held forward
            queued = [call(ROUTINE_IMG, common_pb2.PRIORITY_ROUTINE) for _ in range(QUEUE)]
            await _until(lambda: _metric("cxr_queue_depth", depth) == QUEUE, "the routine requests to fill the queue")
            stat = call(STAT_IMG, common_pb2.PRIORITY_STAT)
            await _until(lambda: stat.done() or _metric("cxr_queue_depth", depth) == QUEUE + 1, "the STAT to queue")
            assert not stat.done(), stat.result()  # not shed (RESOURCE_EXHAUSTED) by the routine requests
            assert await call(ROUTINE_IMG) == "RESOURCE_EXHAUSTED"  # routine work is still shed at the bound
        finally:
            gate.release()
        codes = await asyncio.gather(running, stat, *queued)

    assert codes == ["OK"] * (QUEUE + 2), codes
    assert gate.batches[0] == [routine_print]  # the forward that was running
    assert gate.batches[1][0] == stat_print  # the next batch starts with the STAT request ...
    assert gate.items.count(stat_print) == 1 and gate.items.count(routine_print) == QUEUE + 1
    assert gate.items.index(stat_print) == 1  # ... so it ran before every queued routine request
    assert [len(b) for b in gate.batches] == [1, BATCH, BATCH, 1]  # STAT first, then routine fills the batch


@pytest.mark.parametrize("stack", sorted(STACKS))
async def test_expired_requests_are_never_run(stack):
    """Requests with a 1.5 s deadline (one of them STAT) queue behind a held forward; once their callers got
    DEADLINE_EXCEEDED the forward is released: the model never receives them, the expired counter rises by
    exactly their number, and a request with time left, queued behind them, runs."""
    settings, binding, model, name, fingerprint_of = STACKS[stack]()
    gate = GatedForward(model, FINGERPRINT[stack])
    short, long = fingerprint_of(STAT_IMG), fingerprint_of(ROUTINE_IMG)
    assert short != long
    expired = 3
    labels = {"model": name}
    before = _metric("cxr_requests_expired_in_queue_total", labels)
    async with (
        running_server(settings, binding) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.ClassificationServiceStub(ch)

        def call(data: bytes, timeout: float, priority: int = common_pb2.PRIORITY_UNSPECIFIED) -> Any:
            return asyncio.ensure_future(
                _code(stub.ClassifyImage(_request(data, name, priority), metadata=auth(), timeout=timeout))
            )

        gate.arm()
        try:
            running = call(ROUTINE_IMG, 60)
            await asyncio.to_thread(gate.entered.wait, 30)
            doomed = [call(STAT_IMG, 1.5) for _ in range(expired - 1)]
            doomed.append(call(STAT_IMG, 1.5, common_pb2.PRIORITY_STAT))
            await _until(lambda: _metric("cxr_queue_depth", labels) == expired, "the short-deadline requests to queue")
            doomed_codes = await asyncio.gather(*doomed)  # their deadline passes while the forward is held
            survivor = call(ROUTINE_IMG, 60)
            await _until(lambda: _metric("cxr_queue_depth", labels) == expired + 1, "the survivor to queue")
        finally:
            gate.release()
        codes = await asyncio.gather(running, survivor)

    assert doomed_codes == ["DEADLINE_EXCEEDED"] * expired, doomed_codes
    assert codes == ["OK", "OK"], codes
    assert gate.items == [long, long]  # the held request and the survivor; no expired request reached the model
    assert _metric("cxr_requests_expired_in_queue_total", labels) - before == expired
