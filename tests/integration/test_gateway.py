"""The Kong stand-in end to end: real backends (the toy classification service, a small streaming
RagService) and the gateway on 127.0.0.1 port 0; REST with aiohttp, gRPC with the real stubs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time

import aiohttp
import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from cxr_gateway import kong_model
from cxr_gateway.reasons import RATE_LIMIT_EXCEEDED, REQUEST_TOO_LARGE
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rag_grpc
from cxr_serving.grpc_errors import error_info
from cxr_serving.server import ServiceBinding, create_server
from tests.support.gateway_helpers import ADMIN_KEY, global_plugin, running_gateway, self_signed_ca_and_server
from tests.support.servers import TEST_KEY, auth, free_port, make_settings, running_server
from tests.support.toy_service import BrightnessModel, build_toy

KEY = {"apikey": TEST_KEY}
ADMIN = {"apikey": ADMIN_KEY}
RAG_SERVICE = rag_pb.DESCRIPTOR.services_by_name["RagService"].full_name
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def rest_error_info(body: dict) -> dict:
    """The ErrorInfo of a google.rpc.Status JSON body (exactly one)."""
    infos = [d for d in body["details"] if d["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    return infos[0]


def grpc_error_info(err: grpc.aio.AioRpcError):
    """The ErrorInfo of the google.rpc.Status in `grpc-status-details-bin` (code and message must match)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin in {err.trailing_metadata()}"
    info = error_info(status)
    assert info is not None
    return info


class StreamingRag(rag_grpc.RagServiceServicer):
    """Just enough of the RagService contract to exercise server streaming through the gateway."""

    async def StreamAnswer(self, request, context):
        if request.question == "echo metadata":  # what reached the backend, as key=value deltas
            for key, value in sorted(context.invocation_metadata()):
                yield rag_pb.StreamAnswerResponse(text_delta=f"{key}={value}")
            return
        yield rag_pb.StreamAnswerResponse(passages=[rag_pb.RetrievedPassage(id="p1", text="lungs", score=0.5)])
        for word in request.question.split():
            yield rag_pb.StreamAnswerResponse(text_delta=word)
        if request.question == "fail midway":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "llm went away")
        yield rag_pb.StreamAnswerResponse(finish_reason="stop")


def rag_binding() -> ServiceBinding:
    servicer = StreamingRag()
    return ServiceBinding(
        name="rag",
        full_service_names=[RAG_SERVICE],
        register=lambda server: rag_grpc.add_RagServiceServicer_to_server(servicer, server),
    )


@contextlib.asynccontextmanager
async def toy_backend(model: BrightnessModel | None = None, port: int = 0):
    s = make_settings()
    server = create_server(s, build_toy(s, model), host="127.0.0.1", port=port, metrics_port=0)
    await server.start()
    try:
        await server.wait_until_ready(30)
        yield server
    finally:
        await server.stop(grace=0.5)


def admin_settings():
    """The service accepts ADMIN_KEY as its admin key."""
    return make_settings(security__admin_api_keys=[ADMIN_KEY])


@contextlib.asynccontextmanager
async def toy_backend_with(settings):
    server = create_server(settings, build_toy(settings), host="127.0.0.1", port=0, metrics_port=0)
    await server.start()
    try:
        await server.wait_until_ready(30)
        yield server
    finally:
        await server.stop(grace=0.5)


def rest(gw) -> str:
    return f"http://127.0.0.1:{gw.ports.rest}"


def classify_body(png: bytes, **extra) -> dict:
    return {"image": {"data": base64.b64encode(png).decode(), "contentType": "image/png"}, **extra}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_rest_classify_transcodes_json_and_echoes_correlation_id(sample_png, http):
    async with toy_backend() as be, running_gateway({"classification": be.port}) as gw:
        async with http.post(
            f"{rest(gw)}/v1/classification:classifyImage", json=classify_body(sample_png), headers=KEY
        ) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
            cid = r.headers["X-Correlation-ID"]
            assert len(cid) == 36  # generated uuid
            assert r.headers["RateLimit-Limit"] == "100"
            assert int(r.headers["X-Kong-Upstream-Latency"]) >= 0
        finding = body["predictions"][0]["findings"][0]
        assert finding["label"] == "bright" and 0 <= finding["probability"] <= 1
        assert body["untrained"] is True and body["image"]["width"] > 0  # unpopulated fields emitted
        assert "photometric_interpretation" in body["image"]  # .proto names, as Kong emits them
        # a client-chosen id is kept and echoed; GET with no body
        async with http.get(
            f"{rest(gw)}/v1/classification/models", headers={**KEY, "X-Correlation-ID": "abc-123"}
        ) as r:
            assert r.status == 200
            assert r.headers["X-Correlation-ID"] == "abc-123"
            assert (await r.json())["models"][0]["name"] == "toy"


