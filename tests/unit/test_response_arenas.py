"""Classification and segmentation responses are written in place, part by part, into the response message.

Each message built on its own is a protobuf arena whose blocks, once freed, count toward upb's periodic
`malloc_trim` (docs/serving-runtime.md); so the constructors of the parts are made to raise here, and every
response must still come out whole. The batch and stream RPCs also write each image as soon as it is classified:
a decoded image does not outlive its own classification, and a failure while writing one image's result is that
image's error, not the call's. The classifier here is a stand-in (an async function returning real result
objects); the servicer, the messages and the fill code are the real ones.
"""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from cxr_classification.model import Calibration, FindingResult
from cxr_classification.pipeline import Classification, ModelResult
from cxr_classification.servicer import ClassificationServicer
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_segmentation.masks import BoundingBox
from cxr_segmentation.measurements import CardiothoracicRatio
from cxr_segmentation.postprocess import ClassMask, SegmentationResult
from cxr_segmentation.servicer import fill_response
from cxr_serving.images import SPACING_PIXEL, DecodedImage
from cxr_serving.lifecycle import ModelState, ModelStatus
from cxr_serving.model_admin import ModelAdmin
from cxr_serving.proto_convert import fill_image_metadata

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion")
STATUS = ModelStatus(
    "multiclass_classifier", ModelState.READY, version="v3", untrained=True, architecture="densenet121",
    labels=list(LABELS), device="cpu", memory={"cpu": 1234},
)  # fmt: skip


def image() -> DecodedImage:
    return DecodedImage(np.zeros((64, 80), np.uint8), "png", 8, (0.5, 0.25), "MONOCHROME2")


def classification(calibration: Any = Calibration.OPERATING_POINT) -> Classification:
    findings = [FindingResult(label, 0.25 * (i + 1), 0.5, i == 2, calibration) for i, label in enumerate(LABELS)]
    return Classification(image(), [ModelResult(STATUS.name, findings, 0.012, STATUS)], 0.001, 0.002, 0.003, 0.004)


