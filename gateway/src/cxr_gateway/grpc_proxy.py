"""Generic gRPC proxy for gRPC clients: one handler for every method and all four RPC shapes.

Unary and streaming calls look the same on the wire (HTTP/2 frames of length-prefixed
messages), so the proxy registers any method as stream-stream with no (de)serializers and
forwards raw message bytes both ways (methods the descriptor set knows to be unary take a
unary fast path). It forwards request metadata (minus hop-by-hop keys),
the client's deadline, the backend's initial and trailing metadata and its final status
(including `grpc-status-details-bin`), and cancels the backend call when the client goes away.
Before proxying it applies the same Kong plugins as the REST front: key-auth,
request-size-limiting (on the request messages' bytes), acl, rate-limiting, correlation-id.
A refusal ends the call with the plugin's gRPC code and the same google.rpc.Status (ErrorInfo
reason and domain) that the REST front returns as JSON, in `grpc-status-details-bin`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc

from cxr_gateway.limits import (
    FORWARDED_FOR,
    Denial,
    SizeLimit,
    forwarded_for,
    identity_metadata,
    is_identity_header,
)
from cxr_gateway.transcoding import http_status
from cxr_gateway.upstreams import Backend, BackendUnavailable, TargetState, is_connect_failure
from cxr_serving.auth import peer_address

if TYPE_CHECKING:
    from cxr_gateway.app import Gateway

log = logging.getLogger("cxr.gateway.grpc")

# never forwarded upstream: transport-level or re-created by the client channel
HOP_BY_HOP = frozenset(
    {"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "host", ":authority"}
)


def _forwardable(md: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (md or ()) if k.lower() not in HOP_BY_HOP and not k.startswith(":")]


async def _deny(context: grpc.aio.ServicerContext[Any, Any], denial: Denial) -> None:
    await context.abort(denial.grpc_code, denial.message, trailing_metadata=denial.trailers())


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic only in grpc-stubs, not at runtime
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        rpc = self.gw.catalog.rpcs.get(method)
        if rpc is not None and not rpc.client_streaming and not rpc.server_streaming:
            # fast path for methods the descriptor set knows are unary (fewer tasks than a stream)
            async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                return await self._unary(method, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)

        async def behavior(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for resp in self._stream(method, request_iterator, context):
                yield resp

        return grpc.stream_stream_rpc_method_handler(behavior)

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], request_size: int | None = None
    ) -> _Admitted:
        """Route, key-auth, size limit (`request_size`: a unary request's bytes), acl, rate limit,
        correlation id; aborts the call when a plugin refuses it."""
        gw = self.gw
        started = time.perf_counter()
        md = [(k, v) for k, v in _forwardable(context.invocation_metadata()) if not is_identity_header(k)]
        # like Kong: the client's X-Forwarded-For plus the peer this proxy saw, never the client's claim alone
        peer_ip = peer_address(context.peer() or "")
        xff = forwarded_for([v for k, v in md if k.lower() == FORWARDED_FOR and isinstance(v, str)], str(peer_ip or ""))
        md = [(k, v) for k, v in md if k.lower() != FORWARDED_FOR] + ([(FORWARDED_FOR, xff)] if xff else [])
        headers = {k.lower(): v for k, v in md if isinstance(v, str)}
        corr = gw.policies.correlation
        cid = corr.get_or_create(headers) if corr else ""
        extra_initial: list[tuple[str, str]] = []
        if corr is not None:
            md = [(k, v) for k, v in md if k.lower() != corr.header.lower()] + [(corr.header.lower(), cid)]
            if corr.config.echo_downstream:
                extra_initial.append((corr.header.lower(), cid))

        hit = gw.policies.match_grpc(method)
        if hit is None:
            gw.metrics.request("", "", 404, "kong", "", started)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no Route matched with those values")
        assert hit is not None
        svc, route = hit.service.name, hit.route.name
        denial: Denial | None = None
        consumer = None
        auth = gw.policies.key_auth(hit)
        if auth is not None:
            res = auth.authenticate(headers)
            if isinstance(res, Denial):
                denial = res
            else:
                consumer = res
                md = [(k, v) for k, v in md if not (auth.config.hide_credentials and k in auth.config.key_names)]
        size = gw.policies.size_limit(hit)
        if denial is None and size is not None and request_size is not None and request_size > size.limit:
            denial = size.too_large()
        groups = ""
        acl = gw.policies.acl(hit)
        if denial is None and acl is not None:
            allowed = acl.check(consumer, route)
            if isinstance(allowed, Denial):
                denial = allowed
            else:
                groups = allowed
        if denial is None:
            limiter = gw.policies.rate_limiter(hit)
            if limiter is not None:
                peer = context.peer() or ""
                decision = limiter.hit(limiter.identifier(consumer, peer.rsplit(":", 1)[0], svc, method))
                extra_initial += [(k.lower(), v) for k, v in decision.headers.items()]
                denial = decision.denial
        who = consumer.name if consumer else ""
        if denial is not None:
            gw.metrics.request(svc, route, denial.http_status, "kong", who, started)
            if extra_initial:
                await context.send_initial_metadata(tuple(extra_initial))
            await _deny(context, denial)
        md += identity_metadata(consumer, groups)

        backend = gw.backends[svc]
        try:
            target = backend.pick()
        except BackendUnavailable as exc:
            gw.metrics.request(svc, route, 503, "kong", who, started)
            await context.send_initial_metadata(tuple(extra_initial))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None and remaining < 1e8 else hit.service.read_timeout / 1000
        return _Admitted(
            svc,
            route,
            who,
            backend,
            target,
            tuple(md),
            tuple(extra_initial),
            timeout,
            started,
            hit.service.retries,
            size,
        )

    async def _failed(self, a: _Admitted, err: grpc.aio.AioRpcError, context: Any) -> None:
        if is_connect_failure(err):
            a.backend.record_failure(a.target, "tcp", err.details() or "connection failed")
            msg = f"backend '{a.service}' ({a.target.address}) is unavailable: {err.details()}"
            await context.abort(grpc.StatusCode.UNAVAILABLE, msg)
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            a.backend.record_failure(a.target, "timeout", "deadline exceeded")
        context.set_trailing_metadata(tuple(_forwardable(err.trailing_metadata())))
        await context.abort(err.code(), err.details() or "")

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        a = await self._admit(method, context, len(request))
        code = grpc.StatusCode.OK
        target = a.target
        try:
            for attempt in range(a.retries + 1):
                call = target.channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    request, metadata=a.metadata, timeout=a.timeout
                )
                try:
                    resp: bytes = await call
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    if is_connect_failure(err) and attempt < a.retries:
                        # like Kong: a connection failure is retried on the next healthy target
                        a.backend.record_failure(target, "tcp", err.details() or "connection failed")
                        try:
                            target = a.backend.pick()
                        except BackendUnavailable:
                            pass
                        continue
                    await self._failed(replace(a, target=target), err, context)
                initial = tuple(_forwardable(await call.initial_metadata()))
                await context.send_initial_metadata(initial + a.extra_initial)
                context.set_trailing_metadata(tuple(_forwardable(await call.trailing_metadata())))
                a.backend.record_success(target)
                code = grpc.StatusCode.OK
                return resp
            raise AssertionError("unreachable")
        finally:
            self.gw.metrics.request(a.service, a.route, http_status(code), "upstream", a.consumer, a.started)

    async def _stream(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        a = await self._admit(method, context)
        over: list[Denial] = []
        limit = a.size.limit if a.size is not None else None

        async def limited() -> AsyncIterator[bytes]:
            # Kong limits the request body: here the bytes of every request message together
            total = 0
            async for message in requests:
                total += len(message)
                if limit is not None and total > limit:
                    assert a.size is not None
                    over.append(a.size.too_large())
                    call.cancel()
                    return
                yield message

        call = a.target.channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
            limited(), metadata=a.metadata, timeout=a.timeout
        )
        code = grpc.StatusCode.OK
        try:
            try:
                initial = await call.initial_metadata()
                await context.send_initial_metadata(tuple(_forwardable(initial)) + a.extra_initial)
                async for resp in call:
                    yield resp
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                if not over:
                    raise
            if over:
                await _deny(context, over[0])
            code = await call.code()
            context.set_trailing_metadata(tuple(_forwardable(await call.trailing_metadata())))
            if code != grpc.StatusCode.OK:
                details = await call.details()
                await context.abort(code, details or "")
            a.backend.record_success(a.target)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            await self._failed(a, err, context)
        finally:
            if not call.done():
                call.cancel()
            status, source = (over[0].http_status, "kong") if over else (http_status(code), "upstream")
            self.gw.metrics.request(a.service, a.route, status, source, a.consumer, a.started)


@dataclass(frozen=True)
class _Admitted:
    service: str
    route: str
    consumer: str
    backend: Backend
    target: TargetState
    metadata: tuple[tuple[str, Any], ...]
    extra_initial: tuple[tuple[str, str], ...]
    timeout: float
    started: float
    retries: int
    size: SizeLimit | None
