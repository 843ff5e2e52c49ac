"""REST and gRPC through the Kong stand-in to the three real services (classification,
segmentation, rag in extractive mode), started once per test process by tests/support/client_stack.py."""

from __future__ import annotations

import base64
import json

import aiohttp
import grpc
import pytest

from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rag_grpc
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc
from tests.support.client_stack import POSITIVE, get_stack, stack_question
from tests.support.gateway_helpers import running_gateway
from tests.support.paths import cxr14_images, dicom_files
from tests.support.servers import TEST_KEY, auth

KEY = {"apikey": TEST_KEY}
pytestmark = pytest.mark.slow  # starts the real stack (shared with the other e2e tests)


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


@pytest.fixture
async def gw(stack):
    async with running_gateway(stack.ports) as gateway:
        yield gateway


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def image_json(data: bytes, content_type: str) -> dict:
    return {"data": base64.b64encode(data).decode(), "contentType": content_type}


async def test_rest_classification_and_segmentation(gw, http):
    base = f"http://127.0.0.1:{gw.ports.rest}"
    png = cxr14_images(1)[0].read_bytes()
    async with http.post(
        f"{base}/v1/classification:classifyImage", json={"image": image_json(png, "image/png")}, headers=KEY
    ) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    names = {p["model"]["name"] for p in body["predictions"]}
    assert names == {"binary_classifier", "multiclass_classifier"}
    multi = next(p for p in body["predictions"] if p["model"]["name"] == "multiclass_classifier")
    assert [f["label"] for f in multi["findings"] if f["positive"]] == [POSITIVE]
    assert body["untrained"] is True and body["image"]["format"] == "png"

    dcm = dicom_files()[0].read_bytes()
    async with http.post(
        f"{base}/v1/segmentation:segmentImage",
        json={"image": image_json(dcm, "application/dicom"), "maskEncoding": "MASK_ENCODING_RLE"},
        headers=KEY,
    ) as r:
        assert r.status == 200, await r.text()
        seg = await r.json()
    assert seg["model"]["name"] == "segmentation" and seg["masks"]
    assert seg["masks"][0]["rle"]["counts"] and seg["image"]["format"] == "dcm"

    async with http.get(f"{base}/v1/segmentation/models", headers=KEY) as r:
        assert r.status == 200 and (await r.json())["models"][0]["name"] == "segmentation"
    # a bad image reaches the service and comes back as grpc-gateway's 400 with the ErrorInfo reason
    async with http.post(
        f"{base}/v1/classification:classifyImage", json={"image": image_json(b"junk", "image/png")}, headers=KEY
    ) as r:
        assert r.status == 400
        err = await r.json()
    assert err["code"] == 3 and err["details"][0]["domain"] == "cxr.platform" and err["details"][0]["reason"]


async def test_rest_rag_search_answer_and_stream(gw, http):
    base = f"http://127.0.0.1:{gw.ports.rest}"
    async with http.post(
        f"{base}/v1/rag:searchLiterature", json={"query": "pleural effusion", "topK": 2}, headers=KEY
    ) as r:
        assert r.status == 200, await r.text()
        assert len((await r.json())["passages"]) == 2
    async with http.post(
        f"{base}/v1/rag:answerQuestion", json={"question": stack_question(), "topK": 2}, headers=KEY
    ) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["answer"] and answer["citations"]
    async with http.post(
        f"{base}/v1/rag:streamAnswer", json={"question": stack_question(), "topK": 2}, headers=KEY
    ) as r:
        assert r.status == 200
        lines = [json.loads(ln) for ln in (await r.read()).decode().splitlines() if ln.strip()]
    assert lines and all("result" in ln for ln in lines)
    assert any(ln["result"].get("finish_reason") for ln in lines)


async def test_grpc_through_proxy_to_each_service(gw):
    png = cxr14_images(1)[0].read_bytes()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
        models = await cls_grpc.ClassificationServiceStub(ch).ListModels(cls_pb.ListModelsRequest(), metadata=auth())
        assert {m.name for m in models.models} == {"binary_classifier", "multiclass_classifier"}
        seg = await seg_grpc.SegmentationServiceStub(ch).ListModels(seg_pb.ListModelsRequest(), metadata=auth())
        assert seg.models[0].name == "segmentation"
        # server streaming (gRPC only, no REST binding)
        req = cls_pb.StreamClassifyImagesRequest(
            images=[common_pb2.Image(data=png, content_type="image/png")] * 2, model_names=["multiclass_classifier"]
        )
        got = [m async for m in cls_grpc.ClassificationServiceStub(ch).StreamClassifyImages(req, metadata=auth())]
        assert sorted(m.result.index for m in got) == [0, 1]
        stream = rag_grpc.RagServiceStub(ch).StreamAnswer(
            rag_pb.StreamAnswerRequest(question=stack_question(), top_k=2), metadata=auth()
        )
        parts = [m async for m in stream]
        assert parts and any(p.finish_reason for p in parts)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await seg_grpc.SegmentationServiceStub(ch).ListModels(seg_pb.ListModelsRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
