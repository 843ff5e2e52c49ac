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
        role=status.role,
        traffic_percent=status.traffic_percent,
        shadow_percent=status.shadow_percent,
        version_policy=status.version_policy,
        memory_cpu_bytes=status.memory.get("cpu", 0),
        memory_gpu_bytes=status.memory.get("cuda", 0),
        gpu_allocated_delta_bytes=status.gpu_allocated_delta,
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
