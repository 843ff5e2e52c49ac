"""gRPC adapter: request -> options, decode -> the model's preprocess -> batched forward -> the
model's postprocess -> proto. The model is named by the request (default: the first configured).

Thin by design (as a KServe predictor): every step lives on the model or in its own module; errors
are domain errors from cxr_serving.errors, mapped to gRPC status codes by the shared interceptor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import grpc

from cxr_protos.common.v1 import common_pb2
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from cxr_segmentation.model import SegmentationModel
from cxr_segmentation.postprocess import Encoding, PostprocessOptions, SegmentationResult
from cxr_serving.errors import InvalidInputError
from cxr_serving.images import DecodedImage, DecodeLimits, DecodePool, decode_image
from cxr_serving.lifecycle import Dispatch, ModelRepository
from cxr_serving.model_admin import ModelAdmin, ModelAdminRpcs
from cxr_serving.proto_convert import fill_image_metadata, urgency
from cxr_serving.settings import Settings
from cxr_serving.versions import split_name

_ENCODINGS: dict[int, Encoding] = {
    pb.MASK_ENCODING_UNSPECIFIED: "png",
    pb.MASK_ENCODING_PNG: "png",
    pb.MASK_ENCODING_RLE: "rle",
    pb.MASK_ENCODING_NONE: "none",
}


class SegmentationServicer(ModelAdminRpcs, pb_grpc.SegmentationServiceServicer):  # type: ignore[misc]
    admin_messages = pb

    def __init__(self, settings: Settings, repo: ModelRepository, pool: DecodePool, default_model: str) -> None:
        self.settings = settings
        self.repo = repo
        self.pool = pool
        self.default_model = default_model
        self.admin = ModelAdmin(repo, settings.models_path, default_model=default_model, rest_prefix="/v1/segmentation")

    def _model(self, name: str) -> SegmentationModel:
        model = self.repo.model(name or self.default_model)
        assert isinstance(model, SegmentationModel)
        return model

    @staticmethod
    def _options(request: pb.SegmentImageRequest, model: SegmentationModel, version: str) -> PostprocessOptions:
        encoding = _ENCODINGS.get(request.mask_encoding)
        if encoding is None:
            raise InvalidInputError(f"mask_encoding: unknown value {request.mask_encoding}; use PNG, RLE or NONE")
        threshold = float(request.threshold)
        if not math.isfinite(threshold) or threshold < 0.0 or threshold >= 1.0:
            raise InvalidInputError(f"threshold must be in (0, 1), or 0 for the model's default; got {threshold}")
        unknown = [c for c in request.classes if c not in model.labels]
        if unknown:
            raise InvalidInputError(f"classes: unknown {unknown}; model '{model.name}' has {list(model.labels)}")
        wanted = set(request.classes)
        return PostprocessOptions(
            threshold=threshold or model.cfg.threshold,
            classes=[c for c in model.labels if not wanted or c in wanted],
            encoding=encoding,
            overlay=request.include_overlay,
            dicom_seg=request.include_dicom_seg,
            overlay_max_side=model.cfg.overlay_max_side,
            algorithm_name=f"{model.name} {model.architecture}",
            algorithm_version=version,
        )

    async def SegmentImage(
        self, request: pb.SegmentImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SegmentImageResponse:
        name, pinned = split_name(request.model_name)
        model = self._model(name)
        if request.model_version and pinned and request.model_version != pinned:
            raise InvalidInputError(
                f"model_version {request.model_version!r} contradicts {request.model_name}",
                reason="MODEL_VERSION_CONFLICT",
            )
        pins = {model.name: request.model_version or pinned}
        how_urgent = urgency(request.priority, context)
        # the batcher of the version chosen here waits for this one while it decodes
        with self.repo.expect([model.name], pins, priority=how_urgent.priority) as arrivals:
            dispatch = arrivals.get(model.name) or Dispatch("", "serving")
            # the loaded version from the repository: with instance processes `model` itself is never loaded
            opts = self._options(request, model, dispatch.version)
            # Decode and preprocess as one job on the worker pool: one thread hand-off instead of two.
            image, item = await self.pool.run(
                _decode_and_preprocess, request.image.data, request.image.content_type, self.pool.limits, model, opts
            )
            if opts.dicom_seg and image.dataset is None:
                raise InvalidInputError(
                    f"include_dicom_seg needs a DICOM input; this image is {image.format.upper()}",
                    reason="DICOM_SEG_NEEDS_DICOM",
                )
            output = await self.repo.predict(model.name, item, dispatch, how_urgent)
        status = dispatch.status
        assert status is not None
        result: SegmentationResult = await self.pool.run(
            model.postprocess, output, dataclasses.replace(opts, image=image, algorithm_version=status.version)
        )
        response = pb.SegmentImageResponse()
        self.admin.fill_info(response.model, status)
        fill_image_metadata(response.image, image)
        return fill_response(response, result)


def _decode_and_preprocess(
    data: bytes, content_type: str, limits: DecodeLimits, model: SegmentationModel, opts: PostprocessOptions
) -> tuple[DecodedImage, Any]:
    image = decode_image(data, content_type, limits)
    return image, model.preprocess(image, opts)


def to_response(
    result: SegmentationResult, *, status_info: common_pb2.ModelInfo, image: common_pb2.ImageMetadata
) -> pb.SegmentImageResponse:
    response = pb.SegmentImageResponse(model=status_info, image=image)
    fill_response(response, result)
    return response


def fill_response(response: pb.SegmentImageResponse, result: SegmentationResult) -> pb.SegmentImageResponse:
    """`result` written into `response`, whose model and image are already set: every part in the response's
    own message arena (each arena freed counts toward protobuf's periodic `malloc_trim`)."""
    for m in result.masks:
        msg = response.masks.add(
            label=m.label,
            width=m.width,
            height=m.height,
            png=m.png,
            area_pixels=m.area_pixels,
            area_mm2=m.area_mm2,
        )
        if m.rle_size:
            msg.rle.size.extend(m.rle_size)
            msg.rle.counts.extend(m.rle_counts)
        if m.bounding_box is not None:
            b, box = m.bounding_box, msg.bounding_box
            box.x_min, box.y_min, box.x_max, box.y_max = b.x_min, b.y_min, b.x_max, b.y_max
    c, measurements = result.ctr, response.measurements
    measurements.cardiothoracic_ratio = c.ratio
    measurements.cardiothoracic_ratio_unavailable_reason = c.unavailable_reason
    measurements.heart_width_px = c.heart_width_px
    measurements.thorax_width_px = c.thorax_width_px
    measurements.heart_width_mm = c.heart_width_mm
    measurements.thorax_width_mm = c.thorax_width_mm
    measurements.cardiothoracic_ratio_implausible = c.implausible
    response.overlay_png = result.overlay_png
    response.dicom_seg = result.dicom_seg
    response.untrained = response.model.untrained
    # cxr_serving.images.SPACING_* values are the enum's names without the prefix
    spacing = pb.SpacingSource.Value(f"SPACING_SOURCE_{result.spacing_source.upper()}")
    response.spacing_source = cast("pb.SpacingSource", spacing)  # the stubs type Value() as int
    response.magnification_factor = result.magnification_factor
    return response
