"""The request policies of kong.yml, as Kong's plugins apply them (framework-free, so the REST
front and the gRPC proxy share them): key-auth, rate-limiting (policy `local`, fixed
windows), request-size-limiting and correlation-id.

Kong runs plugins by priority: correlation-id (100001) → key-auth (1250) →
request-size-limiting (951) → rate-limiting (910) → grpc-gateway. The stand-in keeps that order.
Response bodies and headers are Kong's: `{"message": "No API key found in request"}`,
`RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset`, `Retry-After`, ...
"""

from __future__ import annotations

import hmac
import itertools
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from cxr_gateway.kong_model import (
    WINDOWS,
    Consumer,
    CorrelationIdConfig,
    KeyAuthConfig,
    RateLimitingConfig,
    RequestSizeLimitingConfig,
)


@dataclass(frozen=True)
class Denial:
    """A request refused by a plugin: HTTP form for REST, gRPC form for the proxy."""

    http_status: int
    grpc_code: grpc.StatusCode
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, str]:
        return {"message": self.message}


class KeyAuth:
    """key-auth: the key in one of `key_names` (headers; query string when key_in_query)."""

    def __init__(self, config: KeyAuthConfig, consumers: list[Consumer]) -> None:
        self.config = config
        self._keys = [(c, cred.key.encode()) for c in consumers for cred in c.keyauth_credentials]
        realm = config.realm or "kong"
        self._challenge = {"WWW-Authenticate": f'Key realm="{realm}"'}

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> Consumer | Denial:
        """`headers` with lower-case names. Returns the consumer or a 401 Denial."""
        key = None
        for name in self.config.key_names:
            if self.config.key_in_header and name.lower() in headers:
                key = headers[name.lower()]
                break
            if self.config.key_in_query and query and name in query:
                key = query[name]
                break
        if not key:
            return Denial(401, grpc.StatusCode.UNAUTHENTICATED, "No API key found in request", dict(self._challenge))
        found: Consumer | None = None
        cand = key.encode()
        for consumer, valid in self._keys:  # compare against every key: timing does not reveal which
            if hmac.compare_digest(cand, valid):
                found = consumer
        if found is None:
            return Denial(
                401, grpc.StatusCode.UNAUTHENTICATED, "Invalid authentication credentials", dict(self._challenge)
            )
        return found

    def strip(self, headers: dict[str, str]) -> None:
        """hide_credentials: remove the key before proxying."""
        if self.config.hide_credentials:
            for name in self.config.key_names:
                headers.pop(name.lower(), None)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    headers: dict[str, str]
    denial: Denial | None = None


class RateLimiter:
    """rate-limiting with `policy: local`: one fixed-window counter per identifier and window.

    Like Kong: every response carries `X-RateLimit-Limit-<Window>` / `X-RateLimit-Remaining-<Window>`
    for each configured window and `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset`
    for the most constrained one; over the limit → 429 with `Retry-After`.
    """

    def __init__(self, config: RateLimitingConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.windows = [
            (name, size, float(getattr(config, name))) for name, size in WINDOWS.items() if getattr(config, name)
        ]
        self._counts: dict[tuple[str, str, int], int] = {}
        self._last_prune = 0.0

    def hit(self, identifier: str) -> RateDecision:
        now = self.clock()
        self._prune(now)
        usage = []
        for name, size, limit in self.windows:
            start = int(now // size) * size
            used = self._counts.get((identifier, name, start), 0)
            reset = max(1, math.ceil(start + size - now))
            usage.append((name, size, limit, start, used, reset))
        exceeded = [u for u in usage if u[4] >= u[2]]
        if not exceeded:
            for name, _size, _limit, start, _used, _reset in usage:
                key = (identifier, name, start)
                self._counts[key] = self._counts.get(key, 0) + 1
        headers: dict[str, str] = {}
        if not self.config.hide_client_headers:
            tightest = None
            for name, _size, limit, _start, used, reset in usage:
                remaining = max(0, int(limit - used - (0 if exceeded else 1)))
                headers[f"X-RateLimit-Limit-{name.capitalize()}"] = str(int(limit))
                headers[f"X-RateLimit-Remaining-{name.capitalize()}"] = str(remaining)
                if tightest is None or remaining < tightest[1] or (remaining == tightest[1] and reset > tightest[2]):
                    tightest = (limit, remaining, reset)
            assert tightest is not None
            headers["RateLimit-Limit"] = str(int(tightest[0]))
            headers["RateLimit-Remaining"] = str(tightest[1])
            headers["RateLimit-Reset"] = str(tightest[2])
        if not exceeded:
            return RateDecision(True, headers)
        retry_after = max(u[5] for u in exceeded)
        headers["Retry-After"] = str(retry_after)
        denial = Denial(
            self.config.error_code, grpc.StatusCode.RESOURCE_EXHAUSTED, self.config.error_message, dict(headers)
        )
        return RateDecision(False, headers, denial)

    def identifier(self, consumer: Consumer | None, client_ip: str, service: str, path: str) -> str:
        by = self.config.limit_by
        if by in ("consumer", "credential", "consumer-group") and consumer is not None:
            return f"consumer:{consumer.name}"
        if by == "service":
            return f"service:{service}"
        if by == "path":
            return f"path:{path}"
        return f"ip:{client_ip}"  # Kong falls back to the client IP when there is no consumer

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        sizes = dict(WINDOWS)
        self._counts = {k: v for k, v in self._counts.items() if k[2] + sizes[k[1]] > now}


class SizeLimit:
    """request-size-limiting: 413 over the limit; 411 without Content-Length when required."""

    def __init__(self, config: RequestSizeLimitingConfig) -> None:
        self.config = config
        self.limit = config.limit_bytes

    def too_large(self) -> Denial:
        return Denial(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "Request size limit exceeded")

    def check_declared(self, content_length: int | None) -> Denial | None:
        if content_length is None:
            if self.config.require_content_length:
                return Denial(411, grpc.StatusCode.INVALID_ARGUMENT, "A valid Content-Length header is required")
            return None
        return self.too_large() if content_length > self.limit else None


class CorrelationId:
    """correlation-id: keep the client's id or generate one; forward it; echo it when configured."""

    def __init__(self, config: CorrelationIdConfig) -> None:
        self.config = config
        self.header = config.header_name
        self._counter = itertools.count(1)
        self._base = str(uuid.uuid4())

    def get_or_create(self, headers: Mapping[str, str]) -> str:
        existing = headers.get(self.header.lower())
        if existing:
            return existing
        if self.config.generator == "uuid#counter":
            return f"{self._base}#{next(self._counter)}"
        return str(uuid.uuid4())
