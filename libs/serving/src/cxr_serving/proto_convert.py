"""Conversions between runtime objects and the common protobuf messages."""

from __future__ import annotations

from typing import Protocol

from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import InvalidInputError
from cxr_serving.images import DecodedImage
from cxr_serving.lifecycle import ModelState, ModelStatus
from cxr_serving.urgency import Priority, Urgency

_STATE = {
    ModelState.UNLOADED: common_pb2.MODEL_STATE_UNLOADED,
    ModelState.LOADING: common_pb2.MODEL_STATE_LOADING,
    ModelState.READY: common_pb2.MODEL_STATE_READY,
    ModelState.FAILED: common_pb2.MODEL_STATE_FAILED,
}

_PRIORITY: dict[int, Priority] = {
    common_pb2.PRIORITY_UNSPECIFIED: Priority.ROUTINE,
    common_pb2.PRIORITY_ROUTINE: Priority.ROUTINE,
    common_pb2.PRIORITY_STAT: Priority.STAT,
}


class _Deadlined(Protocol):
    """What a request's urgency needs of a gRPC servicer context (no gRPC import here)."""

    def time_remaining(self) -> float | None: ...


def priority(value: int) -> Priority:
    """A request's `priority` field; a number this server does not know is refused, never guessed."""
    try:
        return _PRIORITY[value]
    except KeyError:
        raise InvalidInputError(
            f"priority: unknown value {value}; use PRIORITY_ROUTINE or PRIORITY_STAT", reason="UNKNOWN_PRIORITY"
        ) from None


def urgency(priority_field: int, context: _Deadlined) -> Urgency:
    """The request's priority and its call's deadline, which the batcher honours in the queue."""
    return Urgency.of(priority(priority_field), context.time_remaining())


def model_info(status: ModelStatus) -> common_pb2.ModelInfo:
    return fill_model_info(common_pb2.ModelInfo(), status)


def fill_model_info(info: common_pb2.ModelInfo, status: ModelStatus) -> common_pb2.ModelInfo:
    """`status` written into `info`, a field of a response: one message arena per response, not one per part
    (each arena freed counts toward protobuf's periodic `malloc_trim`, docs/serving-runtime.md)."""
    info.name = status.name
    info.version = status.version
    info.untrained = status.untrained
    info.architecture = status.architecture
    info.state = _STATE[status.state]
    info.labels.extend(status.labels)
    info.error = status.error
    info.device = status.device
    info.precision = status.precision
    info.backend = status.backend
    info.runtime_note = status.runtime_note
    info.task = status.task
    info.role = status.role
    info.traffic_percent = status.traffic_percent
    info.shadow_percent = status.shadow_percent
    info.version_policy = status.version_policy
    info.memory_cpu_bytes = status.memory.get("cpu", 0)
    info.memory_gpu_bytes = status.memory.get("cuda", 0)
    info.gpu_allocated_delta_bytes = status.gpu_allocated_delta
    return info


def image_metadata(img: DecodedImage) -> common_pb2.ImageMetadata:
    return fill_image_metadata(common_pb2.ImageMetadata(), img)


def fill_image_metadata(meta: common_pb2.ImageMetadata, img: DecodedImage) -> common_pb2.ImageMetadata:
    """`img`'s metadata written into `meta`, a field of a response (see `fill_model_info`)."""
    row, col = img.pixel_spacing_mm or (0.0, 0.0)
    meta.width = img.width
    meta.height = img.height
    meta.format = img.format
    meta.bits_stored = img.bits_stored
    meta.pixel_spacing_row_mm = row
    meta.pixel_spacing_column_mm = col
    meta.photometric_interpretation = img.photometric_interpretation
    return meta
