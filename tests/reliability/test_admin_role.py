"""Admin role on real servers (aio clients on the server's loop): the RPCs marked ACCESS_ADMIN in the protos
(LoadModel, UnloadModel, IngestDocuments) refuse an inference key with PERMISSION_DENIED `ADMIN_REQUIRED`
and do nothing; an admin key calls them and every inference RPC; the audit line records the role."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from cxr_protos.classification.v1 import classification_service_pb2 as cpb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cpb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_protos.rag.v1 import rag_service_pb2 as rpb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rpb_grpc
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as spb
from cxr_serving.audit import key_fingerprint
from cxr_serving.grpc_errors import error_info
from cxr_serving.logging_setup import JsonFormatter
from cxr_serving.settings import Settings
from tests.support.servers import running_server
from tests.support.targets import IMG, available_targets

INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcd"
TARGETS = {t.name: t for t in available_targets()}
SERVICES = [
    cpb.DESCRIPTOR.services_by_name["ClassificationService"],
    spb.DESCRIPTOR.services_by_name["SegmentationService"],
    rpb.DESCRIPTOR.services_by_name["RagService"],
]


def with_keys(settings: Settings, **security: object) -> Settings:
    data = settings.model_dump()
    data["security"].update({"api_keys": [INFERENCE_KEY], "admin_api_keys": [ADMIN_KEY], **security})
    return Settings.model_validate(data)


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def reason(err: grpc.aio.AioRpcError) -> str:
    return error_info(rpc_status.from_call(err)).reason


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(self.format(record))
        if line.get("audit"):
            self.lines.append(line)


@contextlib.contextmanager
def audit_lines() -> Iterator[list[dict]]:
    capture, logger = _Capture(), logging.getLogger("cxr.audit")
    old = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        yield capture.lines
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old)


def test_the_admin_rpcs_are_declared_once_in_the_protos() -> None:
    from cxr_serving.roles import admin_methods

    assert admin_methods(SERVICES) == {
        "/cxr.classification.v1.ClassificationService/LoadModel",
        "/cxr.classification.v1.ClassificationService/UnloadModel",
        "/cxr.segmentation.v1.SegmentationService/LoadModel",
        "/cxr.segmentation.v1.SegmentationService/UnloadModel",
        "/cxr.classification.v1.ClassificationService/RecordModelEvaluation",
        "/cxr.segmentation.v1.SegmentationService/RecordModelEvaluation",
        "/cxr.rag.v1.RagService/IngestDocuments",
    } | {
        f"/cxr.{name}.v1.{name.title()}Service/{m}"
        for name in ("classification", "segmentation")
        for m in ("PromoteModel", "RollbackModel", "SetModelRouting")
    }
    # a later RPC that manages models or documents must be declared admin too
    for service in SERVICES:
        for m in service.methods:
            if m.name.startswith(
                ("Load", "Unload", "Ingest", "Delete", "Record", "Retry", "Promote", "Rollback", "Set")
            ):
                assert f"/{service.full_name}/{m.name}" in admin_methods(SERVICES), m.full_name


async def _refused(call, request, key: str = INFERENCE_KEY) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request, metadata=md(key), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    assert reason(err.value) == "ADMIN_REQUIRED" and "admin API key" in err.value.details()


def _roles(lines: list[dict], method: str) -> list[tuple[str, str]]:
    return [(ln["role"], ln["code"]) for ln in lines if ln["method"].endswith("/" + method)]


@pytest.mark.parametrize("name", ["classification", "segmentation"])
async def test_model_admin_needs_an_admin_key(name: str) -> None:
    target = TARGETS[name]
    s = with_keys(target.settings())
    model = "multiclass_classifier" if name == "classification" else "segmentation"
    pb = cpb if name == "classification" else spb
    with audit_lines() as lines:
        async with (
            running_server(s, target.build(s)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = target.stub(ch)

            async def state() -> int:
                listed = await stub.ListModels(pb.ListModelsRequest(), metadata=md(INFERENCE_KEY), timeout=30)
                return next(m.state for m in listed.models if m.name == model)

            call = target.valid(IMG, "image/png")
            await getattr(stub, call.method)(call.request, metadata=md(INFERENCE_KEY), timeout=60)
            await _refused(stub.UnloadModel, pb.UnloadModelRequest(model_name=model))
            assert await state() == common_pb2.MODEL_STATE_READY  # the refused unload did nothing
            await _refused(stub.LoadModel, pb.LoadModelRequest(model_name=model))

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UnloadModel(pb.UnloadModelRequest(model_name=model), metadata=md("not-a-key"), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

            unloaded = await stub.UnloadModel(pb.UnloadModelRequest(model_name=model), metadata=md(ADMIN_KEY))
            assert unloaded.model.state == common_pb2.MODEL_STATE_UNLOADED
            loaded = await stub.LoadModel(pb.LoadModelRequest(model_name=model), metadata=md(ADMIN_KEY), timeout=120)
            assert loaded.model.state == common_pb2.MODEL_STATE_READY
            # an admin key is valid for the inference RPCs too
            await getattr(stub, call.method)(call.request, metadata=md(ADMIN_KEY), timeout=60)

    assert _roles(lines, "UnloadModel") == [
        ("inference", "PERMISSION_DENIED"),
        ("none", "UNAUTHENTICATED"),
        ("admin", "OK"),
    ]
    assert _roles(lines, "LoadModel") == [("inference", "PERMISSION_DENIED"), ("admin", "OK")]
    assert _roles(lines, call.method) == [("inference", "OK"), ("admin", "OK")]
    refused = next(ln for ln in lines if ln["method"].endswith("/LoadModel"))
    assert refused["key_id"] == key_fingerprint(INFERENCE_KEY)
    assert INFERENCE_KEY not in json.dumps(lines) and ADMIN_KEY not in json.dumps(lines)


@pytest.mark.parametrize("name", ["classification", "segmentation"])
async def test_version_admin_needs_an_admin_key(name: str) -> None:
    """PromoteModel, RollbackModel and SetModelRouting (versions side by side) refuse an inference key and
    change nothing; with the admin key they reach the service (which then judges the request)."""
    target = TARGETS[name]
    s = with_keys(target.settings())
    model = "multiclass_classifier" if name == "classification" else "segmentation"
    pb = cpb if name == "classification" else spb
    calls = [
        ("PromoteModel", pb.PromoteModelRequest(model_name=model, version="untrained")),
        ("RollbackModel", pb.RollbackModelRequest(model_name=model)),
        (
            "SetModelRouting",
            pb.SetModelRoutingRequest(model_name=model, version_policy=common_pb2.VERSION_POLICY_PINNED),
        ),
    ]
    with audit_lines() as lines:
        async with (
            running_server(s, target.build(s)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = target.stub(ch)
            for method, request in calls:
                await _refused(getattr(stub, method), request)
            listed = await stub.ListModels(pb.ListModelsRequest(), metadata=md(INFERENCE_KEY), timeout=30)
            info = next(m for m in listed.models if m.name == model)
            assert (info.role, info.version_policy) == ("serving", "latest")  # the refused routing did nothing
            promoted = await stub.PromoteModel(calls[0][1], metadata=md(ADMIN_KEY), timeout=30)
            assert promoted.model.version == "untrained"  # already serving: a no-op
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RollbackModel(calls[1][1], metadata=md(ADMIN_KEY), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # nothing to roll back to
            routed = await stub.SetModelRouting(calls[2][1], metadata=md(ADMIN_KEY), timeout=30)
            assert [m.version_policy for m in routed.models] == ["pinned"]
    for method, _ in calls:
        assert _roles(lines, method)[0] == ("inference", "PERMISSION_DENIED"), method
        assert _roles(lines, method)[1][0] == "admin", method


async def test_ingest_documents_needs_an_admin_key() -> None:
    target = TARGETS["rag"]
    s = with_keys(target.settings())
    doc_id = f"admin-role-{os.getpid()}-{time.monotonic_ns()}"
    text = "Admin role test passage about tension pneumothorax and needle decompression in the emergency room."
    req = rpb.IngestDocumentsRequest(documents=[rpb.Document(id=doc_id, text=text, title=doc_id)])
    with audit_lines() as lines:
        async with (
            running_server(s, target.build(s)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = rpb_grpc.RagServiceStub(ch)
            await _refused(stub.IngestDocuments, req)
            search = rpb.SearchLiteratureRequest(query="admin role tension pneumothorax needle decompression", top_k=50)
            found = await stub.SearchLiterature(search, metadata=md(INFERENCE_KEY), timeout=60)
            assert all(p.title != doc_id for p in found.passages)  # the refused ingest added nothing
            done = await stub.IngestDocuments(req, metadata=md(ADMIN_KEY), timeout=120)
            assert done.chunks_added >= 1
            found = await stub.SearchLiterature(search, metadata=md(ADMIN_KEY), timeout=60)
            assert any(p.title == doc_id for p in found.passages)
    assert _roles(lines, "IngestDocuments") == [("inference", "PERMISSION_DENIED"), ("admin", "OK")]
    assert _roles(lines, "SearchLiterature") == [("inference", "OK"), ("admin", "OK")]


async def test_toy_admin_keys_from_a_file_that_rotates(tmp_path: Path) -> None:
    """The admin key file is re-read when it changes, as the inference key file is."""
    target = TARGETS["toy"]
    key_file = tmp_path / "admin-keys"
    key_file.write_text(f"# admin keys\n{ADMIN_KEY}\n")
    s = with_keys(target.settings(), admin_api_keys=[], admin_api_key_file=str(key_file))
    async with (
        running_server(s, target.build(s)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = cpb_grpc.ClassificationServiceStub(ch)
        await _refused(stub.UnloadModel, cpb.UnloadModelRequest(model_name="toy"))
        unloaded = await stub.UnloadModel(cpb.UnloadModelRequest(model_name="toy"), metadata=md(ADMIN_KEY), timeout=30)
        assert unloaded.model.state == common_pb2.MODEL_STATE_UNLOADED
        new_key = "rotated-admin-key-9876543210"
        key_file.write_text(new_key + "\n")
        os.utime(key_file, ns=(time.time_ns(), time.time_ns() + 10**9))
        await asyncio.sleep(1.2)  # the store re-checks the file at most once a second
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UnloadModel(cpb.UnloadModelRequest(model_name="toy"), metadata=md(ADMIN_KEY), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the old admin key is gone
        loaded = await stub.LoadModel(cpb.LoadModelRequest(model_name="toy"), metadata=md(new_key), timeout=60)
        assert loaded.model.state == common_pb2.MODEL_STATE_READY
        assert (await stub.ListModels(cpb.ListModelsRequest(), metadata=md(new_key), timeout=30)).models


async def test_admin_rpcs_are_refused_when_authentication_is_off() -> None:
    """enable_authentication false: no caller can prove the admin role, so admin RPCs are refused
    (PERMISSION_DENIED ADMIN_REQUIRED, with or without a key) while inference RPCs need no key."""
    target = TARGETS["toy"]
    data = target.settings().model_dump()
    data["security"].update(enable_authentication=False, api_keys=[], admin_api_keys=[], admin_api_key_file=None)
    s = Settings.model_validate(data)
    with audit_lines() as lines:
        async with (
            running_server(s, target.build(s)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = cpb_grpc.ClassificationServiceStub(ch)
            assert (await stub.ListModels(cpb.ListModelsRequest(), timeout=30)).models[0].name == "toy"
            for metadata in ((), md(ADMIN_KEY)):
                for call, request in (
                    (stub.UnloadModel, cpb.UnloadModelRequest(model_name="toy")),
                    (stub.LoadModel, cpb.LoadModelRequest(model_name="toy")),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(request, metadata=metadata, timeout=30)
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
                    assert reason(err.value) == "ADMIN_REQUIRED" and "enable_authentication" in err.value.details()
    assert _roles(lines, "UnloadModel") == [("none", "PERMISSION_DENIED")] * 2
    assert _roles(lines, "LoadModel") == [("none", "PERMISSION_DENIED")] * 2