async def test_rest_errors_follow_grpc_gateway_mapping(sample_png, http, caplog):
    caplog.set_level(logging.INFO, logger="cxr.audit")
    s = admin_settings()
    async with toy_backend_with(s) as be, running_gateway({"classification": be.port}) as gw:
        url = f"{rest(gw)}/v1/classification:classifyImage"
        async with http.post(url, json=classify_body(sample_png, modelNames=["bad"]), headers=KEY) as r:
            assert r.status == 400
            body = await r.json()
            assert body["code"] == 3 and "not allowed" in body["message"]
            assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
            assert body["details"][0]["domain"] == "cxr.platform"
        async with http.post(url, json=classify_body(sample_png, model_names=["explode"]), headers=KEY) as r:
            assert r.status == 500 and (await r.json())["code"] == 13
        async with http.post(url, data=b"{not json", headers=KEY) as r:
            assert r.status == 400 and (await r.json())["code"] == 3
        # the load route reaches the LoadModel RPC (the service audits it): an explicit checkpoint path with
        # no models_path is refused there (403 CHECKPOINT_PATH_OUTSIDE)
        body = {"checkpointPath": "/etc/passwd"}
        async with http.post(f"{rest(gw)}/v1/classification/models/toy:load", json=body, headers=ADMIN) as r:
            assert r.status == 403 and (await r.json())["details"][0]["reason"] == "CHECKPOINT_PATH_OUTSIDE"
        assert len(audited(caplog, "/cxr.classification.v1.ClassificationService/LoadModel")) == 1
        async with http.get(f"{rest(gw)}/v1/nothing-here", headers=KEY) as r:
            assert r.status == 404 and (await r.json()) == {"message": "no Route matched with those values"}
        async with http.get(url, headers=KEY) as r:  # wrong method: no route either
            assert r.status == 404


