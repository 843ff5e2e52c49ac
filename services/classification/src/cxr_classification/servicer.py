"""gRPC adapter of the classification service: protos in, the models' hooks, protos out.

Per image: decode + each model's `preprocess`, once per distinct preprocessing spec (one job on
the bounded worker pool, off the event loop) -> every selected model through its dynamic batcher
concurrently -> each model's `postprocess` (findings with their thresholds) -> protos. Errors are
domain errors; the runtime's interceptor maps them (per-image errors of batch calls become
google.rpc.Status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from cxr_classification.model import Calibration, ChestXrayClassifier, ClassifierInput, ClassifierOutput
from cxr_classification.preprocessing import PreprocessSpec
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.batcher import Arrival
from cxr_serving.errors import InvalidInputError, ModelNotReadyError
from cxr_serving.grpc_errors import rpc_status_from_error
from cxr_serving.images import DecodedImage, DecodePool, decode_image
from cxr_serving.lifecycle import ModelRepository
from cxr_serving.model_admin import ModelAdmin, ModelAdminRpcs
from cxr_serving.proto_convert import image_metadata, model_info

Context = grpc.aio.ServicerContext[Any, Any]
MAX_IMAGES_PER_REQUEST = 128
MAX_HEATMAPS_PER_REQUEST = 16  # Grad-CAM costs a backward pass each, on the model's thread
CALIBRATION = {
    Calibration.RAW: pb.CALIBRATION_RAW,
    Calibration.OPERATING_POINT: pb.CALIBRATION_OPERATING_POINT,
    Calibration.NO_OPERATING_POINT: pb.CALIBRATION_NO_OPERATING_POINT,
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class ImageResult:
    predictions: list[pb.ModelPrediction]
    metadata: common_pb2.ImageMetadata
    timing: pb.Timing
    untrained: bool


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
        self.models = models
        self.pool = pool
        self.admin = ModelAdmin(repo, models_path)
        self.max_in_flight = max_in_flight_per_request

    # -- selection and validation -------------------------------------------------------------
    def select_models(self, requested: Sequence[str]) -> list[str]:
        if requested:
            names = list(dict.fromkeys(requested))
            for name in names:
                self.repo.model(name)  # NOT_FOUND for unknown names
            return names
        ready = [n for n in self.repo.names if self.repo.is_ready(n)]
        if not ready:
            raise ModelNotReadyError("no classification model is loaded; see ListModels")
        return ready

    def heatmaps_by_model(self, names: list[str], labels: Sequence[str], images: int = 1) -> dict[str, tuple[str, ...]]:
        wanted = list(dict.fromkeys(labels))
        if len(wanted) * images > MAX_HEATMAPS_PER_REQUEST:
            raise InvalidInputError(
                f"{len(wanted)} heatmap labels x {images} images is over the limit of {MAX_HEATMAPS_PER_REQUEST} "
                "heatmaps per request: ask for fewer labels or send fewer images per call",
                reason="TOO_MANY_HEATMAPS",
            )
        known = {label for n in names for label in self.models[n].labels}
        unknown = [label for label in wanted if label not in known]
        if unknown:
            raise InvalidInputError(
                f"heatmap_labels {unknown} are not outputs of the selected models; known labels: {sorted(known)}",
                reason="UNKNOWN_LABEL",
            )
        return {n: tuple(label for label in wanted if label in self.models[n].labels) for n in names}

    # -- the pipeline for one image -------------------------------------------------------------
    def _preprocess_all(self, decoded: DecodedImage, names: list[str]) -> dict[PreprocessSpec, torch.Tensor]:
        out: dict[PreprocessSpec, torch.Tensor] = {}
        for name in names:
            model = self.models[name]
            if model.spec not in out:
                out[model.spec] = model.preprocess(decoded)
        return out

    def _decode_and_preprocess(
        self, data: bytes, content_type: str, names: list[str]
    ) -> tuple[DecodedImage, dict[PreprocessSpec, torch.Tensor], float, float]:
        """One job on the worker pool: validate + decode, then every distinct preprocessing."""
        t0 = time.perf_counter()
        decoded = decode_image(data, content_type, self.pool.limits)
        t1 = time.perf_counter()
        tensors = self._preprocess_all(decoded, names)
        return decoded, tensors, t1 - t0, time.perf_counter() - t1

    async def _predict(
        self, name: str, item: ClassifierInput, arrival: Arrival | None = None
    ) -> tuple[ClassifierOutput, float]:
        started = time.perf_counter()
        out: ClassifierOutput = await self.repo.predict(name, item, arrival)
        return out, time.perf_counter() - started

    def _prediction(self, name: str, out: ClassifierOutput, seconds: float) -> pb.ModelPrediction:
        findings = [
            pb.Finding(
                label=f.label,
                probability=f.probability,
                threshold=f.threshold,
                positive=f.positive,
                heatmap_png=f.heatmap_png,
                calibration=CALIBRATION[f.calibration],
            )
            for f in self.models[name].postprocess(out)
        ]
        return pb.ModelPrediction(
            model=model_info(self.repo.status(name)), findings=findings, inference_ms=_ms(seconds)
        )

    async def classify(
        self, image: common_pb2.Image, names: list[str], heatmaps: dict[str, tuple[str, ...]]
    ) -> ImageResult:
        t0 = time.perf_counter()
        with self.repo.expect(names) as arrivals:  # each model's batcher waits for this one while it decodes
            decoded, tensors, decode_s, preprocess_s = await self.pool.run(
                self._decode_and_preprocess, image.data, image.content_type, names
            )
            t1 = time.perf_counter()
            items = [(n, ClassifierInput(tensors[self.models[n].spec], heatmaps.get(n, ()))) for n in names]
            if len(items) == 1:
                outs = [await self._predict(*items[0], arrivals.get(items[0][0]))]
            else:
                outs = list(await asyncio.gather(*(self._predict(n, item, arrivals.get(n)) for n, item in items)))
        t2 = time.perf_counter()
        predictions = [self._prediction(n, out, secs) for n, (out, secs) in zip(names, outs, strict=True)]
        timing = pb.Timing(
            decode_ms=_ms(decode_s), preprocess_ms=_ms(preprocess_s), inference_ms=_ms(t2 - t1), total_ms=_ms(t2 - t0)
        )
        untrained = any(p.model.untrained for p in predictions)
        return ImageResult(predictions, image_metadata(decoded), timing, untrained)

    async def _classify_many(
        self, images: Sequence[common_pb2.Image], model_names: Sequence[str], heatmap_labels: Sequence[str]
    ) -> AsyncIterator[pb.ImageClassification]:
        """Classify every image (bounded concurrency) and yield results as they finish."""
        if not images:
            raise InvalidInputError("images is empty: send at least one image", reason="NO_IMAGES")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            raise InvalidInputError(
                f"{len(images)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}: split the request",
                reason="TOO_MANY_IMAGES",
            )
        names = self.select_models(model_names)
        heatmaps = self.heatmaps_by_model(names, heatmap_labels, len(images))
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(index: int, image: common_pb2.Image) -> pb.ImageClassification:
            async with gate:
                try:
                    r = await self.classify(image, names, heatmaps)
                except Exception as exc:  # each image fails on its own
                    return pb.ImageClassification(index=index, error=rpc_status_from_error(exc))
            return pb.ImageClassification(index=index, predictions=r.predictions, image=r.metadata, timing=r.timing)

        tasks = [asyncio.ensure_future(one(i, img)) for i, img in enumerate(images)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for t in tasks:
                t.cancel()

    # -- RPCs ------------------------------------------------------------------------------------
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context: Context) -> pb.ClassifyImageResponse:
        names = self.select_models(request.model_names)
        heatmaps = self.heatmaps_by_model(names, request.heatmap_labels)
        r = await self.classify(request.image, names, heatmaps)
        return pb.ClassifyImageResponse(
            predictions=r.predictions, image=r.metadata, untrained=r.untrained, timing=r.timing
        )

    async def ClassifyImages(self, request: pb.ClassifyImagesRequest, context: Context) -> pb.ClassifyImagesResponse:
        results = [r async for r in self._classify_many(request.images, request.model_names, request.heatmap_labels)]
        results.sort(key=lambda r: r.index)
        untrained = any(p.model.untrained for r in results for p in r.predictions)
        return pb.ClassifyImagesResponse(results=results, untrained=untrained)

    async def StreamClassifyImages(
        self, request: pb.StreamClassifyImagesRequest, context: Context
    ) -> AsyncIterator[pb.StreamClassifyImagesResponse]:
        async for r in self._classify_many(request.images, request.model_names, request.heatmap_labels):
            untrained = any(p.model.untrained for p in r.predictions)
            yield pb.StreamClassifyImagesResponse(result=r, untrained=untrained)