@pytest.fixture
def no_standalone_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructing a part of a response on its own raises; adding it into the response does not."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a response part was built as a message of its own")

    for module, names in (
        (pb, ("Finding", "ModelPrediction", "Timing", "ImageClassification")),
        (common_pb2, ("ModelInfo", "ImageMetadata")),
        (seg_pb, ("AnatomyMask", "BoundingBox", "Measurements", "RunLengthMask")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


class Selection:
    """The servicer's use of its classifiers for a batch: which models, which heatmaps."""

    def select(self, requested: object, model_version: str = "") -> tuple[list[str], dict[str, str]]:
        return [STATUS.name], {}

    def heatmaps_by_model(self, names: list[str], labels: object, images: int = 1) -> dict[str, tuple[str, ...]]:
        return {n: () for n in names}


@dataclass
class Deadline:
    def time_remaining(self) -> float | None:
        return None


def servicer(classify: Any) -> ClassificationServicer:
    s = ClassificationServicer.__new__(ClassificationServicer)
    s.admin = ModelAdmin(None, None, rest_prefix="/v1/classification")  # type: ignore[arg-type]
    s.classifiers = Selection()  # type: ignore[assignment]
    s.max_in_flight = 4
    s.classify = classify  # type: ignore[method-assign]
    return s


def check_prediction(prediction: pb.ModelPrediction) -> None:
    assert prediction.model.name == STATUS.name and prediction.model.version == "v3"
    assert prediction.model.model_card == "/v1/classification/models/multiclass_classifier@v3/card"
    assert list(prediction.model.labels) == list(LABELS) and prediction.model.memory_cpu_bytes == 1234
    assert [f.label for f in prediction.findings] == list(LABELS)
    assert [f.probability for f in prediction.findings] == [0.25, 0.5, 0.75]
    assert [f.positive for f in prediction.findings] == [False, False, True]
    assert {f.calibration for f in prediction.findings} == {pb.CALIBRATION_OPERATING_POINT}
    assert prediction.inference_ms == 12.0


def test_a_classification_response_is_written_in_place(no_standalone_parts: None) -> None:
    response = pb.ClassifyImageResponse()
    response.untrained = servicer(None)._fill(response, classification())
    assert response.untrained
    check_prediction(response.predictions[0])
    assert (response.image.width, response.image.height, response.image.format) == (80, 64, "png")
    assert (response.image.pixel_spacing_row_mm, response.image.pixel_spacing_column_mm) == (0.5, 0.25)
    assert (response.timing.decode_ms, response.timing.total_ms) == (1.0, 4.0)


def test_a_segmentation_response_is_written_in_place(no_standalone_parts: None) -> None:
    mask = ClassMask("heart", 80, 64, 12, 3.0, BoundingBox(1, 2, 3, 4), b"png", [64, 80], [0, 12])
    result = SegmentationResult([mask], CardiothoracicRatio(), spacing_source=SPACING_PIXEL)
    response = seg_pb.SegmentImageResponse()
    ModelAdmin(None, None, rest_prefix="/v1/segmentation").fill_info(response.model, STATUS)  # type: ignore[arg-type]
    fill_image_metadata(response.image, image())
    fill_response(response, result)
    assert response.model.model_card == "/v1/segmentation/models/multiclass_classifier@v3/card"
    assert response.untrained and response.image.width == 80
    got = response.masks[0]
    assert (got.label, got.width, got.height, got.png, got.area_pixels, got.area_mm2) == (
        "heart",
        80,
        64,
        b"png",
        12,
        3,
    )
    assert list(got.rle.size) == [64, 80] and list(got.rle.counts) == [0, 12]
    assert (got.bounding_box.x_min, got.bounding_box.y_max) == (1, 4)
    assert response.spacing_source == seg_pb.SPACING_SOURCE_PIXEL_SPACING and response.HasField("measurements")


def batch_request(n: int) -> pb.ClassifyImagesRequest:
    return pb.ClassifyImagesRequest(images=[common_pb2.Image(data=bytes([i])) for i in range(n)])


async def stream(s: ClassificationServicer, n: int) -> list[pb.StreamClassifyImagesResponse]:
    request = pb.StreamClassifyImagesRequest(images=batch_request(n).images)
    return [r async for r in s.StreamClassifyImages(request, Deadline())]  # type: ignore[arg-type]


def reverse_order() -> Any:
    """A classifier whose images finish last first: each waits for the one after it."""
    done = [asyncio.Event() for _ in range(3)]

    async def classify(img: common_pb2.Image, *_args: object) -> Classification:
        index = img.data[0]
        if index < 2:
            await asyncio.wait_for(done[index + 1].wait(), 5)
        done[index].set()
        return classification()

    return classify


async def test_batch_and_stream_write_each_image_in_place(no_standalone_parts: None) -> None:
    batch = await servicer(reverse_order()).ClassifyImages(batch_request(3), Deadline())  # type: ignore[arg-type]
    assert batch.untrained and [r.index for r in batch.results] == [0, 1, 2]
    for r in batch.results:
        check_prediction(r.predictions[0])
    streamed = await stream(servicer(reverse_order()), 3)
    assert [r.result.index for r in streamed] == [2, 1, 0] and all(r.untrained for r in streamed)
    for r in streamed:
        check_prediction(r.result.predictions[0])


@pytest.mark.parametrize("where", ["findings", "image metadata"])
async def test_a_failure_writing_one_result_is_that_images_error(where: str, caplog: pytest.LogCaptureFixture) -> None:
    """Image 1's result fails half-way through being written (an unknown calibration, or after its predictions, an
    image whose metadata cannot be set): image 1 is INTERNAL with nothing of it left, logged; 0 and 2 are whole."""

    async def classify(img: common_pb2.Image, *_args: object) -> Classification:
        if img.data[0] != 1:
            return classification()
        if where == "findings":
            return classification(calibration="not a calibration")
        c = classification()
        c.image.photometric_interpretation = 12  # type: ignore[assignment]  # not a str: fails in the metadata
        return c

    s = servicer(classify)
    with caplog.at_level("ERROR"):
        batch = await s.ClassifyImages(batch_request(3), Deadline())  # type: ignore[arg-type]
    bad = batch.results[1]
    assert bad.index == 1 and bad.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert not bad.predictions and not bad.HasField("image") and not bad.HasField("timing")  # nothing half-written
    assert [len(r.predictions) for r in batch.results] == [1, 0, 1]
    assert any(r.levelname == "ERROR" for r in caplog.records), caplog.text
    streamed = {r.result.index: r.result for r in await stream(s, 3)}
    assert streamed[1].error.code == grpc.StatusCode.INTERNAL.value[0] and not streamed[1].predictions
    assert not streamed[1].HasField("image")
    assert len(streamed[0].predictions) == len(streamed[2].predictions) == 1


@pytest.mark.parametrize("rpc", ["ClassifyImages", "StreamClassifyImages"])
async def test_no_decoded_image_outlives_its_own_classification(rpc: str) -> None:
    """While image 1 of a batch or stream is still being classified, image 0's decoded pixels are already freed."""
    release = asyncio.Event()
    decoded: dict[int, weakref.ref[DecodedImage]] = {}

    async def classify(img: common_pb2.Image, *_args: object) -> Classification:
        index = img.data[0]
        c = classification()
        decoded[index] = weakref.ref(c.image)
        if index == 1:
            await release.wait()
        return c

    s = servicer(classify)
    if rpc == "ClassifyImages":
        call = asyncio.ensure_future(s.ClassifyImages(batch_request(2), Deadline()))  # type: ignore[arg-type]
    else:
        call = asyncio.ensure_future(stream(s, 2))
    for _ in range(100):  # bounded: until image 0 is written and image 1 waits
        await asyncio.sleep(0.001)
        if len(decoded) == 2:
            break
    gc.collect()
    assert decoded[0]() is None, "image 0's decoded pixels are still held while image 1 is classified"
    assert decoded[1]() is not None
    release.set()
    done = await asyncio.wait_for(call, 5)
    results = done.results if rpc == "ClassifyImages" else [r.result for r in done]
    assert sorted(len(r.predictions) for r in results) == [1, 1]
    assert not math.isnan(results[0].predictions[0].findings[0].threshold)
