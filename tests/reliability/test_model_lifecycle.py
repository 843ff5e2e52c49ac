"""Model admin on real services, at the RPC level (aio clients on the server's own loop):

- UnloadModel / LoadModel under load, with `max_batch_delay_ms` > 0: every caller gets an answer
  (OK, or UNAVAILABLE with MODEL_NOT_READY) within 1 s of the admin call's return, and callers held
  in a batch within 1 s of the start of their batcher's close; none is stranded.
- LoadModel with a bad checkpoint (missing, corrupt, wrong architecture) leaves the served version
  SERVING and answering exactly as before; the error names the file and the reason.
- One checkpoint-path rule for every service: a path that resolves (symlinks followed) outside
  `models_path`, or any explicit path without `models_path`, is PERMISSION_DENIED; so is a
  directory under `models_path` whose weights file is a link to a file outside it.
- LoadModel with a path that is no path (a NUL byte) is INVALID_ARGUMENT; a loader that runs out
  of memory is RESOURCE_EXHAUSTED; any other loader exception is INTERNAL (a bug, not the file).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from tests.support.servers import auth, make_settings, running_server
from tests.support.targets import IMG, available_targets
from tests.support.toy_service import BrightnessModel, build_toy

TARGETS = {t.name: t for t in available_targets(include_toy=False, images_only=True)}
MULTI = "multiclass_classifier"
SERVING = health_pb2.HealthCheckResponse.SERVING


def reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # None when the status carries no details (e.g. a deadline)
    info = error_info(status) if status is not None else None
    return info.reason if info is not None else ""


def channel(server) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def classification_settings(**overrides):
    models = {
        "binary_classifier": {"model_type": "densenet121", "allow_untrained": True, "input_size": 64, "enabled": False},
        MULTI: {"model_type": "densenet121", "allow_untrained": True, "input_size": 64},
    }
    overrides.setdefault("performance__warmup_batches", 0)
    return make_settings(models=models, **overrides)


def segmentation_settings(**overrides):
    seg = {"enabled": True, "allow_untrained": True, "input_size": 64, "encoder": "resnet18"}
    overrides.setdefault("performance__warmup_batches", 0)
    return make_settings(models__segmentation=seg, **overrides)


SETTINGS = {"classification": classification_settings, "segmentation": segmentation_settings}
MODEL = {"classification": MULTI, "segmentation": "segmentation", "toy": "toy"}


def admin_requests(service: str):
    if service == "segmentation":
        from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
    else:
        from cxr_protos.classification.v1 import classification_service_pb2 as pb
    return pb


# -- 1. no caller is stranded --------------------------------------------------------------------


async def test_unload_and_reload_under_load_answer_every_caller_within_1s():
    """With a 10 s batch delay (the longest allowed, so six decodes on a busy CPU cannot outlast it), the test
    itself announces one request "still decoding" (as a slow decode would), then sends 6 ClassifyImage calls:
    they are decoded and taken off the queue by the collector, which waits for the announced one. Then
    UnloadModel; LoadModel (in place); the same again with a LoadModel that swaps versions, with 6 more callers
    streaming meanwhile. The unload refuses all 6 held callers (UNAVAILABLE MODEL_NOT_READY) within 1 s of
    its START; the reload's held callers have their answer (OK or MODEL_NOT_READY) within 1 s of the moment
    it swapped versions (the old batcher's close: before that the old version serves, by design; the retired
    version then runs what it holds at once, not after the batch delay), so an answer that waited for the batch
    delay or the drain grace fails; every other caller that started before an admin call returned has its answer
    within 1 s of that return."""
    from cxr_classification.service import build_binding
    from cxr_protos.classification.v1 import classification_service_pb2 as pb
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    s = classification_settings(server_config__max_batch_delay_ms=10_000, server_config__max_batch_size=32)
    image = common_pb2.Image(data=IMG, content_type="image/png")
    calls: list[tuple[float, float, str]] = []  # (start, end, outcome)
    admin_done: list[tuple[str, float]] = []
    held_late: list[tuple[str, float]] = []  # (admin call, seconds from its close's start to the answer)
    async with running_server(s, build_binding(s)) as server, channel(server) as ch:
        stub = pb_grpc.ClassificationServiceStub(ch)
        repo = server.binding.repository
        assert repo is not None

        async def classify() -> str:
            return (await timed_classify())[0]

        async def timed_classify() -> tuple[str, float]:
            t0 = time.monotonic()
            try:
                req = pb.ClassifyImageRequest(image=image, model_names=[MULTI])
                await stub.ClassifyImage(req, metadata=auth(), timeout=20)
                outcome = "OK"
            except grpc.aio.AioRpcError as err:
                outcome = f"{err.code().name}:{reason(err)}"
            calls.append((t0, time.monotonic(), outcome))
            return outcome, calls[-1][1]

        async def held_then(what: str, admin) -> list[str]:
            with repo.expect([MULTI]) as decoding:  # one request on its way: the collector waits for it
                batcher = repo.batcher(MULTI)
                submitted: list[float] = []
                submit = batcher.submit

                async def counted(*args, **kwargs):  # queued in this call's first step (no await before)
                    submitted.append(time.monotonic())
                    return await submit(*args, **kwargs)

                batcher.submit = counted
                burst = [asyncio.ensure_future(timed_classify()) for _ in range(6)]
                # all 6 decoded and queued, only the test's announcement left; in the reload the 6 streams queue
                # too, and at least one burst caller is held with them (every late one goes to a live version)
                least = 6 if what == "unload" else 7
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not (len(submitted) >= least and batcher._upcoming == 1):
                    if submitted and time.monotonic() > submitted[0] + 5:  # well within the 10 s batch delay
                        break
                    await asyncio.sleep(0.002)
                await asyncio.sleep(0.1)
                held = f"{len(submitted)} queued, {batcher._upcoming} announced, {batcher.queue_depth} in the queue"
                assert len(submitted) >= least and batcher.queue_depth == 0, held  # the collector holds them
                waited = time.monotonic() - submitted[0]
                ran = any(t.done() for t in burst) or bool(batcher._running)
                assert not ran, f"the held batch ran before the admin call ({waited:.2f} s after the first was queued)"
                closing: list[float] = []

                async def watch() -> None:  # the held batcher leaves the repository as its close starts
                    while repo.batcher(MULTI) is batcher:
                        await asyncio.sleep(0.002)
                    closing.append(time.monotonic())
                    if what == "reload":  # the request "still decoding" ends then (withdrawn): a replaced
                        # version waits for the requests announced to it, so one that never came would hold
                        # the drain (an unload refuses them, and keeps it held until the close took them)
                        decoding[MULTI].done()

                watcher = asyncio.ensure_future(watch())
                started = time.monotonic()
                await admin()  # a grpc.aio call starts when it is created: create it only now
                admin_done.append((what, time.monotonic()))
                outcomes = await asyncio.wait_for(asyncio.gather(*burst), 30)
                await asyncio.wait_for(watcher, 5)
                since = started if what == "unload" else closing[0]
                held_late.extend((what, round(t.result()[1] - since, 2)) for t in burst if t.result()[1] > since + 1.0)
                return [o for o, _ in outcomes]

        assert await classify() == "OK"
        unload = pb.UnloadModelRequest(model_name=MULTI)
        outcomes = await held_then("unload", lambda: stub.UnloadModel(unload, metadata=auth()))
        assert outcomes == ["UNAVAILABLE:MODEL_NOT_READY"] * 6, outcomes  # the unload refused every held caller
        await stub.LoadModel(pb.LoadModelRequest(model_name=MULTI), metadata=auth(), timeout=120)
        assert await classify() == "OK"

        stop = asyncio.Event()

        async def stream() -> None:
            for _ in range(200):  # bounded; ends with the swap
                if stop.is_set():
                    return
                await classify()

        streams = [asyncio.ensure_future(stream()) for _ in range(6)]
        try:
            load = pb.LoadModelRequest(model_name=MULTI)
            await held_then("reload", lambda: stub.LoadModel(load, metadata=auth(), timeout=120))
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert await classify() == "OK"
    outcomes_seen = {o for _, _, o in calls}
    assert outcomes_seen <= {"OK", "UNAVAILABLE:MODEL_NOT_READY"}, outcomes_seen
    assert not held_late, f"held callers answered more than 1 s after the close started: {held_late}"
    for what, done in admin_done:
        late = [(round(end - done, 2), o) for start, end, o in calls if start < done and end > done + 1.0]
        assert not late, f"{len(late)} caller(s) in flight at {what} answered more than 1 s after it: {late[:5]}"


# -- 3. validate, then swap ------------------------------------------------------------------------


def bad_checkpoint(kind: str, models_dir: Path) -> tuple[str, str]:
    """(checkpoint_path relative to models_path, text the error must contain)."""
    if kind == "missing":
        return "no-such-checkpoint.pth", "does not exist"
    path = models_dir / f"{kind}.pth"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a torch checkpoint " * 50)
        return path.name, "could not be read"
    torch.save({"features.conv0.weight": torch.zeros(3, 3), "head.bias": torch.zeros(7)}, path)  # another network
    return path.name, "does not match"


async def _infer(target, stub) -> tuple[str, list[float]]:
    call = target.valid(IMG, "image/png")
    resp = await getattr(stub, call.method)(call.request, metadata=auth(), timeout=30)
    if hasattr(resp, "predictions"):
        return resp.predictions[0].model.version, [f.probability for f in resp.predictions[0].findings]
    return resp.model.version, [float(m.area_pixels) for m in resp.masks]


@pytest.mark.parametrize("name", sorted(TARGETS))
async def test_a_bad_checkpoint_leaves_the_served_model_serving(name, tmp_path):
    target = TARGETS[name]
    pb = admin_requests(name)
    tmp_path = tmp_path.resolve()
    s = SETTINGS[name](models_path=str(tmp_path), server_config__max_batch_delay_ms=1)
    async with running_server(s, target.build(s)) as server, channel(server) as ch:
        stub = target.stub(ch)
        version, before = await _infer(target, stub)
        for kind in ("missing", "corrupt", "wrong_architecture"):
            raw, why = bad_checkpoint(kind, tmp_path)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(
                    pb.LoadModelRequest(model_name=MODEL[name], checkpoint_path=raw), metadata=auth(), timeout=60
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (kind, err.value.details())
            assert str(tmp_path / raw) in err.value.details() and why in err.value.details(), err.value.details()
            listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models
            info = next(m for m in listed if m.name == MODEL[name])
            assert info.state == common_pb2.MODEL_STATE_READY and info.version == version and not info.error, kind
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == SERVING, kind
            again_version, after = await _infer(target, stub)  # answering as before: same version, same output
            assert again_version == version
            np.testing.assert_array_equal(np.array(after), np.array(before))


# -- 4. one checkpoint-path rule -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["toy", *sorted(TARGETS)])
async def test_checkpoint_paths_outside_models_path_are_permission_denied(name, tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    outside = tmp_path / "outside.pth"
    outside.write_bytes(b"weights someone else put there")
    (models_dir / "link.pth").symlink_to(outside)
    (models_dir / "sub").mkdir()
    # directories under models_path whose weights file (by name, or the only one) links outside
    (models_dir / "dir").mkdir()
    (models_dir / "dir" / "model.pth").symlink_to(outside)
    (models_dir / "only").mkdir()
    (models_dir / "only" / "weights.pt").symlink_to(outside)
    (models_dir / "inside.pth").write_bytes(b"a file under models_path")
    (models_dir / "indir").mkdir()
    (models_dir / "indir" / "model.pth").symlink_to(models_dir / "inside.pth")  # a link that stays inside
    build = build_toy if name == "toy" else TARGETS[name].build
    pb = admin_requests(name)
    settings = SETTINGS.get(name, lambda **kw: make_settings(**kw))
    # without models_path only on the cheaper services: the rule is the same code for all three
    for configured in (str(models_dir), None) if name != "classification" else (str(models_dir),):
        s = settings(models_path=configured) if configured else settings()
        async with running_server(s, build(s)) as server, channel(server) as ch:
            stub = (TARGETS[name].stub if name != "toy" else _toy_stub)(ch)
            paths = ["link.pth", "../outside.pth", "sub/../../outside.pth", str(outside), "/etc/passwd"]
            paths += ["dir", "dir/", str(models_dir / "dir"), "only", "sub/../dir"]
            for raw in paths if configured else [*paths, "inside.pth"]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.LoadModel(
                        pb.LoadModelRequest(model_name=MODEL[name], checkpoint_path=raw), metadata=auth(), timeout=30
                    )
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (raw, err.value.details())
                assert reason(err.value) == "CHECKPOINT_PATH_OUTSIDE", raw
                if not configured:
                    assert "models_path" in err.value.details()
            listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models
            assert next(m for m in listed if m.name == MODEL[name]).state == common_pb2.MODEL_STATE_READY
            if name == "toy" and configured:  # the rule refuses what leaves models_path, not directories or links
                for raw in ("indir", "inside.pth"):
                    loaded = await stub.LoadModel(
                        pb.LoadModelRequest(model_name="toy", checkpoint_path=raw), metadata=auth(), timeout=30
                    )
                    assert loaded.model.state == common_pb2.MODEL_STATE_READY, raw


def _toy_stub(ch):
    from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc

    return pb_grpc.ClassificationServiceStub(ch)


# -- what a LoadModel failure is -------------------------------------------------------------------


async def test_a_checkpoint_path_that_is_no_path_is_invalid_argument(tmp_path):
    """A NUL byte cannot name a file: INVALID_ARGUMENT `CHECKPOINT_PATH_INVALID`, not INTERNAL."""
    s = make_settings(models_path=str(tmp_path))
    async with running_server(s, build_toy(s)) as server, channel(server) as ch:
        stub = _toy_stub(ch)
        from cxr_protos.classification.v1 import classification_service_pb2 as pb

        for raw in ("a\x00b", f"{tmp_path}/x\x00.pth", "\x00"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(
                    pb.LoadModelRequest(model_name="toy", checkpoint_path=raw), metadata=auth(), timeout=30
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, err.value.details())
            assert reason(err.value) == "CHECKPOINT_PATH_INVALID", raw
            assert "is not a usable file path" in err.value.details(), err.value.details()
        listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models
        assert listed[0].state == common_pb2.MODEL_STATE_READY


@pytest.mark.parametrize(
    ("error", "code", "why"),
    [
        (KeyError("state_dict"), grpc.StatusCode.INTERNAL, "INTERNAL"),
        (RuntimeError("a bug in the loader"), grpc.StatusCode.INTERNAL, "INTERNAL"),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_LOAD_OUT_OF_MEMORY"),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MODEL_LOAD_OUT_OF_MEMORY",
        ),
    ],
    ids=["KeyError", "RuntimeError", "MemoryError", "CudaOutOfMemory"],
)
async def test_a_loader_exception_is_internal_and_out_of_memory_is_resource_exhausted(
    error, code, why, tmp_path, caplog
):
    """The toy model's load raises `error` for an explicit checkpoint. Out of memory is
    RESOURCE_EXHAUSTED naming the file; anything else is our bug: INTERNAL with the correlation id
    in the details and in an ERROR log line, the exception's text not leaked; never
    FAILED_PRECONDITION (that is for a bad file, which the real loaders report as CheckpointError).
    The served version stays READY either way."""
    (tmp_path / "weights.pth").write_bytes(b"whatever")
    s = make_settings(models_path=str(tmp_path))
    async with (
        running_server(s, build_toy(s, BrightnessModel(checkpoint_error=error))) as server,
        channel(server) as ch,
    ):
        from cxr_protos.classification.v1 import classification_service_pb2 as pb

        stub = _toy_stub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(
                pb.LoadModelRequest(model_name="toy", checkpoint_path="weights.pth"),
                metadata=(*auth(), ("x-correlation-id", "load-err-1")),
                timeout=30,
            )
        details = err.value.details()
        assert err.value.code() == code, details
        assert reason(err.value) == why, details
        if code == grpc.StatusCode.INTERNAL:
            assert "load-err-1" in details and "a bug in the loader" not in details and "state_dict" not in details
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("load-err-1" in m for m in logged), logged
        else:
            assert str(tmp_path.resolve() / "weights.pth") in details, details
        listed = (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models
        assert listed[0].state == common_pb2.MODEL_STATE_READY
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == SERVING
