"""gRPC server interceptors: peer address allow-list, API key and role, then correlation id + tracing +
error mapping + access log + metrics around every handler (one wrapper for all four RPC shapes)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import logging
import os
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract

from cxr_serving.audit import audit, caller, models_in
from cxr_serving.errors import CxrError, ErrorKind, UnauthenticatedError
from cxr_serving.grpc_errors import status_for_exception, trailing_metadata
from cxr_serving.logging_setup import correlation_id_var
from cxr_serving.metrics import REQUEST_DURATION, REQUESTS_TOTAL
from cxr_serving.roles import Role, is_admin_method

log = logging.getLogger("cxr.access")

API_KEY_HEADERS = ("x-api-key", "apikey")
CORRELATION_HEADERS = ("x-correlation-id", "x-request-id", "kong-request-id")
CORRELATION_HEADER = "x-correlation-id"
FORWARDED_FOR_HEADER = "x-forwarded-for"

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Ctx = grpc.aio.ServicerContext[Any, Any]


class ApiKeyStore:
    """Valid keys from config/env plus a secret file re-read when it changes (rotation without restart)."""

    def __init__(self, keys: Iterable[str] = (), key_file: Path | None = None, recheck_s: float = 1.0) -> None:
        self._static = [k for k in keys if k]
        self._file = key_file
        self._file_keys: list[str] = []
        self._mtime: float | None = None
        self._recheck_s = recheck_s
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            st = os.stat(self._file)
        except OSError:
            if self._mtime is not None:
                log.warning("api key file %s disappeared; keeping the last keys", self._file)
            return
        if st.st_mtime_ns != self._mtime:
            lines = self._file.read_text(encoding="utf-8").splitlines()
            self._file_keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
            self._mtime = st.st_mtime_ns
            log.info("loaded %d api key(s) from %s", len(self._file_keys), self._file)

    def keys(self) -> list[str]:
        now = time.monotonic()
        if self._file is not None and now - self._checked >= self._recheck_s:
            self._checked = now
            self._reload()
        return self._static + self._file_keys

    def is_valid(self, candidate: str) -> bool:
        ok = False
        cand = candidate.encode()
        for key in self.keys():  # compare against every key: time does not depend on which matched
            ok |= hmac.compare_digest(cand, key.encode())
        return ok


class KeyRoles:
    """The role an API key holds: an admin key (which may call every RPC) or an inference key."""

    def __init__(self, inference: ApiKeyStore, admin: ApiKeyStore | None = None) -> None:
        self.inference = inference
        self.admin = admin if admin is not None else ApiKeyStore()

    def role(self, key: str) -> Role:
        if not key:
            return Role.NONE
        # both stores are always compared, so the time taken does not tell which role a key holds
        is_admin, is_inference = self.admin.is_valid(key), self.inference.is_valid(key)
        return Role.ADMIN if is_admin else Role.INFERENCE if is_inference else Role.NONE


class AccessDeniedError(CxrError):
    """A caller authenticated (or not needing to) but not allowed this call: PERMISSION_DENIED."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


def _key(md: dict[str, str]) -> str:
    return next((md[h] for h in API_KEY_HEADERS if h in md), "")


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _rebuild(handler: Handler, wrap_unary: Callable[..., Any], wrap_stream: Callable[..., Any]) -> Handler:
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kw)


async def _refuse(context: Ctx, method: str, md: dict[str, str], err: CxrError, role: Role) -> None:
    """Abort a refused call. Refused calls never reach the access log of ObservabilityInterceptor: log and
    audit them here (never the key)."""
    code, status = status_for_exception(err)
    REQUESTS_TOTAL.labels(method, code.name).inc()
    fields = {"method": method, "code": code.name, "reason": err.reason, "peer": context.peer()}
    log.info("rpc", extra={"fields": fields})
    audit(method, code.name, caller(md, role), (), fields["peer"], 0.0)
    await context.abort(code, status.message, trailing_metadata=trailing_metadata(status))


