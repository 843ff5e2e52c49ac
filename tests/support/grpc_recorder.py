"""A recording gRPC proxy in front of a real service: every unary call is forwarded byte for byte to the
service and its request bytes are kept, so a test sees exactly what a client sent (not a mock: the real
service answers)."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio


class RecordingProxy:
    """Forward every unary-unary method on ``127.0.0.1:port`` to ``upstream``; ``requests`` holds
    ``(method, request bytes)`` in arrival order."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, bytes]] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(1)
        if self._channel is not None:
            await self._channel.close()

    def of(self, method_suffix: str) -> list[bytes]:
        return [body for method, body in self.requests if method.endswith(method_suffix)]

    async def forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.requests.append((method, request))
        assert self._channel is not None
        metadata = [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith("grpc-")]
        try:
            answer: bytes = await self._channel.unary_unary(method)(
                request, metadata=metadata, timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
        return answer


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: RecordingProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method

        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.proxy.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour)
