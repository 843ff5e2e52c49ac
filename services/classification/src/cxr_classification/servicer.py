"""gRPC adapter of the classification service: protos in, the classifiers (pipeline.py), protos out.

Errors are domain errors; the runtime's interceptor maps them (per-image errors of batch calls
become google.rpc.Status).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from cxr_classification.model import Calibration, ChestXrayClassifier
from cxr_classification.pipeline import Classification, Classifiers
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import InvalidInputError
from cxr_serving.grpc_errors import rpc_status_from_error
from cxr_serving.images import DecodePool
from cxr_serving.lifecycle import ModelRepository
from cxr_serving.model_admin import ModelAdmin, ModelAdminRpcs
from cxr_serving.proto_convert import fill_image_metadata, urgency
from cxr_serving.urgency import ROUTINE, Urgency

Context = grpc.aio.ServicerContext[Any, Any]
MAX_IMAGES_PER_REQUEST = 128
CALIBRATION = {
    Calibration.RAW: pb.CALIBRATION_RAW,
    Calibration.OPERATING_POINT: pb.CALIBRATION_OPERATING_POINT,
    Calibration.NO_OPERATING_POINT: pb.CALIBRATION_NO_OPERATING_POINT,
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class ClassificationServicer(ModelAdminRpcs, pb_grpc.ClassificationServiceServicer):  # type: ignore[misc]
    admin_messages = pb

    def __init__(
        self,
        repo: ModelRepository,
        models: dict[str, ChestXrayClassifier],
        pool: DecodePool,
        *,
        models_path: Path | None = None,
        max_in_flight_per_request: int = 16,
    ) -> None:
        self.repo = repo
        self.classifiers = Classifiers(repo, models, pool)
        self.admin = ModelAdmin(repo, models_path, rest_prefix="/v1/classification")
        self.max_in_flight = max_in_flight_per_request

    def _fill(self, target: pb.ClassifyImageResponse | pb.ImageClassification, c: Classification) -> bool:
        """One image's result written into `target` (every part in the response's own message arena);
        whether a model that answered is untrained."""
        untrained = False
        for result in c.results:
            prediction = target.predictions.add(inference_ms=_ms(result.seconds))
            self.admin.fill_info(prediction.model, result.status)
            untrained = untrained or result.status.untrained
            add = prediction.findings.add
            for f in result.findings:
                add(
                    label=f.label,
                    probability=f.probability,
                    threshold=f.threshold,
                    positive=f.positive,
                    heatmap_png=f.heatmap_png,
                    calibration=CALIBRATION[f.calibration],
                )
        fill_image_metadata(target.image, c.image)
        timing = target.timing
        timing.decode_ms = _ms(c.decode_s)
        timing.preprocess_ms = _ms(c.preprocess_s)
        timing.inference_ms = _ms(c.inference_s)
        timing.total_ms = _ms(c.total_s)
        return untrained

    async def classify(
        self,
        image: common_pb2.Image,
        names: list[str],
        heatmaps: dict[str, tuple[str, ...]],
        versions: dict[str, str] | None = None,
        how_urgent: Urgency = ROUTINE,
    ) -> Classification:
        return await self.classifiers.classify(image.data, image.content_type, names, heatmaps, versions, how_urgent)

    async def _classify_many(
        self,
        request: pb.ClassifyImagesRequest | pb.StreamClassifyImagesRequest,
        context: Context,
        slot: Callable[[int], pb.ImageClassification],
    ) -> AsyncGenerator[tuple[int, bool], None]:
        """Classify every image (bounded concurrency), each written into `slot(index)` (a part of the caller's
        response) as soon as it finishes, so that no decoded image outlives its own classification; yields
        (index, untrained) as each finishes."""
        images, how_urgent = request.images, urgency(request.priority, context)
        if not images:
            raise InvalidInputError("images is empty: send at least one image", reason="NO_IMAGES")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise InvalidInputError(
                f"{len(images)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}: split the request",
                reason="TOO_MANY_IMAGES",
            )
        names, versions = self.classifiers.select(request.model_names, request.model_version)
        heatmaps = self.classifiers.heatmaps_by_model(names, request.heatmap_labels, len(images))
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(index: int, image: common_pb2.Image) -> tuple[int, bool]:
            target = slot(index)
            try:
                async with gate:
                    c = await self.classify(image, names, heatmaps, versions, how_urgent)
                return index, self._fill(target, c)
            except Exception as exc:  # each image fails on its own, a half-written result included
                target.Clear()
                target.index = index
                target.error.CopyFrom(rpc_status_from_error(exc))
                return index, False

        tasks = [asyncio.ensure_future(one(i, img)) for i, img in enumerate(images)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for t in tasks:
                t.cancel()

    # -- RPCs ------------------------------------------------------------------------------------
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context: Context) -> pb.ClassifyImageResponse:
        names, versions = self.classifiers.select(request.model_names, request.model_version)
        heatmaps = self.classifiers.heatmaps_by_model(names, request.heatmap_labels)
        c = await self.classify(request.image, names, heatmaps, versions, urgency(request.priority, context))
        response = pb.ClassifyImageResponse()
        response.untrained = self._fill(response, c)
        return response

    async def ClassifyImages(self, request: pb.ClassifyImagesRequest, context: Context) -> pb.ClassifyImagesResponse:
        response = pb.ClassifyImagesResponse()
        results = response.results

        def slot(index: int) -> pb.ImageClassification:
            while len(results) <= index:  # in index order, whichever image starts first
                results.add(index=len(results))
            return results[index]

        outcomes = self._classify_many(request, context, slot)
        async with contextlib.aclosing(outcomes):  # the images' tasks end with the call, not with the collector
            async for _index, untrained in outcomes:
                response.untrained = response.untrained or untrained
        return response

    async def StreamClassifyImages(
        self, request: pb.StreamClassifyImagesRequest, context: Context
    ) -> AsyncIterator[pb.StreamClassifyImagesResponse]:
        pending: dict[int, pb.StreamClassifyImagesResponse] = {}

        def slot(index: int) -> pb.ImageClassification:
            response = pending[index] = pb.StreamClassifyImagesResponse()
            response.result.index = index
            return response.result

        outcomes = self._classify_many(request, context, slot)
        async with contextlib.aclosing(outcomes):
            async for index, untrained in outcomes:
                response = pending.pop(index)
                response.untrained = untrained
                yield response
