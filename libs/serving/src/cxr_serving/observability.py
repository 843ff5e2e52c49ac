"""The outermost interceptor: correlation id, tracing, error mapping, access and audit log and metrics
around every handler (one wrapper for all four RPC shapes); refused calls are logged here too."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Status, StatusCode

from cxr_serving.audit import audit, caller, models_in
from cxr_serving.errors import CxrError
from cxr_serving.grpc_errors import status_for_exception, trailing_metadata
from cxr_serving.logging_setup import correlation_id_var
from cxr_serving.metrics import REQUEST_DURATION, REQUESTS_TOTAL
from cxr_serving.roles import Role

if TYPE_CHECKING:
    from cxr_serving.auth import KeyRoles

    Handler = grpc.RpcMethodHandler[Any, Any]
    Ctx = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("cxr.access")

CORRELATION_HEADERS = ("x-correlation-id", "x-request-id", "kong-request-id")
CORRELATION_HEADER = "x-correlation-id"


def request_metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def record_on_span(span: Any, exc: Exception) -> None:
    """What `trace.use_span` does with an exception leaving it: an event and an ERROR status, on a recording span."""
    if isinstance(span, trace.Span) and span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(status_code=StatusCode.ERROR, description=f"{type(exc).__name__}: {exc}"))


def rebuild_handler(handler: Handler, wrap_unary: Callable[..., Any], wrap_stream: Callable[..., Any]) -> Handler:
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kw)


async def refuse(context: Ctx, method: str, md: dict[str, str], err: CxrError, role: Role) -> None:
    """Abort a refused call. Refused calls never reach the access log of ObservabilityInterceptor: log and
    audit them here (never the key)."""
    code, status = status_for_exception(err)
    REQUESTS_TOTAL.labels(method, code.name).inc()
    fields = {"method": method, "code": code.name, "reason": err.reason, "peer": context.peer()}
    log.info("rpc", extra={"fields": fields})
    audit(method, code.name, caller(md, role), (), fields["peer"], 0.0)
    await context.abort(code, status.message, trailing_metadata=trailing_metadata(status))


def refusal(handler: Handler, method: str, md: dict[str, str], err: CxrError, role: Role) -> Handler:
    async def deny(request: Any, context: Ctx) -> Any:
        await refuse(context, method, md, err, role)

    async def deny_stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
        await deny(request, context)
        yield  # pragma: no cover - abort raises

    return rebuild_handler(handler, lambda _b: deny, lambda _b: deny_stream)


@dataclass
class _Call:
    """What the wrappers learn about one call while it runs."""

    correlation_id: str
    models: set[str] = field(default_factory=set)


class _Observed:
    """`async with`: one call's span, error map, metrics and access log, whatever the RPC shape. A class rather
    than an async generator around `trace.use_span`: it runs on the event loop for every call."""

    __slots__ = ("_begin", "_fail", "_finish", "call", "context", "peer", "span", "started", "task", "token")

    def __init__(self, context: Any, begin: Callable[..., Any], fail: Callable[..., Any], finish: Callable[..., Any]):
        self.context, self._begin, self._fail, self._finish = context, begin, fail, finish

    async def __aenter__(self) -> _Call:
        cid, self.span, self.peer = self._begin(self.context)
        self.call = _Call(cid)
        self.started = time.perf_counter()
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        self.task = asyncio.current_task()
        return self.call

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any) -> bool:
        # A stream grpc.aio stopped consuming is closed later by the loop's async-generator finalizer, in a task
        # of its own: the token belongs to the call's task's context, which ends with it, so only that task detaches.
        if asyncio.current_task() is self.task:
            otel_context.detach(self.token)
        code = "OK"
        try:
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # a stream closed before its end, too
                code = "CANCELLED"
            elif isinstance(exc, Exception):  # recorded as trace.use_span does: Exceptions, not CancelledError
                code = "ABORTED_BY_HANDLER" if isinstance(exc, grpc.aio.AbortError) else "ERROR"
                try:
                    record_on_span(self.span, exc)
                except Exception:  # an exception that cannot be shown must not change how the call ends
                    log.debug("could not record %s on the span", type(exc).__name__, exc_info=True)
                if code == "ERROR":
                    await self._fail(self.context, exc, self.call.correlation_id)  # aborts the call: raises
                    return True
            return False
        finally:
            self._finish(self.context, self.span, self.started, code, self.peer, sorted(self.call.models))


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
        md = request_metadata(details)

        def begin(context: Ctx) -> tuple[str, Any, str]:
            # The peer is read here, while the call is alive: grpc.aio's context.peer() after the call
            # has ended (deadline, client gone) reads a finished call, which may give '' or raise.
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

        who = caller(md, self._roles.role_of(md) if self._roles is not None else Role.NONE)

        def finish(context: Ctx, span: Any, started: float, outcome: str, peer: str, models: list[str]) -> None:
            """`outcome`: OK, ERROR, CANCELLED or ABORTED_BY_HANDLER, when the context holds no status code."""
            elapsed = time.perf_counter() - started
            code = code_of(context, outcome)
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

        def observed(context: Ctx) -> _Observed:
            return _Observed(context, begin, fail, finish)

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

        return rebuild_handler(handler, wrap_unary, wrap_stream)
