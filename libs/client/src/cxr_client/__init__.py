"""Python client of the cxr platform: typed sync/async clients, batch helpers, the analyze-study
workflow, the `cxr` CLI and the `cxr-mcp` MCP server."""

from cxr_client.batch import BatchResult, BatchSummary, batch_process_images
from cxr_client.client import AsyncCxrClient, CxrClient
from cxr_client.config import ClientConfig, TlsOptions
from cxr_client.errors import (
    AdminKeyNotConfiguredError,
    AuthenticationError,
    CxrClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidImageError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    ServerError,
    UnavailableError,
)
from cxr_client.retry_policy import SERVICE_CONFIG

__all__ = [
    "SERVICE_CONFIG",
    "AdminKeyNotConfiguredError",
    "AsyncCxrClient",
    "AuthenticationError",
    "BatchResult",
    "BatchSummary",
    "ClientConfig",
    "CxrClient",
    "CxrClientError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "InvalidImageError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "ServerError",
    "TlsOptions",
    "UnavailableError",
    "batch_process_images",
]
