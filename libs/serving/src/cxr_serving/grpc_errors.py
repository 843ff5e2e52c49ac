"""The one table from domain errors to gRPC status codes, with google.rpc.ErrorInfo details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cxr_serving.errors import CxrError, ErrorKind
from cxr_serving.logging_setup import correlation_id_var

log = logging.getLogger("cxr.errors")

ERROR_DOMAIN = "cxr.platform"

STATUS_BY_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEPENDENCY_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


# Status text travels in HTTP/2 trailers (grpc-message, grpc-status-details-bin); clients refuse
# metadata over 16 KiB, so an error echoing a giant request field would reach them as an opaque
# RESOURCE_EXHAUSTED. Messages and ErrorInfo values are clipped to stay far below that.
MAX_MESSAGE_CHARS = 1024
MAX_METADATA_VALUE_CHARS = 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None
) -> status_pb2.Status:
    """A google.rpc.Status carrying one ErrorInfo (message and metadata values clipped)."""
    message = _clip(message, MAX_MESSAGE_CHARS)
    metadata = {k[:64]: _clip(v, MAX_METADATA_VALUE_CHARS) for k, v in (metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])


def status_for_error(exc: CxrError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    code = STATUS_BY_KIND[exc.kind]
    return code, to_status(code, exc.message, exc.reason, exc.metadata)


def status_for_exception(exc: BaseException, correlation_id: str = "") -> tuple[grpc.StatusCode, status_pb2.Status]:
    """Map any exception; unknown ones become INTERNAL without leaking their text."""
    if isinstance(exc, CxrError):
        return status_for_error(exc)
    code = grpc.StatusCode.INTERNAL
    suffix = f" (correlation id {correlation_id})" if correlation_id else ""
    return code, to_status(code, f"internal error{suffix}", "INTERNAL", {"exception": type(exc).__name__})


def rpc_status_from_error(exc: BaseException) -> status_pb2.Status:
    """For per-item errors inside a batch response (google.rpc.Status field). An unknown exception is
    logged at ERROR with the call's correlation id, as the interceptor does for a failed call."""
    cid = correlation_id_var.get()
    if not isinstance(exc, CxrError):
        log.error("unhandled error in a batch item (correlation id %s)", cid, exc_info=exc)
    return status_for_exception(exc, cid)[1]


def trailing_metadata(status: status_pb2.Status) -> tuple[tuple[str, bytes | str], ...]:
    """grpc-status-details-bin so clients can read ErrorInfo (grpc_status.rpc_status.from_call)."""
    return tuple(rpc_status.to_status(status).trailing_metadata)


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
