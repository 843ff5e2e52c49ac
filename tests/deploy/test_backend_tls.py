"""backendTls: TLS (and mutual TLS) between Kong and the three services, from the chart values."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cxr_serving.server import create_server
from cxr_serving.settings import load_settings
from tests.support.chart import KUBE_VERSION, SERVICES, Rendered, pod_spec, render
from tests.support.pki import make_pki
from tests.support.servers import free_port, make_settings
from tests.support.toy_service import build_toy

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _kong_protocol(r: Rendered) -> str:
    init = pod_spec(r.get("Deployment", "cxr-kong"))["initContainers"][0]
    return str(_env(init)["DECK_BACKEND_PROTOCOL"])


def test_off_by_default_plain_grpc() -> None:
    r = render()
    assert _kong_protocol(r) == "grpc"
    for svc in SERVICES:
        spec = pod_spec(r.get("Deployment", f"cxr-{svc}"))
        c = spec["containers"][0]
        assert not any(k.startswith("CXR_SECURITY__TLS__") for k in _env(c))
        assert "backend-tls" not in {v["name"] for v in spec["volumes"]}
        assert all("grpc" in c[p] for p in PROBES)


@pytest.mark.parametrize("mutual", [False, True])
def test_enabled_mounts_the_secret_and_sets_the_runtime_tls_keys(mutual: bool, tmp_path: Path) -> None:
    r = render({"backendTls": {"enabled": True, "secretName": "my-tls", "mutual": mutual}})
    assert _kong_protocol(r) == "grpcs"
    for svc in SERVICES:
        obj = r.get("Deployment", f"cxr-{svc}")
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # raises when invalid
        spec = pod_spec(obj)
        c = spec["containers"][0]
        env = _env(c)
        assert env["CXR_SECURITY__TLS__ENABLED"] == "true"
        assert env["CXR_SECURITY__TLS__CERT_FILE"] == "/etc/cxr/tls/tls.crt"
        assert env["CXR_SECURITY__TLS__KEY_FILE"] == "/etc/cxr/tls/tls.key"
        assert env.get("CXR_SECURITY__TLS__CLIENT_CA_FILE") == ("/etc/cxr/tls/ca.crt" if mutual else None)
        assert {"name": "backend-tls", "secret": {"secretName": "my-tls"}} in spec["volumes"]
        assert {"name": "backend-tls", "mountPath": "/etc/cxr/tls", "readOnly": True} in c["volumeMounts"]
        for p in PROBES:  # the kubelet's grpc probe cannot speak TLS
            assert "grpc" not in c[p] and c[p]["exec"]["command"][:2] == ["python", "-c"], (svc, p)
        # the runtime reads exactly these keys
        tls = load_settings(None, environ={k: v for k, v in env.items() if k.startswith("CXR_SECURITY__")}).security.tls
        assert tls.enabled and str(tls.cert_file) == "/etc/cxr/tls/tls.crt"
        assert (tls.client_ca_file is not None) == mutual


def test_tls_probe_command_checks_a_real_tls_server(tmp_path: Path) -> None:
    """The rendered exec probe, run as is against a TLS toy server: SERVING -> 0; server down -> non-zero."""
    pki = make_pki(tmp_path / "pki")
    mount = tmp_path / "tls"
    mount.mkdir()
    shutil.copy(pki.ca, mount / "ca.crt")
    shutil.copy(pki.server_crt, mount / "tls.crt")
    shutil.copy(pki.server_key, mount / "tls.key")
    port = free_port()
    r = render(
        {
            "backendTls": {"enabled": True, "mountPath": str(mount)},
            "config": {"services": {"classification": {"port": port}}},
        }
    )
    c = pod_spec(r.get("Deployment", "cxr-classification"))["containers"][0]
    command = [sys.executable, *c["readinessProbe"]["exec"]["command"][1:]]
    env = {k: v for k, v in _env(c).items() if k.startswith("CXR_SECURITY__TLS__")}
    settings = make_settings(
        security__tls__enabled=True,
        security__tls__cert_file=env["CXR_SECURITY__TLS__CERT_FILE"],
        security__tls__key_file=env["CXR_SECURITY__TLS__KEY_FILE"],
    )

    def probe() -> int:
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    async def scenario() -> tuple[int, int]:
        server = create_server(settings, build_toy(settings), host="127.0.0.1", port=port, metrics_port=0)
        await server.start()
        try:
            await server.wait_until_ready(60)
            up = await asyncio.to_thread(probe)
        finally:
            await server.stop(grace=1)
        down = await asyncio.to_thread(probe)
        return up, down

    up, down = asyncio.run(scenario())
    assert up == 0 and down != 0
