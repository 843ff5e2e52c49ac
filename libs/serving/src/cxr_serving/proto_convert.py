"""Conversions between runtime objects and the common protobuf messages."""

from __future__ import annotations

from cxr_protos.common.v1 import common_pb2
from cxr_serving.images import DecodedImage
from cxr_serving.lifecycle import ModelState, ModelStatus

_STATE = {
    ModelState.UNLOADED: common_pb2.MODEL_STATE_UNLOADED,
    ModelState.LOADING: common_pb2.MODEL_STATE_LOADING,
    ModelState.READY: common_pb2.MODEL_STATE_READY,
    ModelState.FAILED: common_pb2.MODEL_STATE_FAILED,
}


def model_info(status: ModelStatus) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=status.name,
        version=status.version,
        untrained=status.untrained,
        architecture=status.architecture,
        state=_STATE[status.state],
        labels=status.labels,
        error=status.error,
        device=status.device,
        precision=status.precision,
        backend=status.backend,
        runtime_note=status.runtime_note,
        task=status.task,
    )


def image_metadata(img: DecodedImage) -> common_pb2.ImageMetadata:
    row, col = img.pixel_spacing_mm or (0.0, 0.0)
    return common_pb2.ImageMetadata(
        width=img.width,
        height=img.height,
        format=img.format,
        bits_stored=img.bits_stored,
        pixel_spacing_row_mm=row,
        pixel_spacing_column_mm=col,
        photometric_interpretation=img.photometric_interpretation,
    )