async def service_refusal(port: int, metadata: tuple) -> tuple[str, str]:
    """(reason, domain) of the ErrorInfo that the service itself sends for ListModels with `metadata`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=metadata)
    info = grpc_error_info(err.value)
    return info.reason, info.domain


async def test_auth_failures_rest_and_grpc(http):
    """401 from the gateway carries the ErrorInfo reason and domain that the service sends for the same key."""
    async with toy_backend() as be, running_gateway({"classification": be.port}) as gw:
        missing = await service_refusal(be.port, ())
        invalid = await service_refusal(be.port, auth("wrong"))
        assert missing == ("API_KEY_MISSING", "cxr.platform") and invalid == ("API_KEY_INVALID", "cxr.platform")
        url = f"{rest(gw)}/v1/classification/models"
        async with http.get(url) as r:
            assert r.status == 401
            body = await r.json()
            assert (body["code"], body["message"]) == (16, "No API key found in request")
            assert (rest_error_info(body)["reason"], rest_error_info(body)["domain"]) == missing
            assert r.headers["WWW-Authenticate"].startswith("Key realm=")
            assert "RateLimit-Limit" not in r.headers
        async with http.get(url, headers={"apikey": "wrong"}) as r:
            body = await r.json()
            assert r.status == 401 and body["message"] == "Invalid authentication credentials"
            assert (rest_error_info(body)["reason"], rest_error_info(body)["domain"]) == invalid
        async with http.get(url, headers={"x-api-key": TEST_KEY}) as r:
            assert r.status == 200
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(pb.ListModelsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "No API key found in request"
            info = grpc_error_info(err.value)
            assert (info.reason, info.domain) == missing
            assert dict(err.value.trailing_metadata())["www-authenticate"].startswith("Key realm=")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(pb.ListModelsRequest(), metadata=auth("wrong"))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = grpc_error_info(err.value)
            assert (info.reason, info.domain) == invalid
            assert (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models[0].name == "toy"


def audited(caplog, method: str) -> list[dict]:
    """The audit lines (cxr.audit) the service wrote for `method`: proof that a call reached it."""
    return [r.fields for r in caplog.records if r.name == "cxr.audit" and r.fields["method"] == method]


async def test_admin_rpcs_need_the_admin_key_rest_and_grpc(http, caplog):
    """An inference key gets 403 / PERMISSION_DENIED (ErrorInfo ADMIN_REQUIRED) on every admin route and
    never reaches the service; the admin key passes the gateway to the real service, which audits the call."""
    caplog.set_level(logging.INFO, logger="cxr.audit")
    s = admin_settings()
    load = "/cxr.classification.v1.ClassificationService/LoadModel"
    unload = "/cxr.classification.v1.ClassificationService/UnloadModel"
    async with (
        toy_backend_with(s) as be,
        running_server(make_settings(), rag_binding()) as rag,
        running_gateway({"classification": be.port, "rag": rag.port}) as gw,
    ):
        admin_urls = [
            f"{rest(gw)}/v1/classification/models/toy:load",
            f"{rest(gw)}/v1/classification/models/toy:unload",
            f"{rest(gw)}/v1/segmentation/models/unet:load",
            f"{rest(gw)}/v1/segmentation/models/unet:unload",
            f"{rest(gw)}/v1/rag/documents:ingest",
        ]
        for url in admin_urls:
            async with http.post(url, json={}, headers=KEY) as r:
                assert r.status == 403, url
                body = await r.json()
                assert (body["code"], body["message"]) == (7, "You cannot consume this service")
                info = rest_error_info(body)
                assert (info["reason"], info["domain"]) == ("ADMIN_REQUIRED", "cxr.platform")
                assert info["metadata"]["consumer"] == "cxr-client"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            calls = [
                stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=auth()),
                stub.UnloadModel(pb.UnloadModelRequest(model_name="toy"), metadata=auth()),
                rag_grpc.RagServiceStub(ch).IngestDocuments(rag_pb.IngestDocumentsRequest(), metadata=auth()),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                info = grpc_error_info(err.value)
                assert (info.reason, info.domain) == ("ADMIN_REQUIRED", "cxr.platform")
            # a client cannot claim the admin group itself
            spoofed = (*auth(), ("x-consumer-groups", "admin"), ("x-consumer-username", "cxr-admin"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=spoofed)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert not audited(caplog, load) and not audited(caplog, unload)  # refused at the gateway
            # inference RPCs still pass with the inference key, and with the admin key (both groups)
            assert (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models[0].name == "toy"
            assert (await stub.ListModels(pb.ListModelsRequest(), metadata=auth(ADMIN_KEY))).models
            # the admin key reaches the service on the admin RPC (what the toy answers is its own business)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.LoadModel(pb.LoadModelRequest(model_name="toy"), metadata=auth(ADMIN_KEY))
        grpc_lines = audited(caplog, load)
        assert len(grpc_lines) == 1 and grpc_lines[0]["consumer"] == "cxr-admin"
        async with http.post(admin_urls[1], json={}, headers=ADMIN) as r:
            await r.read()
        rest_lines = audited(caplog, unload)
        assert len(rest_lines) == 1 and rest_lines[0]["consumer"] == "cxr-admin"
        async with http.get(f"{rest(gw)}/v1/classification/models", headers=ADMIN) as r:
            assert r.status == 200


async def test_rate_limit_429_with_kong_headers(http):
    def three_per_minute(kong: kong_model.KongConfig) -> None:
        global_plugin(kong, "rate-limiting").config.minute = 3

    async with toy_backend() as be, running_gateway({"classification": be.port}, three_per_minute) as gw:
        url = f"{rest(gw)}/v1/classification/models"
        remaining = []
        for _ in range(3):
            async with http.get(url, headers=KEY) as r:
                assert r.status == 200
                assert r.headers["RateLimit-Limit"] == "3" and r.headers["X-RateLimit-Limit-Minute"] == "3"
                assert 1 <= int(r.headers["RateLimit-Reset"]) <= 60
                remaining.append(r.headers["RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        async with http.get(url, headers=KEY) as r:
            assert r.status == 429
            body = await r.json()
            assert (body["code"], body["message"]) == (8, "API rate limit exceeded")
            info = rest_error_info(body)
            assert (info["reason"], info["domain"]) == (RATE_LIMIT_EXCEEDED, "cxr.platform")
            assert info["metadata"] == {"limit": "3", "window": "minute", "limit_by": "consumer"}
            retry = [d for d in body["details"] if d["@type"] == RETRY_INFO]
            assert retry == [{"@type": RETRY_INFO, "retryDelay": f"{r.headers['Retry-After']}s"}]
            assert r.headers["RateLimit-Remaining"] == "0"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            assert r.headers["Retry-After"] == r.headers["RateLimit-Reset"]
        # the limit is per consumer, so the gRPC proxy shares the counter
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(err.value.trailing_metadata())["retry-after"]
            info = grpc_error_info(err.value)
            assert (info.reason, info.domain) == (RATE_LIMIT_EXCEEDED, "cxr.platform")


async def test_request_size_limit_413(sample_png, http):
    def one_megabyte(kong: kong_model.KongConfig) -> None:
        global_plugin(kong, "request-size-limiting").config.allowed_payload_size = 1

    async with toy_backend() as be, running_gateway({"classification": be.port}, one_megabyte) as gw:
        url = f"{rest(gw)}/v1/classification:classifyImage"
        big = classify_body(b"\x89PNG" + b"0" * 1_200_000)
        async with http.post(url, json=big, headers=KEY) as r:
            assert r.status == 413
            body = await r.json()
            assert (body["code"], body["message"]) == (8, "Request size limit exceeded")
            info = rest_error_info(body)
            assert (info["reason"], info["domain"]) == (REQUEST_TOO_LARGE, "cxr.platform")
            assert info["metadata"] == {"limit_bytes": str(1024 * 1024)}

        async def chunks():  # no Content-Length: the body is counted as it arrives
            for _ in range(20):
                yield b"x" * 100_000

        async with http.post(url, data=chunks(), headers=KEY) as r:
            assert r.status == 413
            assert rest_error_info(await r.json())["reason"] == REQUEST_TOO_LARGE
        async with http.post(url, json=classify_body(sample_png), headers=KEY) as r:
            assert r.status == 200  # under the limit still passes
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            request = pb.ClassifyImageRequest(image=common_pb2.Image(data=b"0" * 1_200_000))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(request, metadata=auth())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = grpc_error_info(err.value)
            assert (info.reason, info.domain) == (REQUEST_TOO_LARGE, "cxr.platform")


async def test_request_size_limit_on_grpc_streams():
    """A server-streaming call goes through the proxy's stream path: its request bytes are limited too."""

    def one_megabyte(kong: kong_model.KongConfig) -> None:
        global_plugin(kong, "request-size-limiting").config.allowed_payload_size = 1

    s = make_settings()
    async with running_server(s, rag_binding()) as be, running_gateway({"rag": be.port}, one_megabyte) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = rag_grpc.RagServiceStub(ch)
            big = rag_pb.StreamAnswerRequest(question="x " * 600_000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.StreamAnswer(big, metadata=auth())]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = grpc_error_info(err.value)
            assert (info.reason, info.domain) == (REQUEST_TOO_LARGE, "cxr.platform")
            small = [m async for m in stub.StreamAnswer(rag_pb.StreamAnswerRequest(question="a b"), metadata=auth())]
            assert small[-1].finish_reason == "stop"  # under the limit still passes


