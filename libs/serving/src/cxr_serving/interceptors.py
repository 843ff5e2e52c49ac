"""gRPC server interceptors: API key, then correlation id + tracing + error mapping +
access log + metrics around every handler (one wrapper for all four RPC shapes)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract

from cxr_serving.audit import audit, caller, models_in
from cxr_serving.errors import UnauthenticatedError
from cxr_serving.grpc_errors import status_for_exception, trailing_metadata
from cxr_serving.logging_setup import correlation_id_var
from cxr_serving.metrics import REQUEST_DURATION, REQUESTS_TOTAL

log = logging.getLogger("cxr.access")

API_KEY_HEADERS = ("x-api-key", "apikey")
CORRELATION_HEADERS = ("x-correlation-id", "x-request-id", "kong-request-id")
CORRELATION_HEADER = "x-correlation-id"

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


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a valid `x-api-key` (or `apikey`) with UNAUTHENTICATED."""

    def __init__(self, store: ApiKeyStore, exempt_methods: Iterable[str] = ()) -> None:
        self._store = store
        self._exempt = frozenset(exempt_methods)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method in self._exempt:  # type: ignore[attr-defined]
            return handler
        md = _metadata(details)
        key = next((md[h] for h in API_KEY_HEADERS if h in md), "")
        if key and self._store.is_valid(key):
            return handler
        err = UnauthenticatedError(
            "missing API key: send it in the x-api-key header" if not key else "invalid API key",
            reason="API_KEY_MISSING" if not key else "API_KEY_INVALID",
        )
        _, status = status_for_exception(err)

        async def deny(request: Any, context: Ctx) -> Any:
            REQUESTS_TOTAL.labels(details.method, "UNAUTHENTICATED").inc()  # type: ignore[attr-defined]
            # refused calls never reach the access log of ObservabilityInterceptor: log them here (never the key)
            method: str = details.method  # type: ignore[attr-defined]
            fields = {"method": method, "code": "UNAUTHENTICATED", "reason": err.reason, "peer": context.peer()}
            log.info("rpc", extra={"fields": fields})
            audit(method, "UNAUTHENTICATED", caller(md), (), fields["peer"], 0.0)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, status.message, trailing_metadata=trailing_metadata(status)
            )

        async def deny_stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            await deny(request, context)
            yield  # pragma: no cover - abort raises

        return _rebuild(handler, lambda _b: deny, lambda _b: deny_stream)


@dataclass
class _Call:
    """What the wrappers learn about one call while it runs."""

    correlation_id: str
    models: set[str] = field(default_factory=set)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Correlation id, tracing span, the error map, access log and request metrics."""

    def __init__(self, service: str, slow_log_ms: float = 1000.0) -> None:
        self._service = service
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

        who = caller(md)

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
