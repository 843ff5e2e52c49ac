"""A checkpoint missing, corrupt or for another architecture at start: the service comes up,
stays NOT_SERVING (so Kubernetes keeps it out of rotation instead of crash-looping it), logs an
ERROR naming the model, the file and the reason, reports it in ListModels, and answers
inference calls with UNAVAILABLE and that reason, never INTERNAL."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_serving.settings import Settings
from tests.support.servers import auth, make_settings, running_server
from tests.support.targets import IMG, available_targets
from tests.support.toy_service import BrightnessModel, build_toy

TARGETS = {t.name: t for t in available_targets(include_toy=False, images_only=True)}


def with_checkpoint(name: str, path: str) -> Settings:
    if name == "classification":
        cfg = {"model_type": "densenet121", "input_size": 64, "checkpoint_path": path}
        models = {"binary_classifier": cfg, "multiclass_classifier": {**cfg, "enabled": False}}
    else:
        models = {"segmentation": {"enabled": True, "input_size": 64, "encoder": "resnet18", "checkpoint_path": path}}
    return make_settings(models=models, performance__warmup_batches=0)


def bad_checkpoint(kind: str, tmp_path) -> str:
    if kind == "missing":
        return str(tmp_path / "no-such-checkpoint.pth")
    path = tmp_path / f"{kind}.pth"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a torch checkpoint " * 50)
    else:  # weights of some other network
        torch.save({"features.conv0.weight": torch.zeros(3, 3), "head.bias": torch.zeros(7)}, path)
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "corrupt", "wrong_architecture"])
@pytest.mark.parametrize("name", sorted(TARGETS))
async def test_bad_checkpoint_keeps_the_service_up_and_not_serving(name, kind, tmp_path, caplog):
    target = TARGETS[name]
    path = bad_checkpoint(kind, tmp_path)
    caplog.set_level(logging.INFO)
    settings = with_checkpoint(name, path)
    async with (
        running_server(settings, target.build(settings)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = target.stub(ch)
        models = (await stub.ListModels(target.malformed[-1].request, metadata=auth(), timeout=10)).models
        failed = [m for m in models if m.error]
        assert failed and all(m.state == 4 for m in failed), models  # MODEL_STATE_FAILED
        call = target.valid(IMG, "image/png")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, call.method)(call.request, metadata=auth(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert failed[0].name in err.value.details() or "ListModels" in err.value.details()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(failed[0].name in m and "failed to load" in m and path in m for m in errors), errors
    assert any("NOT_SERVING" in m for m in errors), errors


async def test_toy_failed_load_is_logged_and_not_serving(caplog):
    """The runtime's side alone (no real service needed): a model whose load() raises."""
    caplog.set_level(logging.INFO)
    settings = make_settings()
    async with (
        running_server(settings, build_toy(settings, BrightnessModel(fail_load=True))) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("toy failed to load: RuntimeError: checkpoint corrupt" in m for m in errors), errors