async def test_grpc_proxy_forwards_status_details_metadata_and_deadline(sample_png):
    async with toy_backend(BrightnessModel(delay_s=1.0)) as be, running_gateway({"classification": be.port}) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            call = stub.ListModels(pb.ListModelsRequest(), metadata=(*auth(), ("x-correlation-id", "grpc-cid-1")))
            assert (await call).models[0].name == "toy"
            initial = dict(await call.initial_metadata())
            assert initial["x-correlation-id"] == "grpc-cid-1"
            assert initial["ratelimit-limit"] == "100"
            bad = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png, content_type="image/png"))
            bad.model_names.append("bad")
            call = stub.ClassifyImage(bad, metadata=auth())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(err.value)
            assert status is not None and error_info(status).domain == "cxr.platform"
            # the client's deadline reaches the backend (whose model takes 1 s)
            t0 = time.perf_counter()
            req = pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png, content_type="image/png"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ClassifyImage(req, metadata=auth(), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.perf_counter() - t0 < 0.9


async def test_grpc_bidi_stream_through_proxy():
    """Reflection's ServerReflectionInfo is a bidi stream: several requests, one answer each."""

    def reflection_route(kong: kong_model.KongConfig) -> None:
        svc = kong.service("classification")
        svc.routes.append(
            kong_model.Route(
                name="classification-reflection",
                protocols=["grpc"],
                paths=["/grpc.reflection.v1alpha.ServerReflection/"],
                strip_path=False,
            )
        )

    async with toy_backend() as be, running_gateway({"classification": be.port}, reflection_route) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def requests():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=pb.DESCRIPTOR.package + ".Finding")
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            answers = [r async for r in stub.ServerReflectionInfo(requests(), metadata=auth())]
        assert len(answers) == 3
        names = {s.name for s in answers[0].list_services_response.service}
        assert "cxr.classification.v1.ClassificationService" in names
        assert answers[1].file_descriptor_response.file_descriptor_proto


