"""The client retries on UNAVAILABLE only the catalog services declared `idempotent`: an extra
service's gRPC name is in the channel's retry policy when it is, and a real call that first gets
UNAVAILABLE is replayed; a non-idempotent service is absent from the policy and called once."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from cxr_client import AsyncCxrClient, ClientConfig
from cxr_client.client import _options
from cxr_protos.common.v1 import common_pb2

SERVICE = "cxr.flaky.v1.FlakyService"
METHOD = f"/{SERVICE}/Echo"


def _env(tmp_path: Path, idempotent: bool, port: int) -> dict[str, str]:
    entry = {
        "name": "flaky",
        "package": "json",
        "binding": "json:loads",
        "grpc_services": [SERVICE],
        "port": 50061,
        "metrics_port": 9161,
        "model_admin": False,
        "idempotent": idempotent,
    }
    path = tmp_path / f"flaky_{idempotent}.json"
    path.write_text(json.dumps({"services": [entry]}))
    return {"CXR_SERVICE_CATALOG": str(path), "CXR_FLAKY_ENDPOINT": f"127.0.0.1:{port}"}


def _retried(config: ClientConfig) -> set[str]:
    policy = json.loads(dict(_options(config))["grpc.service_config"])
    return {n["service"] for mc in policy["methodConfig"] if "retryPolicy" in mc for n in mc["name"]}


@pytest.mark.parametrize("idempotent", [True, False])
async def test_only_idempotent_catalog_services_are_retried(tmp_path: Path, idempotent: bool) -> None:
    calls: list[str] = []

    async def echo(request: common_pb2.Image, context: grpc.aio.ServicerContext) -> common_pb2.Image:
        calls.append(request.content_type)
        if len(calls) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return request

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=common_pb2.Image.FromString,
                response_serializer=common_pb2.Image.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = ClientConfig.from_env(_env(tmp_path, idempotent, port))
        retried = _retried(config)
        assert (SERVICE in retried) is idempotent
        assert {"cxr.classification.v1.ClassificationService", "grpc.health.v1.Health"} <= retried
        async with AsyncCxrClient(config) as client:
            call = client.channel("flaky").unary_unary(
                METHOD,
                request_serializer=common_pb2.Image.SerializeToString,
                response_deserializer=common_pb2.Image.FromString,
            )
            request = common_pb2.Image(content_type="image/png")
            if idempotent:
                assert await call(request, timeout=10) == request
                assert len(calls) == 2  # replayed once after UNAVAILABLE
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(request, timeout=10)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert len(calls) == 1  # never replayed
    finally:
        await server.stop(None)
