"""The Prometheus port binds to the service's own host (services.<name>.host), not every interface."""

from __future__ import annotations

import socket
import urllib.request

from cxr_serving.server import create_server
from tests.support.servers import make_settings
from tests.support.toy_service import build_toy


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


async def test_metrics_listen_on_the_service_host_only() -> None:
    """No host anywhere in the config: the default endpoint host is loopback, not 0.0.0.0."""
    s = make_settings(services__classification={"port": 0, "metrics_port": 0})
    assert s.services["classification"].host == "127.0.0.1"
    server = create_server(s, build_toy(s))  # no host argument: the endpoint's host applies
    await server.start()
    try:
        assert server.metrics is not None
        port = server.metrics.port
        sock = server.metrics._httpd.socket
        assert sock.getsockname()[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"cxr_grpc_requests_total" in resp.read()
        # another loopback address of this host reaches a socket bound to 0.0.0.0, not one bound to 127.0.0.1
        assert not _connects("127.0.0.2", port)
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            probe.listen()
            assert _connects("127.0.0.2", probe.getsockname()[1])  # the check above can see a wildcard bind
    finally:
        await server.stop(grace=1)
