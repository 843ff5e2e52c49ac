"""The one image input policy and the decoder's error contract, at the RPC level on the real
classification and segmentation services (small untrained CPU models, in-process grpc.aio server
and an aio client on the same loop):

- a 16x16 and a 2000x100 PNG are INVALID_ARGUMENT with the same reason on both services, a NIH
  radiograph passes (security.min_image_side / max_image_aspect_ratio apply to every service);
- a known-corrupt image is INVALID_ARGUMENT IMAGE_CORRUPT, while a defect inside the decoder (an
  injected KeyError/AssertionError) is INTERNAL with a correlation id in the trailing metadata and an
  ERROR log line that carries the same id."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status
from PIL import Image

from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from tests.support.paths import DICOM_DIR, cxr14_images
from tests.support.servers import auth, running_server
from tests.support.targets import Target, classification, segmentation

TARGETS = {"classification": classification, "segmentation": segmentation}


def png(shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=sorted(TARGETS))
async def served(request) -> AsyncIterator[tuple[Target, grpc.aio.Channel]]:
    target: Target = TARGETS[request.param]()
    settings = target.settings()
    async with (
        running_server(settings, target.build(settings)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        yield target, ch


async def call(target: Target, ch: grpc.aio.Channel, data: bytes, cid: str = "") -> grpc.aio.AioRpcError | None:
    c = target.valid(data, "")
    md = (*auth(), ("x-correlation-id", cid)) if cid else auth()
    try:
        await getattr(target.stub(ch), c.method)(c.request, metadata=md, timeout=60)
    except grpc.aio.AioRpcError as err:
        return err
    return None


def reason(err: grpc.aio.AioRpcError) -> str:
    info = error_info(rpc_status.from_call(err))
    return info.reason if info else ""


async def trailing(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}


@pytest.mark.parametrize(
    ("shape", "want"),
    [((16, 16), "IMAGE_TOO_SMALL"), ((100, 2000), "IMAGE_ASPECT_RATIO"), ((2000, 100), "IMAGE_ASPECT_RATIO")],
    ids=["16x16", "2000x100", "100x2000"],
)
async def test_every_image_service_applies_the_same_input_policy(served, shape, want):
    target, ch = served
    err = await call(target, ch, png(shape))
    assert err is not None, f"{target.name} accepted a {shape[1]}x{shape[0]} image"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (target.name, err.code(), err.details())
    assert reason(err) == want, (target.name, err.details())
    assert "security." in (err.details() or "")  # names the setting to change
    assert await call(target, ch, cxr14_images(1)[0].read_bytes()) is None  # a real radiograph passes


async def test_known_corrupt_image_is_image_corrupt(served):
    target, ch = served
    good = cxr14_images(1)[0].read_bytes()
    err = await call(target, ch, good[: len(good) // 3])  # a truncated NIH PNG
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(err) == "IMAGE_CORRUPT", err.details()


@pytest.mark.parametrize(
    ("where", "exc", "image"),
    [
        ("PIL.Image.open", KeyError, "png"),  # inside the Pillow call: not one of Pillow's bad-data errors
        ("cxr_serving.dicom._dicom_spacing", AssertionError, "dcm"),  # our own step inside the DICOM path
    ],
)
async def test_a_decoder_defect_is_internal_with_a_logged_correlation_id(
    served, monkeypatch, caplog, where, exc, image
):
    target, ch = served
    data = cxr14_images(1)[0].read_bytes() if image == "png" else (DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes()

    def broken(*args, **kwargs):
        raise exc("injected decoder defect")

    monkeypatch.setattr(where, broken)
    cid = f"decoder-defect-{target.name}-{image}"
    with caplog.at_level(logging.ERROR):
        err = await call(target, ch, data, cid)
    assert err is not None and err.code() == grpc.StatusCode.INTERNAL, (err and err.code(), err and err.details())
    assert reason(err) == "INTERNAL"
    assert (await trailing(err)).get("x-correlation-id") == cid
    assert cid in (err.details() or "")
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR and cid in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert lines[0].exc_info and lines[0].exc_info[0] is exc  # the traceback of the defect is in the log


async def test_a_decoder_defect_in_a_batch_item_is_logged_with_the_correlation_id(monkeypatch, caplog):
    """ClassifyImages answers per image: the defective item is INTERNAL with the id, and logged."""
    target = classification()
    settings = target.settings()
    good = cxr14_images(1)[0].read_bytes()

    def broken(*args, **kwargs):
        raise KeyError("injected decoder defect")

    async with (
        running_server(settings, target.build(settings)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        monkeypatch.setattr("cxr_serving.dicom._dicom_spacing", broken)
        dcm = (DICOM_DIR / "nih-dx-mono2-8bit.dcm").read_bytes()
        req = cls_pb.ClassifyImagesRequest(images=[common_pb2.Image(data=good), common_pb2.Image(data=dcm)])
        cid = "decoder-defect-batch"
        with caplog.at_level(logging.ERROR):
            resp = await target.stub(ch).ClassifyImages(req, metadata=(*auth(), ("x-correlation-id", cid)), timeout=60)
    by_index = {r.index: r for r in resp.results}
    assert not by_index[0].HasField("error") and by_index[0].predictions  # the PNG is unaffected
    assert by_index[1].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert cid in by_index[1].error.message
    assert any(r.levelno >= logging.ERROR and cid in r.getMessage() for r in caplog.records)
