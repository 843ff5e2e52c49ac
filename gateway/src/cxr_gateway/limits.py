"""The request policies of kong.yml, as Kong's plugins apply them (framework-free, so the REST
front and the gRPC proxy share them): key-auth, acl, rate-limiting (policy `local`, fixed
windows), request-size-limiting and correlation-id.

Kong runs plugins by priority: correlation-id (100001) → key-auth (1250) →
request-size-limiting (951) → acl (950) → rate-limiting (910) → grpc-gateway. The stand-in
keeps that order. Messages and headers are Kong's (`No API key found in request`,
`RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset`, `Retry-After`, ...); a refusal's
body is a google.rpc.Status as JSON whose `message` is Kong's and whose ErrorInfo carries the
reason the services use (`reasons`), and the gRPC proxy sends the same Status in
`grpc-status-details-bin`.
"""

from __future__ import annotations

import hmac
import itertools
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from cxr_gateway import reasons
from cxr_gateway.kong_model import (
    WINDOWS,
    AclConfig,
    Consumer,
    CorrelationIdConfig,
    KeyAuthConfig,
    RateLimitingConfig,
    RequestSizeLimitingConfig,
)
from cxr_gateway.roles import ADMIN_GROUP
from cxr_serving.grpc_errors import to_status, trailing_metadata


@dataclass(frozen=True)
class Denial:
    """A request refused by a plugin: HTTP form for REST, gRPC form for the proxy, one google.rpc.Status."""

    http_status: int
    grpc_code: grpc.StatusCode
    message: str
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: int | None = None

    def status(self) -> status_pb2.Status:
        """ErrorInfo (reason, domain, metadata) built as the services build it, plus RetryInfo on 429."""
        st = to_status(self.grpc_code, self.message, self.reason, self.metadata)
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_s))
            detail = any_pb2.Any()
            detail.Pack(retry)
            st.details.append(detail)
        return st

    def body(self) -> dict[str, Any]:
        """`{"code", "message", "details"}`: the Status as JSON, as grpc-gateway renders backend errors."""
        d = json_format.MessageToDict(self.status())
        return {"code": d.get("code", 0), "message": d.get("message", ""), "details": d.get("details", [])}

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The plugin's headers (lower-case) and `grpc-status-details-bin` for the gRPC proxy."""
        return tuple((k.lower(), v) for k, v in self.headers.items()) + trailing_metadata(self.status())


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
            return Denial(
                401,
                grpc.StatusCode.UNAUTHENTICATED,
                "No API key found in request",
                reasons.API_KEY_MISSING,
                dict(self._challenge),
            )
        found: Consumer | None = None
        cand = key.encode()
        for consumer, valid in self._keys:  # compare against every key: timing does not reveal which
            if hmac.compare_digest(cand, valid):
                found = consumer
        if found is None:
            return Denial(
                401,
                grpc.StatusCode.UNAUTHENTICATED,
                "Invalid authentication credentials",
                reasons.API_KEY_INVALID,
                dict(self._challenge),
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
        window = max(exceeded, key=lambda u: u[5])
        denial = Denial(
            self.config.error_code,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            self.config.error_message,
            reasons.RATE_LIMIT_EXCEEDED,
            dict(headers),
            {"limit": str(int(window[2])), "window": window[0], "limit_by": self.config.limit_by},
            retry_after,
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
        return Denial(
            413,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Request size limit exceeded",
            reasons.REQUEST_TOO_LARGE,
            metadata={"limit_bytes": str(self.limit)},
        )

    def check_declared(self, content_length: int | None) -> Denial | None:
        if content_length is None:
            if self.config.require_content_length:
                return Denial(
                    411,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "A valid Content-Length header is required",
                    reasons.CONTENT_LENGTH_REQUIRED,
                )
            return None
        return self.too_large() if content_length > self.limit else None


class Acl:
    """acl: the consumer's groups (its `acls`) against the route's allow or deny list.

    Like Kong: 403 "You cannot consume this service" when refused, 401 without an authenticated
    consumer; when allowed, the groups go upstream in X-Consumer-Groups unless hide_groups_header.
    """

    HEADER = "x-consumer-groups"

    def __init__(self, config: AclConfig) -> None:
        self.config = config
        self._allow = set(config.allow) if config.allow is not None else None
        self._deny = set(config.deny or ())

    def check(self, consumer: Consumer | None, route: str = "") -> Denial | str:
        """The X-Consumer-Groups value ('' when hidden) for an allowed consumer, else a Denial."""
        if consumer is None:
            return Denial(401, grpc.StatusCode.UNAUTHENTICATED, "Unauthorized", reasons.API_KEY_MISSING)
        groups = consumer.groups
        if self._allow is not None:
            allowed = bool(self._allow.intersection(groups))
        else:
            allowed = not self._deny.intersection(groups)
        if not allowed:
            admin_only = self._allow == {ADMIN_GROUP}
            reason = reasons.ADMIN_REQUIRED if admin_only else reasons.GROUP_NOT_ALLOWED
            meta = {"consumer": consumer.name, "groups": ",".join(groups)}
            if route:
                meta["route"] = route
            return Denial(403, grpc.StatusCode.PERMISSION_DENIED, "You cannot consume this service", reason, {}, meta)
        return "" if self.config.hide_groups_header else ", ".join(groups)


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


# set by Kong for the upstream after authentication; a client's own values are never forwarded
IDENTITY_PREFIXES = ("x-consumer-", "x-credential-", "x-anonymous-")


def is_identity_header(name: str) -> bool:
    return name.lower().startswith(IDENTITY_PREFIXES)


def identity_metadata(consumer: Consumer | None, groups: str) -> list[tuple[str, str]]:
    """X-Consumer-Username (key-auth) and X-Consumer-Groups (acl) as Kong sends them upstream."""
    out: list[tuple[str, str]] = []
    if consumer is not None:
        out.append(("x-consumer-username", consumer.name))
    if groups:
        out.append((Acl.HEADER, groups))
    return out


FORWARDED_FOR = "x-forwarded-for"


def forwarded_for(existing: list[str], peer: str) -> str:
    """X-Forwarded-For as Kong sends it upstream (`$proxy_add_x_forwarded_for`): the client's own hops, then
    the address the gateway saw, so a service that trusts the gateway judges the real peer, not a claim."""
    hops = ", ".join(v.strip() for v in existing if v.strip())
    if not peer:
        return hops
    return f"{hops}, {peer}" if hops else peer
