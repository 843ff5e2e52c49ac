"""Generic gRPC proxy for gRPC clients: one handler for every method and all four RPC shapes.

Unary and streaming calls look the same on the wire (HTTP/2 frames of length-prefixed
messages), so the proxy registers every method as stream-stream with no (de)serializers and
forwards raw message bytes both ways. It forwards request metadata (minus hop-by-hop keys),
the client's deadline, the backend's initial and trailing metadata and its final status
(including `grpc-status-details-bin`), and cancels the backend call when the client goes away.
Before proxying it applies the same Kong plugins as the REST front: key-auth, rate-limiting,
correlation-id; request-size-limiting is the server's max receive message size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from cxr_gateway.limits import Denial
from cxr_gateway.upstreams import BackendUnavailable, is_connect_failure

if TYPE_CHECKING:
    from cxr_gateway.app import Gateway

log = logging.getLogger("cxr.gateway.grpc")

# never forwarded upstream: transport-level or re-created by the client channel
HOP_BY_HOP = frozenset(
    {"user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "host", ":authority"}
)


def _forwardable(md: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (md or ()) if k.lower() not in HOP_BY_HOP and not k.startswith(":")]


class ProxyHandler(grpc.GenericRpcHandler):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]

        async def behavior(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for resp in self._proxy(method, request_iterator, context):
                yield resp

        return grpc.stream_stream_rpc_method_handler(behavior)

    async def _proxy(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        gw = self.gw
        started = time.perf_counter()
        md = _forwardable(context.invocation_metadata())
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
        if denial is None:
            limiter = gw.policies.rate_limiter(hit)
            if limiter is not None:
                peer = context.peer() or ""
                decision = limiter.hit(limiter.identifier(consumer, peer.rsplit(":", 1)[0], svc, method))
                extra_initial += [(k.lower(), v) for k, v in decision.headers.items()]
                denial = decision.denial
        if denial is not None:
            gw.metrics.request(svc, route, denial.http_status, "kong", consumer.name if consumer else "", started)
            context.set_trailing_metadata(tuple((k.lower(), v) for k, v in denial.headers.items()))
            if extra_initial:
                await context.send_initial_metadata(tuple(extra_initial))
            await context.abort(denial.grpc_code, denial.message)

        backend = gw.backends[svc]
        try:
            target = backend.pick()
        except BackendUnavailable as exc:
            gw.metrics.request(svc, route, 503, "kong", consumer.name if consumer else "", started)
            await context.send_initial_metadata(tuple(extra_initial))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None and remaining < 1e8 else hit.service.read_timeout / 1000
        call = target.channel.stream_stream(method)(requests, metadata=tuple(md), timeout=timeout)
        code = grpc.StatusCode.OK
        try:
            initial = await call.initial_metadata()
            await context.send_initial_metadata(tuple(_forwardable(initial)) + tuple(extra_initial))
            async for resp in call:
                yield resp
            code = await call.code()
            context.set_trailing_metadata(tuple(_forwardable(await call.trailing_metadata())))
            if code != grpc.StatusCode.OK:
                details = await call.details()
                await context.abort(code, details or "")
            backend.record_success(target)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if is_connect_failure(err):
                backend.record_failure(target, "tcp", err.details() or "connection failed")
                msg = f"backend '{svc}' ({target.address}) is unavailable: {err.details()}"
                await context.abort(grpc.StatusCode.UNAVAILABLE, msg)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                backend.record_failure(target, "timeout", "deadline exceeded")
            context.set_trailing_metadata(tuple(_forwardable(err.trailing_metadata())))
            await context.abort(code, err.details() or "")
        finally:
            if not call.done():
                call.cancel()
            gw.metrics.request(svc, route, _http_like(code), "upstream", consumer.name if consumer else "", started)


def _http_like(code: grpc.StatusCode) -> int:
    from cxr_gateway.transcoding import http_status

    return http_status(code)
