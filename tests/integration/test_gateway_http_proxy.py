"""The stand-in's plain-HTTP proxy (kong.yml's `dicom-stow` service) against an aiohttp server that answers with
what it received: the headers Kong adds, drops and forwards, the body streamed byte for byte, the answer's status
and headers passed back, and Kong's 502 when the upstream is down. The real node behind the same route:
tests/e2e/test_gateway_stow.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import httpx
from aiohttp import web

from tests.support.gateway_helpers import running_gateway
from tests.support.servers import TEST_KEY, free_port


@contextlib.asynccontextmanager
async def echo_upstream() -> AsyncIterator[int]:
    async def echo(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        body = {
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "path_qs": request.raw_path,
            "size": size,
            "sha256": digest.hexdigest(),
        }
        return web.json_response(body, status=201, headers={"X-Upstream": "echo", "Retry-After": "7"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_kong_headers_streamed_body_and_answer_pass_through():
    data = os.urandom(3 * 1024 * 1024 + 17)
    async with echo_upstream() as port, running_gateway({"dicom-stow": port}) as gw, httpx.AsyncClient() as http:
        r = await http.post(
            f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies?x=1&y=2",
            content=chunks(data),
            headers={
                "apikey": TEST_KEY,
                "Content-Type": "multipart/related; boundary=b",
                "X-Forwarded-For": "10.9.9.9",
                "X-Forwarded-Proto": "https",  # a client's claims the gateway replaces
                "X-Real-IP": "10.1.1.1",
                "X-Consumer-Groups": "admin",
                "X-Consumer-Username": "cxr-admin",
                "X-Custom": "kept",
                "Keep-Alive": "timeout=5",
                "X-Correlation-ID": "corr-42",
            },
            timeout=60,
        )
        assert r.status_code == 201, r.text
        assert r.headers["x-upstream"] == "echo" and r.headers["retry-after"] == "7"
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers["x-correlation-id"] == "corr-42" and r.headers["ratelimit-remaining"] == "99"
        assert "x-kong-upstream-latency" in r.headers and "x-kong-proxy-latency" in r.headers
        got = r.json()
    headers: dict[str, list[str]] = {}
    for k, v in got["headers"]:
        headers.setdefault(k, []).append(v)
    assert got["path_qs"] == "/dicom-web/studies?x=1&y=2"
    assert (got["size"], got["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert headers["host"] == [f"127.0.0.1:{port}"]
    assert headers["apikey"] == [TEST_KEY]  # hide_credentials: false, as over gRPC: the node checks it again
    assert headers["x-consumer-username"] == ["cxr-client"] and headers["x-consumer-groups"] == ["inference"]
    assert headers["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"] and headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"] and headers["x-forwarded-host"] == ["127.0.0.1"]
    assert headers["x-forwarded-port"] == [str(gw.ports.rest)]
    assert headers["x-forwarded-path"] == ["/dicom-web/studies"]
    assert headers["x-correlation-id"] == ["corr-42"] and headers["x-custom"] == ["kept"]
    assert headers["content-type"] == ["multipart/related; boundary=b"]
    assert "keep-alive" not in headers


async def test_hidden_credentials_are_not_forwarded_and_a_down_upstream_is_502():
    def hide(kong):
        kong.global_plugin("key-auth").config.hide_credentials = True

    async with echo_upstream() as port, running_gateway({"dicom-stow": port}, mutate=hide) as gw:
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies",
                content=b"x" * 10,
                headers={"x-api-key": TEST_KEY},
                timeout=30,
            )
    assert r.status_code == 201
    names = {k for k, _ in r.json()["headers"]}
    assert "x-api-key" not in names and "apikey" not in names and r.json()["size"] == 10

    async with running_gateway({"dicom-stow": free_port()}) as gw, httpx.AsyncClient() as http:
        r = await http.post(
            f"http://127.0.0.1:{gw.ports.rest}/dicom-web/studies", content=b"x", headers={"apikey": TEST_KEY}
        )
    assert r.status_code == 502 and r.json()["message"] == "An invalid response was received from the upstream server"
