"""Key rotation as Kubernetes performs it: the chart mounts the API-key Secret as a directory,
and the kubelet updates such a volume atomically (a new timestamped directory, then the
`..data` symlink swapped). A running service must accept the new key and refuse the old one
without a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from tests.support.secret_volumes import kubelet_write
from tests.support.servers import make_settings, running_server
from tests.support.toy_service import build_toy

OLD_KEY = "old-key-0123456789abcdef"
NEW_KEY = "new-key-fedcba9876543210"


async def _code(stub: pb_grpc.ClassificationServiceStub, key: str) -> grpc.StatusCode:
    try:
        await stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", key),), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_rotated_secret_is_picked_up_without_restart(tmp_path: Path) -> None:
    volume = tmp_path / "secrets"
    volume.mkdir()
    kubelet_write(volume, "2026_01_01_00_00_00.000000001", f"{OLD_KEY}\n")
    settings = make_settings(security__api_keys=[], security__api_key_file=str(volume / "api-keys"))
    async with running_server(settings, build_toy(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.ClassificationServiceStub(ch)
            assert await _code(stub, OLD_KEY) == grpc.StatusCode.OK
            assert await _code(stub, NEW_KEY) == grpc.StatusCode.UNAUTHENTICATED
            kubelet_write(volume, "2026_01_02_00_00_00.000000002", f"{NEW_KEY}\n")
            deadline = asyncio.get_running_loop().time() + 10
            while await _code(stub, NEW_KEY) != grpc.StatusCode.OK:
                assert asyncio.get_running_loop().time() < deadline, "new key not accepted within 10 s"
                await asyncio.sleep(0.25)
            assert await _code(stub, OLD_KEY) == grpc.StatusCode.UNAUTHENTICATED
