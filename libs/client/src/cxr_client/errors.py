"""gRPC failures as typed Python exceptions carrying the server's google.rpc.ErrorInfo.

Every cxr service reports a failure as a gRPC status plus an ErrorInfo (domain `cxr.platform`,
a stable `reason` such as IMAGE_FORMAT_UNKNOWN or QUEUE_FULL). `from_rpc_error` turns a
`grpc.RpcError` (sync or aio) into one exception class per status code, so callers can write
`except cxr_client.InvalidImageError` or branch on `err.reason`.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

CORRELATION_HEADER = "x-correlation-id"


class CxrClientError(Exception):
    """Base of every error this client raises for a failed call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        correlation_id: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.correlation_id = correlation_id

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        cid = f" (correlation id {self.correlation_id})" if self.correlation_id else ""
        return f"{self.code.name}{reason}: {self.message}{cid}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code.name,
            "reason": self.reason,
            "message": self.message,
            "metadata": self.metadata,
            "correlation_id": self.correlation_id,
        }


class InvalidArgumentError(CxrClientError):
    """The request was refused as it stands (bad image, unknown option); do not retry unchanged."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidImageError(InvalidArgumentError):
    """An image failed validation or decoding (reason IMAGE_*, CONTENT_TYPE_*, DICOM_*)."""


class NotFoundError(CxrClientError):
    code = grpc.StatusCode.NOT_FOUND


class UnavailableError(CxrClientError):
    """Service down, draining, or model not loaded yet; the retry policy already tried again."""

    code = grpc.StatusCode.UNAVAILABLE


class OverloadedError(CxrClientError):
    """RESOURCE_EXHAUSTED: the server's queue is full (QUEUE_FULL) or a rate limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(CxrClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AuthenticationError(CxrClientError):
    """Missing or wrong API key (reason API_KEY_MISSING / API_KEY_INVALID)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(CxrClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AdminKeyNotConfiguredError(PermissionDeniedError):
    """An admin call with no admin key configured, raised before anything is sent (the inference key is never
    used in its place)."""

    def __init__(self, method: str) -> None:
        super().__init__(
            f"{method} is an admin call and no admin key is configured: set CXR_ADMIN_API_KEY, --admin-api-key "
            "or ClientConfig.admin_api_key (the inference key is not sent for admin calls)",
            reason="ADMIN_KEY_NOT_CONFIGURED",
        )


class FailedPreconditionError(CxrClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class CancelledError(CxrClientError):
    code = grpc.StatusCode.CANCELLED


class ServerError(CxrClientError):
    """INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS...: a fault on the server side."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[CxrClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.CANCELLED: CancelledError,
}

_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def _error_class(code: grpc.StatusCode, reason: str) -> type[CxrClientError]:
    if code is grpc.StatusCode.INVALID_ARGUMENT and reason.startswith(("IMAGE_", "CONTENT_TYPE_", "DICOM_")):
        return InvalidImageError
    return _BY_CODE.get(code, ServerError)


def _error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
                break
    return info


def _correlation_id(err: grpc.RpcError) -> str:
    for getter in ("initial_metadata", "trailing_metadata"):
        try:
            md = getattr(err, getter)()
        except Exception:  # noqa: S112 - metadata is best effort
            continue
        for key, value in md or ():
            if key == CORRELATION_HEADER:
                return str(value)
    return ""


def from_rpc_error(err: grpc.RpcError) -> CxrClientError:
    """The typed exception for a failed call (grpc.RpcError or grpc.aio.AioRpcError)."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or code.name
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except Exception:  # a malformed grpc-status-details-bin must not hide the original error
        status = None
    info = _error_info(status)
    cls = _error_class(code, info.reason)
    return cls(
        message,
        code=code,
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        correlation_id=_correlation_id(err),
    )


def from_status(status: status_pb2.Status) -> CxrClientError:
    """The typed exception for a per-item google.rpc.Status (e.g. one image of ClassifyImages)."""
    code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    info = _error_info(status)
    cls = _error_class(code, info.reason)
    return cls(
        status.message or code.name, code=code, reason=info.reason, domain=info.domain, metadata=dict(info.metadata)
    )


__all__ = [
    "AdminKeyNotConfiguredError",
    "AuthenticationError",
    "CancelledError",
    "CxrClientError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "InvalidImageError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "ServerError",
    "UnavailableError",
    "from_rpc_error",
    "from_status",
]
