"""The classification requests, channels and checks that tests of frontend processes share: the CPU's
(tests/reliability/test_frontend_processes.py) and CUDA's (tests/gpu/test_frontends_gpu.py)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from cxr_classification.service import build_binding
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from tests.support.frontends import open_channel_on, total, wait_children, wait_metric
from tests.support.paths import cxr14_images
from tests.support.servers import auth, free_port, make_settings, running_server
from tests.support.service_process import ServiceProcess, service_process

SERVING = health_pb2.HealthCheckResponse.SERVING
CLASSIFY = "/cxr.classification.v1.ClassificationService/ClassifyImage"
IMAGES = [p.read_bytes() for p in cxr14_images(6)]


def request(i: int = 0) -> pb.ClassifyImageRequest:
    return pb.ClassifyImageRequest(image=common_pb2.Image(data=IMAGES[i % len(IMAGES)], content_type="image/png"))


def toy_env(metrics_port: int, delay_s: float, **extra: str) -> dict[str, str]:
    return {
        "TOY_DELAY_S": str(delay_s),
        "CXR_SERVER_CONFIG__FRONTEND_PROCESSES": "2",
        "CXR_SERVER_CONFIG__MAX_BATCH_SIZE": "32",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": str(metrics_port),
        **extra,
    }


def channels(sp: ServiceProcess, n: int, timeout: float = 60.0) -> tuple[list[grpc.Channel], list[int], list[int]]:
    """At least `n` channels, the frontend pid of each, and the frontends; both frontends get at least one
    (health answers SERVING once one frontend is up: the other may still be starting)."""
    frontends = wait_children(sp.proc.pid, 2)
    chans, owners = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ch, pid = open_channel_on(sp.target, frontends)
        chans.append(ch)
        owners.append(pid)
        if len(chans) >= n and set(owners[-n:]) == set(frontends):
            for extra in chans[:-n]:
                extra.close()
            return chans[-n:], owners[-n:], frontends
        if len(chans) >= n:
            time.sleep(0.1)
    raise AssertionError(f"every connection went to one frontend for {timeout}s: {owners}")


def classify(ch: grpc.Channel, i: int, timeout: float = 30.0) -> Future[pb.ClassifyImageResponse]:
    return pb_grpc.ClassificationServiceStub(ch).ClassifyImage.future(request(i), metadata=auth(), timeout=timeout)


def check_two_frontends_bit_equal_to_one_process(tmp_path: Path, device: str) -> None:
    """A real classifier (timm MobileNetV3-Small 0.5 at 64 px: quick to build; reproducible untrained weights):
    every probability that two frontends answer on `device` equals the single-process server's on the same device
    bit for bit; admin RPCs and their errors pass through the frontend to the executor; /metrics counts each
    frontend's requests; the model reports the device it runs on."""
    cheap = {"architecture": "timm", "timm_name": "mobilenetv3_small_050", "allow_untrained": True, "input_size": 64}
    models = {"multiclass_classifier": cheap}
    performance = {"warmup_batches": 0, "trace_models": False, "fold_batchnorm": False}  # a quicker load
    config = {"models": models, "performance": performance, "server_config": {"max_batch_size": 8, "device": device}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    metrics_port = free_port()
    env = {
        "CXR_CONFIG_PATH": str(path),
        "CXR_SERVER_CONFIG__FRONTEND_PROCESSES": "2",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": str(metrics_port),
        "HF_HUB_OFFLINE": "1",
    }
    with service_process(tmp_path, "cxr_classification", env=env) as sp:
        chans, _, _ = channels(sp, 4)
        served = []
        for i in range(len(IMAGES)):  # one at a time: a batch of one in both servers
            ch = chans[i % len(chans)]
            served.append(classify(ch, i).result())
        listed = pb_grpc.ClassificationServiceStub(chans[0]).ListModels(pb.ListModelsRequest(), metadata=auth())
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ClassificationServiceStub(chans[-1]).UnloadModel(
                pb.UnloadModelRequest(model_name="no_such_model"), metadata=auth()
            )
        assert sp.health() == SERVING
        text = wait_metric(metrics_port, "cxr_grpc_requests_total", len(IMAGES), method=CLASSIFY, code="OK")
        for ch in chans:
            ch.close()

    assert [m.name for m in listed.models] == ["multiclass_classifier"]
    assert listed.models[0].device.startswith(device), listed.models[0].device  # "cuda:0" on CUDA
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    info = error_info(rpc_status.from_call(refused.value))
    assert info is not None and info.reason == "MODEL_NOT_FOUND"
    per_frontend = [total(text, "cxr_grpc_requests_total", method=CLASSIFY, frontend=str(i)) for i in (0, 1)]
    assert sum(per_frontend) == len(IMAGES) and min(per_frontend) >= 1, per_frontend
    assert total(text, "cxr_frontend_processes") == 2

    async def in_process() -> list[pb.ClassifyImageResponse]:
        settings = make_settings(
            models=models,
            performance=performance,
            server_config__max_batch_size=8,
            server_config__device=device,
        )
        async with running_server(settings, build_binding(settings)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.ClassificationServiceStub(ch)
                return [await stub.ClassifyImage(request(i), metadata=auth()) for i in range(len(IMAGES))]

    reference = asyncio.run(in_process())
    for got, want in zip(served, reference, strict=True):
        got_p = [f.probability for f in got.predictions[0].findings]
        want_p = [f.probability for f in want.predictions[0].findings]
        assert got_p == want_p  # bit-equal floats
        assert got.predictions[0].model.version == want.predictions[0].model.version