def _refusal(handler: Handler, method: str, md: dict[str, str], err: CxrError, role: Role) -> Handler:
    async def deny(request: Any, context: Ctx) -> Any:
        await _refuse(context, method, md, err, role)

    async def deny_stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
        await deny(request, context)
        yield  # pragma: no cover - abort raises

    return _rebuild(handler, lambda _b: deny, lambda _b: deny_stream)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a valid `x-api-key` (or `apikey`) with UNAUTHENTICATED, and admin RPCs
    (`roles.is_admin_method`) called with an inference key with PERMISSION_DENIED `ADMIN_REQUIRED`."""

    def __init__(
        self,
        store: ApiKeyStore,
        exempt_methods: Iterable[str] = (),
        admin_store: ApiKeyStore | None = None,
        admin_method: Callable[[str], bool] = is_admin_method,
    ) -> None:
        self._roles = KeyRoles(store, admin_store)
        self._exempt = frozenset(exempt_methods)
        self._admin_method = admin_method

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method in self._exempt:
            return handler
        md = _metadata(details)
        key = _key(md)
        role = self._roles.role(key)
        if role is Role.ADMIN or (role is Role.INFERENCE and not self._admin_method(method)):
            return handler
        err: CxrError
        if role is Role.INFERENCE:
            err = AccessDeniedError(
                f"{method} is an admin RPC: call it with an admin API key (security.admin_api_keys)",
                reason="ADMIN_REQUIRED",
            )
        else:
            err = UnauthenticatedError(
                "missing API key: send it in the x-api-key header" if not key else "invalid API key",
                reason="API_KEY_MISSING" if not key else "API_KEY_INVALID",
            )
        return _refusal(handler, method, md, err, role)


class AdminClosedInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """With security.enable_authentication false no caller can prove the admin role, so admin RPCs are refused
    with PERMISSION_DENIED `ADMIN_REQUIRED` rather than left open to whoever can connect."""

    def __init__(self, admin_method: Callable[[str], bool] = is_admin_method) -> None:
        self._admin_method = admin_method

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not self._admin_method(method):
            return handler
        err = AccessDeniedError(
            f"{method} is an admin RPC and security.enable_authentication is false: admin RPCs need "
            "authentication on and an admin API key",
            reason="ADMIN_REQUIRED",
        )
        return _refusal(handler, method, _metadata(details), err, Role.NONE)


def peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer string (`ipv4:10.0.0.1:5000`, `ipv6:[::1]:5000`); None for other transports.
    An IPv4-mapped IPv6 address (a dual-stack listener) reads as its IPv4 address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    return _ip(host)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _within(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in networks)


class PeerAllowListInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls from addresses outside `allowed` (CIDR blocks) with PERMISSION_DENIED `IP_NOT_ALLOWED`.
    The address is the connection's peer; only when that peer is one of `trusted_proxies` (the gateways)
    is `X-Forwarded-For` read: from its right, the first address that is not a trusted proxy is the client."""

    def __init__(
        self,
        allowed: Iterable[str],
        trusted_proxies: Iterable[str] = (),
        exempt_methods: Iterable[str] = (),
        key_roles: KeyRoles | None = None,
    ) -> None:
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allowed]
        self._proxies = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
        self._exempt = frozenset(exempt_methods)
        self._roles = key_roles

    def client_address(
        self, peer: str, forwarded_for: Iterable[str] = ()
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The caller's address, or None when it cannot be told (then the call is refused)."""
        ip = peer_address(peer)
        if ip is None or not _within(ip, self._proxies):
            return ip
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            ip = _ip(hop)
            if ip is None or not _within(ip, self._proxies):
                return ip
        return ip

    def allows(self, peer: str, forwarded_for: Iterable[str] = ()) -> bool:
        ip = self.client_address(peer, forwarded_for)
        return ip is not None and _within(ip, self._allowed)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method in self._exempt:
            return handler
        md = _metadata(details)
        forwarded = [
            v
            for k, v in details.invocation_metadata or ()  # type: ignore[attr-defined]
            if k.lower() == FORWARDED_FOR_HEADER and isinstance(v, str)
        ]
        role = self._roles.role(_key(md)) if self._roles is not None else Role.NONE

        async def check(context: Ctx) -> None:
            peer = context.peer() or ""
            if not self.allows(peer, forwarded):
                client = self.client_address(peer, forwarded)
                err = AccessDeniedError(
                    f"calls from {client or peer or 'this address'} are not allowed (security.allowed_ips)",
                    reason="IP_NOT_ALLOWED",
                )
                await _refuse(context, method, md, err, role)

        def wrap_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def checked(request: Any, context: Ctx) -> Any:
                await check(context)
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

            return checked

        def wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def checked(request: Any, context: Ctx) -> AsyncIterator[Any]:
                await check(context)
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    await result
                    return
                async for item in result:
                    yield item

            return checked

        return _rebuild(handler, wrap_unary, wrap_stream)


@dataclass
class _Call:
    """What the wrappers learn about one call while it runs."""

    correlation_id: str
    models: set[str] = field(default_factory=set)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Correlation id, tracing span, the error map, access log and request metrics."""

    def __init__(self, service: str, slow_log_ms: float = 1000.0, key_roles: KeyRoles | None = None) -> None:
        self._service = service
        self._roles = key_roles
        self._tracer = trace.get_tracer("cxr_serving.grpc")
        self._slow_s = slow_log_ms / 1000.0

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        md = _metadata(details)

        def begin(context: Ctx) -> tuple[str, Any, str]:
            # The peer is read here, while the call is alive: grpc.aio's context.peer() after the call
            # has ended (deadline, client gone) reads a finished call: '' here, and a CI crash once.
            peer = context.peer() or ""
            cid = next((md[h] for h in CORRELATION_HEADERS if md.get(h)), "") or uuid.uuid4().hex
            correlation_id_var.set(cid[:128])
            span = self._tracer.start_span(method, context=extract(md), kind=trace.SpanKind.SERVER)
            span.set_attribute("rpc.system", "grpc")
            span.set_attribute("rpc.method", method)
            span.set_attribute("cxr.correlation_id", cid)
            return cid, span, peer

        async def fail(context: Ctx, exc: Exception, cid: str) -> None:
            code, status = status_for_exception(exc, cid)
            if code is grpc.StatusCode.INTERNAL:  # the id in the line itself, whatever the log format
                log.exception("unhandled error in %s (correlation id %s)", method, cid)
            md = (*trailing_metadata(status), (CORRELATION_HEADER, cid))
            await context.abort(code, status.message, trailing_metadata=md)

        who = caller(md, self._roles.role(_key(md)) if self._roles is not None else Role.NONE)

        def finish(span: Any, started: float, code: str, peer: str, models: list[str] | None = None) -> None:
            elapsed = time.perf_counter() - started
            audit(method, code, who, models or (), peer, elapsed * 1000)
            REQUESTS_TOTAL.labels(method, code).inc()
            REQUEST_DURATION.labels(method, code).observe(elapsed)
            span.set_attribute("rpc.grpc.status_code", code)
            span.end()
            level = logging.INFO if code != "OK" or elapsed >= self._slow_s else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "rpc",
                    extra={
                        "fields": {
                            "method": method,
                            "code": code,
                            "ms": round(elapsed * 1000, 2),
                            "peer": peer,
                        }
                    },
                )

        def code_of(context: Ctx, default: str) -> str:
            c = context.code()
            if c is None:
                return default
            return c.name if isinstance(c, grpc.StatusCode) else str(c)

        @contextlib.asynccontextmanager
        async def observed(context: Ctx) -> AsyncIterator[_Call]:
            """One call's span, error map, metrics and access log, whatever the RPC shape."""
            cid, span, peer = begin(context)
            call = _Call(cid)
            started = time.perf_counter()
            code = "OK"
            try:
                with trace.use_span(span, end_on_exit=False):
                    yield call
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:
                code = "ERROR"
                await fail(context, exc, cid)
            finally:
                finish(span, started, code_of(context, code), peer, sorted(call.models))

        def wrap_unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: Ctx) -> Any:
                async with observed(context) as call:
                    result = behaviour(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    call.models.update(models_in(result))
                    # Headers only with a response: an error stays trailers-only, which is what
                    # lets clients' gRPC retry policy replay it (a call is committed on headers).
                    await context.send_initial_metadata(((CORRELATION_HEADER, call.correlation_id),))
                    return result

            return wrapped

        def wrap_writer(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            """A streaming handler that sends with `context.write()` (grpc_health's Watch), not `yield`."""

            async def wrapped(request: Any, context: Ctx) -> None:
                async with observed(context):
                    await behaviour(request, context)

            return wrapped

        def wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.iscoroutinefunction(behaviour):
                return wrap_writer(behaviour)

            async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
                async with observed(context) as call:
                    headers_sent = False
                    async for item in behaviour(request, context):
                        if not headers_sent:  # as unary: an error before the first message stays retryable
                            await context.send_initial_metadata(((CORRELATION_HEADER, call.correlation_id),))
                            headers_sent = True
                        call.models.update(models_in(item))
                        yield item

            return wrapped

        return _rebuild(handler, wrap_unary, wrap_stream)
