"""Plain-HTTP services of kong.yml (`protocol: http`/`https`, routes without the grpc-gateway plugin), proxied
as Kong proxies them: the request goes to `service.host:port` with its path and query (`strip_path: false`),
the body streamed both ways and never held whole, so a large STOW-RS study costs the gateway no memory.

What the upstream sees is what Kong sends (Kong's proxy reference, "Headers"): the client's headers minus the
hop-by-hop ones; `Host` of the service (`preserve_host: false`); `X-Real-IP`, `X-Forwarded-For` (the client's hops
plus the peer), `X-Forwarded-Proto`, `-Host`, `-Port` and `-Path` set by the gateway, never the client's;
`X-Consumer-Username` / `X-Consumer-Groups` from key-auth and acl (a client's own `X-Consumer-*` is dropped);
the correlation id; and the API key itself unless key-auth's `hide_credentials` is on, exactly as the gRPC proxy
forwards it as metadata. The response keeps its status, `Content-Type` and other end-to-end headers, plus the
plugins' headers (`RateLimit-*`, the echoed correlation id) and `X-Kong-Upstream-Latency` /
`X-Kong-Proxy-Latency`. request-size-limiting is enforced on the declared `Content-Length` and, for a body
without one, on the bytes counted while streaming (413, and the upstream request is abandoned). A connection
failure is retried `service.retries` times while no body byte has gone out; then 502, and 504 after
`read_timeout`, with Kong's messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cxr_gateway.kong_model import Consumer, KongConfig, Service
from cxr_gateway.limits import FORWARDED_FOR, forwarded_for, identity_metadata, is_identity_header

log = logging.getLogger("cxr.gateway.http")

HTTP_PROTOCOLS = ("http", "https")
# RFC 9110 7.6.1 connection-specific fields (and the proxy ones nginx drops); never forwarded either way
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# set by the gateway for the upstream request, whatever the client sent
GATEWAY_SET = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "x-real-ip",
        FORWARDED_FOR,
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-path",
        "x-forwarded-prefix",
    }
)
CHUNK = 1 << 16
BAD_GATEWAY = "An invalid response was received from the upstream server"
GATEWAY_TIMEOUT = "The upstream server is timing out"


class BodyTooLarge(Exception):
    """The streamed request body went over request-size-limiting's limit."""


@dataclass
class HttpBackend:
    """One plain-HTTP Kong service: its `host:port`, one pooled client session."""

    service: Service
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def address(self) -> str:
        return f"{self.service.host}:{self.service.port}"

    def url(self, path_qs: str) -> str:
        base = (self.service.path or "").rstrip("/")
        return f"{self.service.protocol}://{self.address}{base}{path_qs}"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.service
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=s.connect_timeout / 1000, sock_read=s.read_timeout / 1000
            )
            # auto_decompress off: an encoded response goes to the client as the upstream sent it
            self._session = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_http_backends(config: KongConfig) -> dict[str, HttpBackend]:
    """Every enabled plain-HTTP service. The stand-in proxies them to `host:port` only: one whose host names an
    `upstreams` entry is refused rather than run without that entry's targets and health checks."""
    out: dict[str, HttpBackend] = {}
    for svc in config.services:
        if not svc.enabled or svc.protocol not in HTTP_PROTOCOLS:
            continue
        if config.upstream(svc.host) is not None:
            raise ValueError(
                f"service {svc.name}: the stand-in proxies plain-HTTP services to service.host:port; "
                f"upstream {svc.host!r} (targets, health checks) is only supported for gRPC services"
            )
        out[svc.name] = HttpBackend(svc)
    return out


def upstream_headers(
    request: web.Request,
    *,
    drop: frozenset[str],
    consumer: Consumer | None,
    groups: str,
    correlation: tuple[str, str] | None,
) -> CIMultiDict[str]:
    """The request headers Kong sends upstream (see the module docstring); `drop`: the key names when
    key-auth hides credentials."""
    out: CIMultiDict[str] = CIMultiDict()
    corr_name = correlation[0].lower() if correlation else ""
    for name, value in request.headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in GATEWAY_SET or low in drop or low == corr_name or is_identity_header(low):
            continue
        out.add(name, value)
    if request.content_length is not None:
        out["Content-Length"] = str(request.content_length)
    peer = request.remote or ""
    if peer:
        out["X-Real-IP"] = peer
    xff = forwarded_for(request.headers.getall(FORWARDED_FOR, []), peer)
    if xff:
        out["X-Forwarded-For"] = xff
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Forwarded-Host"] = request.host.rsplit(":", 1)[0] if request.host.count(":") == 1 else request.host
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if sock:
        out["X-Forwarded-Port"] = str(sock[1])
    out["X-Forwarded-Path"] = request.raw_path.split("?", 1)[0]
    if correlation:
        out[correlation[0]] = correlation[1]
    for k, v in identity_metadata(consumer, groups):
        out[k] = v
    return out


async def proxy(
    request: web.Request,
    backend: HttpBackend,
    headers: Mapping[str, str],
    limit: int | None,
    out_headers: Mapping[str, str],
    started: float,
) -> web.StreamResponse:
    """Send the request to the backend, streaming the body, and stream the answer back; `BodyTooLarge` when the
    body goes over `limit` bytes before the upstream answered."""
    svc = backend.service
    sent = 0
    body_started = False
    too_large = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent, body_started, too_large
        async for chunk in request.content.iter_chunked(CHUNK):
            body_started = True
            sent += len(chunk)
            if limit is not None and sent > limit:
                too_large = True
                raise BodyTooLarge
            yield chunk

    has_body = request.body_exists
    attempts = svc.retries + 1
    url = backend.url(request.raw_path)
    for attempt in range(attempts):
        up_started = time.perf_counter()
        try:
            upstream = await backend.session().request(
                request.method,
                url,
                headers=headers,
                data=body() if has_body else None,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ClientConnectorError as exc:
            if too_large:
                raise BodyTooLarge from None
            if not body_started and attempt + 1 < attempts:
                continue
            log.warning("upstream %s (%s) failed: %s", backend.name, backend.address, exc)
            return _kong_error(502, BAD_GATEWAY, out_headers)
        except TimeoutError:
            return _kong_error(504, GATEWAY_TIMEOUT, out_headers)
        except (aiohttp.ClientError, BodyTooLarge) as exc:
            if too_large:
                raise BodyTooLarge from None
            log.warning("upstream %s (%s) failed: %s", backend.name, backend.address, exc)
            return _kong_error(502, BAD_GATEWAY, out_headers)
        break
    async with upstream:
        up_ms = int((time.perf_counter() - up_started) * 1000)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                resp.headers.add(name, value)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        resp.headers.update(out_headers)
        resp.headers["X-Kong-Upstream-Latency"] = str(up_ms)
        resp.headers["X-Kong-Proxy-Latency"] = str(max(0, int((up_started - started) * 1000)))
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:  # the status is out: the client sees a cut body
            log.warning("upstream %s (%s) broke off its answer: %s", backend.name, backend.address, exc)
            return resp
        await resp.write_eof()
        return resp


def _kong_error(status: int, message: str, headers: Mapping[str, Any]) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=dict(headers))
