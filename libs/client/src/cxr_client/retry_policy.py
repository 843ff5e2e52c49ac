"""The published retry policy of the cxr API, as a gRPC service config.

Every idempotent catalog service (and the gRPC health service) is retried on UNAVAILABLE only, with
exponential backoff: 0.1 s, 0.2 s, 0.4 s (+ jitter, capped at 2 s), at most 4 attempts in all. UNAVAILABLE is
what a restarting pod, a draining server, a refused connection or a model that is still loading
returns; every other code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) is final
and goes straight back to the caller. The platform's RPCs are idempotent (inference and model
load/unload), so replaying one is safe; a catalog entry with `"idempotent": false` is never retried
automatically. The channel's deadline bounds the whole sequence.

`SERVICE_CONFIG` is the dict for the catalog's services (cxr_client/services.json),
`SERVICE_CONFIG_JSON` the string gRPC takes (`grpc.service_config` channel option);
`channel_options()` adds it to the usual options, or `service_config()` of the gRPC services it is
given (a client whose config adds services through CXR_SERVICE_CATALOG).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from cxr_client import catalog

RETRYABLE_STATUS_CODES = ("UNAVAILABLE",)
MAX_ATTEMPTS = 4
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
BACKOFF_MULTIPLIER = 2.0

HEALTH_SERVICE = "grpc.health.v1.Health"


def retried_grpc_services(entries: Iterable[catalog.ServiceEntry]) -> list[str]:
    """The gRPC services of the idempotent catalog entries: the only ones a replay is safe for."""
    return [g for e in entries if e.idempotent for g in e.grpc_services]


def service_config(grpc_services: Iterable[str]) -> dict[str, Any]:
    """The retry policy for these gRPC services and the health service."""
    names = [*dict.fromkeys(grpc_services)]
    if HEALTH_SERVICE not in names:
        names.append(HEALTH_SERVICE)
    return {
        "methodConfig": [
            {
                "name": [{"service": name} for name in names],
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": f"{INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{MAX_BACKOFF_S}s",
                    "backoffMultiplier": BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
                },
            }
        ],
        # Stop retrying when more than half the recent calls failed (token bucket of gRFC A6).
        "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.5},
    }


SERVICE_NAMES = (*retried_grpc_services(catalog.load().values()), HEALTH_SERVICE)

SERVICE_CONFIG: dict[str, Any] = service_config(SERVICE_NAMES)

SERVICE_CONFIG_JSON = json.dumps(SERVICE_CONFIG)


def channel_options(
    max_message_mb: int = 64, *, retries: bool = True, grpc_services: Iterable[str] | None = None
) -> list[tuple[str, Any]]:
    """Channel options every cxr client uses: message size limits, keepalive and the retry policy (for
    `grpc_services`, or the catalog's)."""
    size = max_message_mb * 1024 * 1024
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        config = SERVICE_CONFIG_JSON if grpc_services is None else json.dumps(service_config(grpc_services))
        options.append(("grpc.service_config", config))
    return options