async def test_server_streaming_rest_ndjson_and_grpc(http):
    s = make_settings()
    async with running_server(s, rag_binding()) as be, running_gateway({"rag": be.port}) as gw:
        async with http.post(
            f"{rest(gw)}/v1/rag:streamAnswer", json={"question": "heart is enlarged"}, headers=KEY
        ) as r:
            assert r.status == 200
            lines = [ln for ln in (await r.read()).decode().splitlines() if ln]
        msgs = [json.loads(ln) for ln in lines]
        assert msgs[0]["result"]["passages"][0]["id"] == "p1"
        assert "".join(m["result"]["text_delta"] for m in msgs[1:-1]) == "heartisenlarged"
        assert msgs[-1]["result"]["finish_reason"] == "stop"
        async with http.post(f"{rest(gw)}/v1/rag:streamAnswer", json={"question": "fail midway"}, headers=KEY) as r:
            msgs = [json.loads(ln) for ln in (await r.read()).decode().splitlines() if ln]
        assert msgs[-1]["error"]["code"] == 14 and "llm went away" in msgs[-1]["error"]["message"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stream = rag_grpc.RagServiceStub(ch).StreamAnswer(
                rag_pb.StreamAnswerRequest(question="a b c"), metadata=auth()
            )
            got = [m async for m in stream]
        assert [m.text_delta for m in got[1:-1]] == ["a", "b", "c"] and got[-1].finish_reason == "stop"


async def test_backend_down_503_then_recovery(http):
    def fast_checks(kong: kong_model.KongConfig) -> None:
        hc = kong.upstream("classification.upstream").healthchecks
        hc.active.healthy.interval = 0.2
        hc.active.unhealthy.interval = 0.2
        hc.active.unhealthy.tcp_failures = 1
        hc.active.healthy.successes = 1
        hc.active.timeout = 0.5

    port = free_port()
    async with running_gateway({"classification": port}, fast_checks) as gw:
        url = f"{rest(gw)}/v1/classification/models"
        async with toy_backend(port=port):
            async with http.get(url, headers=KEY) as r:
                assert r.status == 200
        async with http.get(url, headers=KEY) as r:
            assert r.status == 503
            body = await r.json()
        assert body["code"] == 14 and "classification" in body["message"] and "unavailable" in body["message"]
        await asyncio.sleep(0.6)  # active checks mark the target unhealthy: fail fast, same clear body
        async with http.get(url, headers=KEY) as r:
            assert r.status == 503
            assert "no healthy target" in (await r.json())["message"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        async with toy_backend(port=port):
            deadline = time.monotonic() + 10
            status = 0
            while time.monotonic() < deadline:
                async with http.get(url, headers=KEY) as r:
                    status = r.status
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200


async def test_openapi_and_metrics_endpoints(http):
    async with toy_backend() as be, running_gateway({"classification": be.port}) as gw:
        async with http.get(f"{rest(gw)}/openapi.json") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["openapi"].startswith("3.")
        assert "post" in doc["paths"]["/v1/classification/models/{model_name}:load"]
        async with http.get(f"{rest(gw)}/v1/classification/models", headers=KEY) as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{gw.ports.status}/metrics") as r:
            text = await r.text()
        wanted = ('service="classification"', 'route="classification-rest-list-models"', 'code="200"')
        lines = [ln for ln in text.splitlines() if ln.startswith("kong_http_requests_total{")]
        assert any(all(w in ln for w in wanted) and 'consumer="cxr-client"' in ln for ln in lines), lines
        assert "kong_upstream_target_health" in text
        async with http.get(f"http://127.0.0.1:{gw.ports.status}/status") as r:
            status = await r.json()
        assert "stand-in" in status["server"]
        assert status["backends"]["classification"] == [
            {"target": f"127.0.0.1:{be.port}", "healthy": True, "error": ""}
        ]


async def test_tls_to_backend_with_grpcs(tmp_path, monkeypatch, sample_png, http):
    ca, cert, key = self_signed_ca_and_server(tmp_path)
    monkeypatch.setenv("CXR_GATEWAY_BACKEND_CA_FILE", str(ca))
    s = make_settings(security__tls={"enabled": True, "cert_file": str(cert), "key_file": str(key)})
    async with running_server(s, build_toy(s)) as be:
        async with running_gateway({"classification": be.port}, protocol="grpc") as gw:  # plaintext to a TLS port
            async with http.get(f"{rest(gw)}/v1/classification/models", headers=KEY) as r:
                assert r.status == 503
        async with running_gateway({"classification": be.port}, protocol="grpcs") as gw:
            async with http.post(
                f"{rest(gw)}/v1/classification:classifyImage", json=classify_body(sample_png), headers=KEY
            ) as r:
                assert r.status == 200, await r.text()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
                models = await pb_grpc.ClassificationServiceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth())
                assert models.models[0].name == "toy"


async def test_headers_forwarded_to_backend_as_metadata(http):
    s = make_settings()
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with running_server(s, rag_binding()) as be, running_gateway({"rag": be.port}) as gw:
        headers = {**KEY, "traceparent": trace, "X-Correlation-ID": "cid-42", "Cookie": "secret=1"}
        async with http.post(
            f"{rest(gw)}/v1/rag:streamAnswer", json={"question": "echo metadata"}, headers=headers
        ) as r:
            got = dict(
                json.loads(ln)["result"]["text_delta"].split("=", 1) for ln in (await r.read()).decode().splitlines()
            )
        assert got["traceparent"] == trace and got["x-correlation-id"] == "cid-42"
        assert got["apikey"] == TEST_KEY  # hide_credentials: false, the service checks the key too
        assert "cookie" not in got
        assert (got["x-consumer-username"], got["x-consumer-groups"]) == ("cxr-client", "inference")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            md = (*auth(), ("traceparent", trace), ("custom-header", "v"), ("x-consumer-groups", "admin"))
            stream = rag_grpc.RagServiceStub(ch).StreamAnswer(
                rag_pb.StreamAnswerRequest(question="echo metadata"), metadata=md
            )
            pairs = [tuple(m.text_delta.split("=", 1)) async for m in stream]
        got = dict(pairs)
        assert got["traceparent"] == trace and got["custom-header"] == "v" and got["x-api-key"] == TEST_KEY
        # Kong's identity headers: set by the gateway, a client's own value never passes
        assert [v for k, v in pairs if k == "x-consumer-groups"] == ["inference"]
        assert [v for k, v in pairs if k == "x-consumer-username"] == ["cxr-client"]
        assert len(got["x-correlation-id"]) == 36  # generated by the gateway


async def test_retries_move_to_the_next_target_on_connection_failure(http):
    dead = free_port()

    def two_targets(kong: kong_model.KongConfig) -> None:
        up = kong.upstream("classification.upstream")
        live = up.targets[0].target
        up.targets = [kong_model.Target(target=f"127.0.0.1:{dead}"), kong_model.Target(target=live)]
        up.healthchecks.active.healthy.interval = 0  # no active checks: only retries can save a request
        up.healthchecks.active.unhealthy.interval = 0
        up.healthchecks.passive.unhealthy.tcp_failures = 0

    async with toy_backend() as be, running_gateway({"classification": be.port}, two_targets) as gw:
        statuses = []
        for _ in range(4):  # round-robin: every other first attempt hits the dead target
            async with http.get(f"{rest(gw)}/v1/classification/models", headers=KEY) as r:
                statuses.append(r.status)
        assert statuses == [200] * 4
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            for _ in range(4):
                assert (await stub.ListModels(pb.ListModelsRequest(), metadata=auth())).models

    def no_retries(kong: kong_model.KongConfig) -> None:
        two_targets(kong)
        kong.service("classification").retries = 0

    async with toy_backend() as be, running_gateway({"classification": be.port}, no_retries) as gw:
        statuses = []
        for _ in range(4):
            async with http.get(f"{rest(gw)}/v1/classification/models", headers=KEY) as r:
                statuses.append(r.status)
        assert sorted(statuses) == [200, 200, 503, 503]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            codes = []
            for _ in range(4):
                try:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=auth())
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
            assert codes.count(grpc.StatusCode.UNAVAILABLE) == 2


