"""`security.allowed_ips` on a real server (aio clients on the server's loop): a caller outside the CIDR
allow-list gets PERMISSION_DENIED `IP_NOT_ALLOWED` on unary and streaming RPCs, health probes stay open,
and X-Forwarded-For counts only when the connection comes from a `security.trusted_proxies` address."""

from __future__ import annotations

import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.grpc_errors import error_info
from cxr_serving.settings import Settings
from tests.support.servers import auth, make_settings, running_server
from tests.support.targets import IMG
from tests.support.toy_service import build_toy

REQUEST = pb.ClassifyImageRequest(image=common_pb2.Image(data=IMG, content_type="image/png"))


def settings(**security: object) -> Settings:
    return make_settings(**{f"security__{k}": v for k, v in security.items()})


async def classify(ch: grpc.aio.Channel, *extra: tuple[str, str]) -> grpc.StatusCode:
    try:
        await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(REQUEST, metadata=(*auth(), *extra), timeout=30)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.PERMISSION_DENIED:
            assert error_info(rpc_status.from_call(err)).reason == "IP_NOT_ALLOWED", err
        return err.code()
    return grpc.StatusCode.OK


async def reflect(ch: grpc.aio.Channel) -> grpc.StatusCode:
    """A streaming RPC (reflection is bidirectional) through the same check."""
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        async for _ in stub.ServerReflectionInfo(iter([req]), metadata=auth(), timeout=30):
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_callers_outside_the_allow_list_are_refused_and_probes_stay_open() -> None:
    for allowed, expected in (
        (["10.0.0.0/8"], grpc.StatusCode.PERMISSION_DENIED),
        (["127.0.0.0/8"], grpc.StatusCode.OK),
    ):
        s = settings(allowed_ips=allowed)
        async with (
            running_server(s, build_toy(s)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            assert await classify(ch) == expected, allowed
            assert await reflect(ch) == expected, allowed
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # kubelet probes are exempt


async def test_an_empty_allow_list_allows_every_address() -> None:
    s = settings()
    assert s.security.allowed_ips == []
    async with running_server(s, build_toy(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert await classify(ch) == grpc.StatusCode.OK


async def test_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    client, other = ("x-forwarded-for", "203.0.113.7"), ("x-forwarded-for", "198.51.100.1")
    behind_gateway = settings(allowed_ips=["203.0.113.0/24"], trusted_proxies=["127.0.0.1"])
    async with (
        running_server(behind_gateway, build_toy(behind_gateway)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        assert await classify(ch, client) == grpc.StatusCode.OK
        assert await classify(ch, other) == grpc.StatusCode.PERMISSION_DENIED
        # a client cannot prepend an allowed address: the right-most untrusted hop is the client
        assert await classify(ch, ("x-forwarded-for", "203.0.113.7, 198.51.100.1")) == grpc.StatusCode.PERMISSION_DENIED
        assert await classify(ch, ("x-forwarded-for", "198.51.100.1, 203.0.113.7")) == grpc.StatusCode.OK
        assert await classify(ch, ("x-forwarded-for", "not-an-ip")) == grpc.StatusCode.PERMISSION_DENIED
        assert await classify(ch) == grpc.StatusCode.PERMISSION_DENIED  # the proxy itself is not allowed
    untrusted = settings(allowed_ips=["203.0.113.0/24"])
    async with (
        running_server(untrusted, build_toy(untrusted)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        assert await classify(ch, client) == grpc.StatusCode.PERMISSION_DENIED  # a header from anyone is ignored


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("ipv6:[::ffff:10.1.2.3]:5000", "10.1.2.3"),
        ("unix:/tmp/sock", None),
        ("", None),
    ],
)
def test_peer_address_forms(peer: str, ip: str | None) -> None:
    from cxr_serving.auth import peer_address

    assert peer_address(peer) == (None if ip is None else ipaddress.ip_address(ip))


def test_the_client_address_walks_forwarded_for_from_the_right_past_trusted_proxies() -> None:
    from cxr_serving.auth import PeerAllowListInterceptor

    check = PeerAllowListInterceptor(["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    assert str(check.client_address("ipv4:10.0.0.5:1", ["192.0.2.9, 10.0.0.7"])) == "192.0.2.9"
    assert str(check.client_address("ipv4:10.0.0.5:1", ["192.0.2.9", "10.0.0.7"])) == "192.0.2.9"  # two headers
    assert str(check.client_address("ipv4:172.16.0.1:1", ["192.0.2.9"])) == "172.16.0.1"
    assert check.allows("ipv4:10.0.0.5:1", ["192.0.2.9"]) and not check.allows("ipv4:10.0.0.5:1", [])
    assert not check.allows("unix:/tmp/sock")
