"""Authentication and transport security of the runtime.

Policy (enforced by `ApiKeyInterceptor`, documented in docs/reliability.md):
every method of every service, server reflection included, needs a valid `x-api-key`
(or Kong's `apikey`) header; only `grpc.health.v1.Health/Check` and `/Watch` are exempt,
because kubelet gRPC probes and client-side health checking cannot send a key and health
reveals nothing but SERVING/NOT_SERVING. Keys rotate without a restart (api_key_file is
re-read when it changes). TLS and mutual TLS come from `security.tls`; the API key is still
required over mTLS (defence in depth)."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.rag.v1 import rag_service_pb2 as rag_pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rag_grpc
from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings
from tests.support.pki import Pki, make_pki
from tests.support.servers import auth, make_settings, running_server
from tests.support.targets import IMG, Target, available_targets

CONTRACT_SERVICES: list[ServiceDescriptor] = [
    cls_pb.DESCRIPTOR.services_by_name["ClassificationService"],
    seg_pb.DESCRIPTOR.services_by_name["SegmentationService"],
    rag_pb.DESCRIPTOR.services_by_name["RagService"],
]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
EXEMPT = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
REAL_TARGETS = {t.name: t for t in available_targets(include_toy=False)}


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_any(ch: grpc.aio.Channel, method: MethodDescriptor, metadata, timeout: float = 20) -> grpc.StatusCode:
    """Call a method with its empty request, whatever its shape; the status code (first message for streams)."""
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    kw = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": response.FromString}
    path = path_of(method)
    try:
        if method.server_streaming:
            if method.client_streaming:
                stream = ch.stream_stream(path, **kw)(iter([request]), metadata=metadata, timeout=timeout)
            else:
                stream = ch.unary_stream(path, **kw)(request, metadata=metadata, timeout=timeout)
            try:
                await stream.read()  # the first message, or EOF
            finally:
                stream.cancel()
        elif method.client_streaming:
            await ch.stream_unary(path, **kw)(iter([request]), metadata=metadata, timeout=timeout)
        else:
            await ch.unary_unary(path, **kw)(request, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _contract_binding(settings: Settings) -> ServiceBinding:
    """Every service of the API contract on one server, with the generated (unimplemented) servicers."""

    def register(server: grpc.aio.Server) -> None:
        cls_grpc.add_ClassificationServiceServicer_to_server(cls_grpc.ClassificationServiceServicer(), server)
        seg_grpc.add_SegmentationServiceServicer_to_server(seg_grpc.SegmentationServiceServicer(), server)
        rag_grpc.add_RagServiceServicer_to_server(rag_grpc.RagServiceServicer(), server)

    return ServiceBinding("classification", [s.full_name for s in CONTRACT_SERVICES], register)


def _all_methods(services) -> list[MethodDescriptor]:
    return [m for s in [*services, REFLECTION, HEALTH] for m in s.methods]


async def _assert_policy(ch: grpc.aio.Channel, methods: list[MethodDescriptor]) -> dict[str, str]:
    seen = {}
    for method in methods:
        path = path_of(method)
        for name, md in (("no key", None), ("wrong key", auth("wrong")), ("empty key", auth(""))):
            code = await call_any(ch, method, md)
            if path in EXEMPT:
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), (path, name, code)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (path, name, code)
        code = await call_any(ch, method, auth())
        assert code != grpc.StatusCode.UNAUTHENTICATED, path
        seen[path] = code.name
    return seen


async def test_every_contract_method_and_reflection_needs_a_key():
    methods = _all_methods(CONTRACT_SERVICES)
    assert len(methods) >= 18  # every RPC of the contract, reflection, health
    settings = make_settings()
    async with running_server(settings, _contract_binding(settings)) as server, _plain(server.port) as ch:
        seen = await _assert_policy(ch, methods)
    assert seen["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] == "OK"


@pytest.mark.parametrize("name", sorted(REAL_TARGETS))
async def test_every_method_of_the_real_service_needs_a_key(name):
    target: Target = REAL_TARGETS[name]
    settings = target.settings()
    async with running_server(settings, target.build(settings)) as server:
        services = [s for s in CONTRACT_SERVICES if s.full_name in server.binding.full_service_names]
        assert services
        async with _plain(server.port) as ch:
            await _assert_policy(ch, _all_methods(services))


async def test_unknown_methods_do_not_reveal_anything_without_a_key():
    settings = make_settings()
    async with running_server(settings, _contract_binding(settings)) as server, _plain(server.port) as ch:
        fn = ch.unary_unary("/cxr.admin.v1.Admin/DropEverything")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fn(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_key_rotation_with_overlap_without_restart(tmp_path):
    target = available_targets()[-1]  # a real service when one is importable (the runtime's code either way)
    key_file = tmp_path / "api-keys"
    key_file.write_text("# rotated by the secret manager\nkey-2025\n")
    data = target.settings().model_dump()
    data["security"].update(api_keys=[], api_key_file=str(key_file))
    settings = Settings.model_validate(data)

    async def ok(ch, key) -> bool:
        return await _classify(ch, target, auth(key)) != grpc.StatusCode.UNAUTHENTICATED

    def touch():
        stamp = time.time() + 10 * (1 + touch.n)
        touch.n += 1
        os.utime(key_file, (stamp, stamp))

    touch.n = 0
    async with running_server(settings, target.build(settings)) as server, _plain(server.port) as ch:
        assert await ok(ch, "key-2025") and not await ok(ch, "key-2026")
        key_file.write_text("key-2025\nkey-2026\n")  # overlap: both valid while clients move
        touch()
        await asyncio.sleep(1.2)
        assert await ok(ch, "key-2025") and await ok(ch, "key-2026")
        key_file.write_text("key-2026\n")
        touch()
        await asyncio.sleep(1.2)
        assert await ok(ch, "key-2026") and not await ok(ch, "key-2025")
        key_file.unlink()  # a secret briefly missing (remount) keeps the last keys
        await asyncio.sleep(1.2)
        assert await ok(ch, "key-2026")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_settings(target: Target, pki: Pki, mutual: bool) -> Settings:
    data = target.settings().model_dump()
    data["security"]["tls"] = {
        "enabled": True,
        "cert_file": str(pki.server_crt),
        "key_file": str(pki.server_key),
        "client_ca_file": str(pki.ca) if mutual else None,
    }
    return Settings.model_validate(data)


def _plain(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _secure(port: int, pki: Pki, *, root: str = "ca", client: str | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.read(root),
        private_key=pki.read(f"{client}_key") if client else None,
        certificate_chain=pki.read(f"{client}_crt") if client else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", creds)


async def _classify(ch: grpc.aio.Channel, target: Target, metadata=None) -> grpc.StatusCode:
    call = target.valid(IMG, "image/png")
    try:
        await getattr(target.stub(ch), call.method)(call.request, metadata=metadata or auth(), timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


TLS_TARGETS = sorted({"toy", *REAL_TARGETS})


@pytest.mark.parametrize("name", TLS_TARGETS)
async def test_tls_and_mutual_tls(pki, name):
    target = REAL_TARGETS.get(name) or available_targets()[0]
    settings = _tls_settings(target, pki, mutual=False)
    async with running_server(settings, target.build(settings)) as server:
        async with _secure(server.port, pki) as ch:
            assert await _classify(ch, target) == grpc.StatusCode.OK
        async with _plain(server.port) as ch:  # plaintext to a TLS port
            assert await _classify(ch, target) == grpc.StatusCode.UNAVAILABLE
        async with _secure(server.port, pki, root="rogue_ca") as ch:  # client does not trust the server
            assert await _classify(ch, target) == grpc.StatusCode.UNAVAILABLE
    settings = _tls_settings(target, pki, mutual=True)
    async with running_server(settings, target.build(settings)) as server:
        async with _secure(server.port, pki, client="client") as ch:
            assert await _classify(ch, target) == grpc.StatusCode.OK
            assert await _classify(ch, target, auth("wrong")) == grpc.StatusCode.UNAUTHENTICATED  # mTLS + key
        async with _secure(server.port, pki) as ch:  # no client certificate
            assert await _classify(ch, target) == grpc.StatusCode.UNAVAILABLE
        async with _secure(server.port, pki, client="rogue_client") as ch:  # certificate from another CA
            assert await _classify(ch, target) == grpc.StatusCode.UNAVAILABLE