CLIENT_HOST = "127.0.0.2"  # the caller's own address: loopback, but not the gateway's (trusted) 127.0.0.1


@contextlib.asynccontextmanager
async def relay_from(source: str, port: int):
    """A TCP relay on 127.0.0.1 that connects to `port` from `source`, so a gRPC client (which cannot
    choose its source address) reaches the gateway as a caller on `source`."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def list_models_via_gateway(gw, relay_port: int, headers: dict) -> tuple[int, dict, grpc.aio.AioRpcError | None]:
    """ListModels from CLIENT_HOST through the REST front and through the gRPC proxy: (HTTP status, JSON body,
    the gRPC error or None)."""
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_HOST, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{rest(gw)}/v1/classification/models", headers={**KEY, **headers}) as r:
            status, body = r.status, await r.json()
    metadata = (*auth(), *((k.lower(), v) for k, v in headers.items()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as ch:
        try:
            await pb_grpc.ClassificationServiceStub(ch).ListModels(
                pb.ListModelsRequest(), metadata=metadata, timeout=10
            )
            err = None
        except grpc.aio.AioRpcError as e:
            err = e
    return status, body, err


async def test_forwarded_for_cannot_spoof_the_allow_list():
    """A service behind the gateway (trusted_proxies = the gateway) judges the caller's real address, which the
    gateway appends to X-Forwarded-For as Kong does, not the address the caller claims in its own header."""
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    denied = make_settings(security__allowed_ips=["203.0.113.0/24"], security__trusted_proxies=["127.0.0.1/32"])
    async with toy_backend_with(denied) as be, running_gateway({"classification": be.port}) as gw:
        async with relay_from(CLIENT_HOST, gw.ports.grpc) as relay:
            status, body, err = await list_models_via_gateway(gw, relay, spoof)
    assert status == 403 and rest_error_info(body)["reason"] == "IP_NOT_ALLOWED", body
    assert CLIENT_HOST in body["message"], body
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert grpc_error_info(err).reason == "IP_NOT_ALLOWED" and CLIENT_HOST in (err.details() or "")

    allowed = make_settings(security__allowed_ips=[f"{CLIENT_HOST}/32"], security__trusted_proxies=["127.0.0.1/32"])
    async with toy_backend_with(allowed) as be, running_gateway({"classification": be.port}) as gw:
        async with relay_from(CLIENT_HOST, gw.ports.grpc) as relay:
            for headers in ({}, spoof):
                status, body, err = await list_models_via_gateway(gw, relay, headers)
                assert status == 200 and body["models"][0]["name"] == "toy", (headers, body)
                assert err is None, (headers, err)
