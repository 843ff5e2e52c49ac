"""Domain errors. Model and pipeline code raise these; `grpc_errors` maps them to gRPC once.

Each error carries a stable machine-readable `reason` (sent as google.rpc.ErrorInfo.reason)
and a message a user can act on. No gRPC import here: model code stays protocol-free.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """The class of failure; `grpc_errors.STATUS_BY_KIND` maps each to one gRPC status."""

    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    DEADLINE = "deadline"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class CxrError(Exception):
    """Base of every error the platform reports to a caller."""

    kind: ErrorKind = ErrorKind.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidInputError(CxrError):
    kind = ErrorKind.INVALID_INPUT
    reason = "INVALID_INPUT"


class ImageRejectedError(InvalidInputError):
    """An image failed validation or decoding; `reason` says which check."""

    reason = "IMAGE_REJECTED"


class ModelNotFoundError(CxrError):
    kind = ErrorKind.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class ModelNotReadyError(CxrError):
    kind = ErrorKind.NOT_READY
    reason = "MODEL_NOT_READY"


class OverloadedError(CxrError):
    kind = ErrorKind.OVERLOADED
    reason = "QUEUE_FULL"


class DependencyUnavailableError(CxrError):
    kind = ErrorKind.DEPENDENCY_UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"


class DependencyTimeoutError(CxrError):
    kind = ErrorKind.DEADLINE
    reason = "DEPENDENCY_TIMEOUT"


class DeadlineExceededError(CxrError):
    """The call's deadline passed while the request waited for its batch: it was never run."""

    kind = ErrorKind.DEADLINE
    reason = "DEADLINE_EXCEEDED_IN_QUEUE"


class UnauthenticatedError(CxrError):
    kind = ErrorKind.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class CheckpointError(CxrError):
    """A checkpoint is missing, unreadable or does not match the architecture."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "CHECKPOINT_INVALID"


class VersionStateError(CxrError):
    """An admin action that the model's loaded versions do not allow (e.g. unloading the serving one)."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "MODEL_VERSION_STATE"


class CheckpointPathError(CxrError):
    """A client-supplied checkpoint path that lies outside `models_path` (or no `models_path` is set)."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "CHECKPOINT_PATH_OUTSIDE"


class ConfigError(ValueError):
    """Bad configuration: raised at start-up, names the offending field."""
