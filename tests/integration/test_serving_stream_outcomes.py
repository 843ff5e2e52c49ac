"""A server stream through the real interceptor on a real grpc.aio server, whose client cancels it while the
handler is suspended at a `yield` (its writes held back by flow control): grpc.aio stops consuming the
generator, the loop's finalizer closes it later in a task of its own, and the call is counted, logged and
audited CANCELLED (it was OK) with no error logged for the tracing context (grpc's own report of the failed
write aside); a stream read to its end stays OK."""

from __future__ import annotations

import asyncio
import logging

import grpc

from cxr_serving import observability
from cxr_serving.metrics import REQUESTS_TOTAL

SERVICE = "/cxr.test.v1.Streams/"


async def flood(_request: bytes, _context: object):
    for _ in range(10_000):  # far more than the transport's windows hold: the handler waits at a yield
        yield b"z" * 65536


async def three(_request: bytes, _context: object):
    for i in range(3):
        yield bytes([i])


class Streams(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = {"Flood": flood, "Three": three}.get(details.method.rsplit("/", 1)[1])  # type: ignore[attr-defined]
        return grpc.unary_stream_rpc_method_handler(handler) if handler else None


def counted(method: str, code: str) -> float:
    return REQUESTS_TOTAL.labels(SERVICE + method, code)._value.get()


async def test_a_stream_cancelled_at_a_yield_is_counted_cancelled_and_logs_no_error(caplog):
    before = {key: counted(*key) for key in (("Flood", "OK"), ("Flood", "CANCELLED"), ("Three", "OK"))}
    server = grpc.aio.server(interceptors=[observability.ObservabilityInterceptor("test")])
    server.add_generic_rpc_handlers([Streams()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with caplog.at_level(logging.DEBUG):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert len([m async for m in channel.unary_stream(SERVICE + "Three")(b"")]) == 3
                call = channel.unary_stream(SERVICE + "Flood")(b"")
                await call.read()
                await asyncio.sleep(0.3)  # the server fills the windows and waits at a yield
                call.cancel()
                for _ in range(100):  # bounded: up to 10 s for the finalizer to close the generator
                    if counted("Flood", "CANCELLED") > before[("Flood", "CANCELLED")]:
                        break
                    await asyncio.sleep(0.1)
    finally:
        await server.stop(None)
    assert counted("Flood", "CANCELLED") == before[("Flood", "CANCELLED")] + 1
    assert counted("Flood", "OK") == before[("Flood", "OK")]
    assert counted("Three", "OK") == before[("Three", "OK")] + 1
    # grpc's own cygrpc logger reports the failed write; nothing of ours or of the tracing context may log an error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("grpc")]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
