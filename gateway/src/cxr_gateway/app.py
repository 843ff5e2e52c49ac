"""The local stand-in for Kong: a REST front (aiohttp) and a gRPC proxy (grpc.aio) driven by kong.yml.

REST request pipeline, in Kong's plugin order:
  correlation-id → route match (404 "no Route matched") → key-auth (401) →
  request-size-limiting (413) → acl (403) → rate-limiting (429) → grpc-gateway transcoding → backend
A route of a plain-HTTP service (no grpc-gateway plugin) goes through the same plugins and is then proxied
as HTTP with its body streamed (`http_proxy`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from cxr_gateway.grpc_proxy import ProxyHandler
from cxr_gateway.http_proxy import HTTP_PROTOCOLS, BodyTooLarge, HttpBackend, build_http_backends, upstream_headers
from cxr_gateway.http_proxy import proxy as http_proxy
from cxr_gateway.kong_model import KongConfig
from cxr_gateway.limits import FORWARDED_FOR, Denial, forwarded_for, identity_metadata
from cxr_gateway.metrics import GatewayMetrics
from cxr_gateway.openapi import build_openapi
from cxr_gateway.policies import Policies, RouteHit
from cxr_gateway.routes import ProtoCatalog, RestMatch, match_rest
from cxr_gateway.transcoding import (
    TranscodeError,
    error_body,
    error_from_rpc,
    http_status,
    request_message,
    response_json,
)
from cxr_gateway.upstreams import Backend, BackendUnavailable, TargetState, build_backends, is_connect_failure, trailers

log = logging.getLogger("cxr.gateway")

# request headers forwarded to the backend as gRPC metadata (besides the key and correlation id)
FORWARD_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id", "x-b3-traceid", "x-b3-spanid", "b3")
JSON = "application/json"


@dataclass
class Ports:
    rest: int
    grpc: int
    status: int


class Gateway:
    def __init__(self, kong: KongConfig, catalog: ProtoCatalog, clock: Callable[[], float] = time.time) -> None:
        self.kong = kong
        self.catalog = catalog
        self.policies = Policies(kong, clock)
        prom = kong.global_plugin("prometheus")
        self.metrics = GatewayMetrics(per_consumer=bool(prom and prom.config.per_consumer))
        self.backends: dict[str, Backend] = {}
        self.http_backends: dict[str, HttpBackend] = {}
        self.openapi = build_openapi(catalog)
        self._runners: list[web.AppRunner] = []
        self._grpc_server: grpc.aio.Server | None = None
        self.ports = Ports(0, 0, 0)

    # ------------------------------------------------------------------ lifecycle
    async def start(
        self, host: str = "127.0.0.1", rest_port: int = 8000, grpc_port: int = 8001, status_port: int | None = 8100
    ) -> Ports:
        self.http_backends = build_http_backends(self.kong)
        self.backends = build_backends(self.kong)
        for b in self.backends.values():
            b.start()
        rest = web.Application(client_max_size=1024**3)
        rest.router.add_get("/openapi.json", self._openapi)
        rest.router.add_route("*", "/{tail:.*}", self._rest)
        rest_port = await self._serve(rest, host, rest_port)
        size = self._grpc_message_limit()
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", 256 * 1024 * 1024)]
        )
        server.add_generic_rpc_handlers((ProxyHandler(self),))
        grpc_port = server.add_insecure_port(f"{host}:{grpc_port}")
        await server.start()
        self._grpc_server = server
        st = 0
        if status_port is not None:
            status = web.Application()
            status.router.add_get("/metrics", self._metrics)
            status.router.add_get("/status", self._status)
            st = await self._serve(status, host, status_port)
        self.ports = Ports(rest_port, grpc_port, st)
        return self.ports

    async def _serve(self, app: web.Application, host: str, port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    def _grpc_message_limit(self) -> int:
        """The transport's cap on one message: twice the size limit, so that a request a little over
        the limit reaches the proxy, which refuses it with the ErrorInfo; far larger ones the
        transport refuses itself (RESOURCE_EXHAUSTED without details) before buffering them."""
        g = self.kong.global_plugin("request-size-limiting")
        return min(2 * int(g.config.limit_bytes), 2**31 - 1) if g else 256 * 1024 * 1024

    async def stop(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(1)
        for r in self._runners:
            await r.cleanup()
        for b in self.backends.values():
            await b.close()
        for h in self.http_backends.values():
            await h.close()

    # ------------------------------------------------------------------ status endpoints
    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)

    async def _metrics(self, request: web.Request) -> web.Response:
        for b in self.backends.values():
            for t in b.targets:
                self.metrics.set_health(b.upstream_name or b.name, t.address, t.healthy)
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "server": "cxr-gateway (development stand-in for Kong)",
                "backends": {
                    b.name: [{"target": t.address, "healthy": t.healthy, "error": t.last_error} for t in b.targets]
                    for b in self.backends.values()
                },
            }
        )

    # ------------------------------------------------------------------ REST
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        headers = {k.lower(): v for k, v in request.headers.items()}
        out_headers: dict[str, str] = {}
        corr = self.policies.correlation
        cid = corr.get_or_create(headers) if corr else ""
        if corr is not None and corr.config.echo_downstream:
            out_headers[corr.header] = cid
        path = request.raw_path.split("?", 1)[0]
        hit = self.policies.match_http(request.method, path)
        if hit is None:
            self.metrics.request("", "", 404, "kong", "", started)
            return _json(404, {"message": "no Route matched with those values"}, out_headers)
        svc, route = hit.service.name, hit.route.name
        consumer = None

        def deny(d: Denial) -> web.Response:
            self.metrics.request(svc, route, d.http_status, "kong", consumer.name if consumer else "", started)
            return _json(d.http_status, d.body(), {**out_headers, **d.headers})

        auth = self.policies.key_auth(hit)
        if auth is not None:
            res = auth.authenticate(headers, request.query)
            if isinstance(res, Denial):
                return deny(res)
            consumer = res
            auth.strip(headers)
        size = self.policies.size_limit(hit)
        if size is not None:
            denial = size.check_declared(request.content_length)
            if denial is not None:
                return deny(denial)
        proto = self.policies.grpc_gateway_proto(hit)
        plain = proto is None and hit.service.protocol in HTTP_PROTOCOLS  # streamed to the upstream, not read here
        body = b"" if plain else await _read_body(request, size.limit if size else None)
        if body is None:
            assert size is not None
            return deny(size.too_large())
        groups = ""
        acl = self.policies.acl(hit)
        if acl is not None:
            allowed = acl.check(consumer, route)
            if isinstance(allowed, Denial):
                return deny(allowed)
            groups = allowed
        limiter = self.policies.rate_limiter(hit)
        if limiter is not None:
            peer = request.remote or ""
            decision = limiter.hit(limiter.identifier(consumer, peer, svc, path))
            out_headers.update(decision.headers)
            if decision.denial is not None:
                return deny(decision.denial)

        if plain:
            up_headers = upstream_headers(
                request,
                drop=frozenset(n.lower() for n in auth.config.key_names)
                if auth and auth.config.hide_credentials
                else frozenset(),
                consumer=consumer,
                groups=groups,
                correlation=(corr.header, cid) if corr is not None else None,
            )
            try:
                answer = await http_proxy(
                    request, self.http_backends[svc], up_headers, size.limit if size else None, out_headers, started
                )
            except BodyTooLarge:
                assert size is not None
                return deny(size.too_large())
            self.metrics.request(svc, route, answer.status, "upstream", consumer.name if consumer else "", started)
            return answer
        if proto is None:
            self.metrics.request(svc, route, 502, "kong", "", started)
            return _json(
                502, {"message": "the stand-in proxies REST only through the grpc-gateway plugin"}, out_headers
            )
        match = match_rest(self.catalog.for_proto_file(proto), request.method, path)
        if match is None:
            self.metrics.request(svc, route, 404, "kong", "", started)
            return _json(404, error_body(grpc.StatusCode.NOT_FOUND, "Not Found"), out_headers)
        md = [(k, headers[k]) for k in (*(auth.config.key_names if auth else ()), *FORWARD_HEADERS) if k in headers]
        md = [(k.lower(), v) for k, v in md]
        if corr is not None:
            md.append((corr.header.lower(), cid))
        # like Kong: the client's X-Forwarded-For plus the peer this gateway saw, so allowed_ips judges the caller
        xff = forwarded_for(request.headers.getall(FORWARDED_FOR, []), request.remote or "")
        if xff:
            md.append((FORWARDED_FOR, xff))
        md += identity_metadata(consumer, groups)
        resp = await self._call(request, hit, match, body, md, out_headers)
        self.metrics.request(svc, route, resp.status, "upstream", consumer.name if consumer else "", started)
        return resp

    async def _call(
        self,
        request: web.Request,
        hit: RouteHit,
        match: RestMatch,
        body: bytes,
        md: list[tuple[str, str]],
        out_headers: dict[str, str],
    ) -> web.StreamResponse:
        try:
            msg = request_message(match.rpc, match.binding, match.path_params, request.query.items(), body)
        except TranscodeError as exc:
            return _json(400, error_body(grpc.StatusCode.INVALID_ARGUMENT, str(exc)), out_headers)
        backend = self.backends[hit.service.name]
        timeout = hit.service.read_timeout / 1000
        payload = msg.SerializeToString()
        resp_cls = match.rpc.response_class()
        if match.rpc.client_streaming:
            return _json(
                501,
                error_body(grpc.StatusCode.UNIMPLEMENTED, "client streaming is not available over REST"),
                out_headers,
            )
        attempts = hit.service.retries + 1
        for attempt in range(attempts):
            try:
                target = backend.pick()
            except BackendUnavailable as exc:
                return _json(503, error_body(grpc.StatusCode.UNAVAILABLE, str(exc)), out_headers)
            up_started = time.perf_counter()
            try:
                if match.rpc.server_streaming:
                    return await self._stream(request, target, backend, match, payload, md, timeout, out_headers)
                raw = await target.channel.unary_unary(
                    match.rpc.full_method, request_serializer=None, response_deserializer=None
                )(payload, metadata=md, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if is_connect_failure(err):
                    backend.record_failure(target, "tcp", err.details() or "connection failed")
                    if attempt + 1 < attempts:
                        continue
                    text = f"backend '{backend.name}' ({target.address}) is unavailable: {err.details()}"
                    return _json(503, error_body(grpc.StatusCode.UNAVAILABLE, text), out_headers)
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    backend.record_failure(target, "timeout", "deadline exceeded")
                backend.record_success(target)
                body_json = error_from_rpc(err.code(), err.details() or "", trailers(err))
                return _json(http_status(err.code()), body_json, out_headers)
            backend.record_success(target)
            out_headers["X-Kong-Upstream-Latency"] = str(int((time.perf_counter() - up_started) * 1000))
            result = response_json(resp_cls.FromString(raw), match.binding.response_body)
            return _json(200, result, out_headers)
        raise AssertionError("unreachable")

    async def _stream(
        self,
        request: web.Request,
        target: TargetState,
        backend: Backend,
        match: RestMatch,
        payload: bytes,
        md: list[tuple[str, str]],
        timeout: float,
        out_headers: dict[str, str],
    ) -> web.StreamResponse:
        """Server streaming as grpc-gateway does it: one JSON object per line, `{"result": ...}` or `{"error": ...}`."""
        call = target.channel.unary_stream(match.rpc.full_method, request_serializer=None, response_deserializer=None)(
            payload, metadata=md, timeout=timeout
        )
        resp_cls = match.rpc.response_class()
        resp: web.StreamResponse | None = None
        try:
            async for raw in call:
                if resp is None:
                    resp = web.StreamResponse(status=200, headers={**out_headers, "Content-Type": JSON})
                    await resp.prepare(request)
                line = {"result": response_json(resp_cls.FromString(raw), match.binding.response_body)}
                await resp.write(json.dumps(line).encode() + b"\n")
        except grpc.aio.AioRpcError as err:
            if resp is None:
                raise  # nothing sent yet: the caller maps it to a plain HTTP error
            line = {"error": error_from_rpc(err.code(), err.details() or "", trailers(err))}
            await resp.write(json.dumps(line).encode() + b"\n")
        finally:
            if not call.done():
                call.cancel()
        backend.record_success(target)
        if resp is None:
            return _json(200, {}, out_headers)
        await resp.write_eof()
        return resp


def _json(status: int, body: Any, headers: Mapping[str, str]) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), headers={**headers, "Content-Type": JSON})


async def _read_body(request: web.Request, limit: int | None) -> bytes | None:
    """The whole body, or None once it exceeds `limit` (Kong reads it when there is no Content-Length)."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        total += len(chunk)
        if limit is not None and total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_forever() -> None:
    await asyncio.Event().wait()
