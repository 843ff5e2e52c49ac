"""A service registered through the service catalog alone (docs/adding-a-service.md): the brightness
test service (tests/support/brightness_service.py + brightness_catalog.json) is known to the settings,
the local runner, the local gateway and the client, and real calls reach it, with no product code edited."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from cxr_client.client import AsyncCxrClient
from cxr_client.config import ClientConfig
from cxr_gateway import kong_model
from cxr_gateway.app import Gateway
from cxr_gateway.local import local_defaults
from cxr_gateway.routes import ProtoCatalog
from cxr_protos.classification.v1 import classification_service_pb2 as cls_pb
from cxr_protos.common.v1 import common_pb2
from cxr_serving.settings import load_settings
from tests.support.brightness_service import METHOD
from tests.support.paths import REPO
from tests.support.processes import clean_env, python_module
from tests.support.servers import TEST_KEY, free_port

CATALOG = REPO / "tests" / "support" / "brightness_catalog.json"
KONG_FRAGMENT = REPO / "tests" / "support" / "brightness_kong.yml"


def _run_local():  # scripts/ is not a package: load run_local.py as the `make run` entry point is
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_local", REPO / "scripts" / "run_local.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catalog_file_registers_the_service_everywhere() -> None:
    env = {"CXR_SERVICE_CATALOG": str(CATALOG), "CXR_API_KEY": TEST_KEY}
    settings = load_settings(None, environ=env)
    # settings: the catalog's default ports, next to the three platform services
    assert list(settings.catalog()) == ["classification", "segmentation", "rag", "dicom", "brightness"]
    ep = settings.endpoint("brightness")
    assert (ep.host, ep.port, ep.metrics_port) == ("127.0.0.1", 50054, 9104)
    # the local runner starts it like any other service
    assert _run_local().service_commands(settings, "cfg.json", ["brightness"]) == [
        ("brightness", [sys.executable, "-m", "cxr_serving", "brightness", "--config", "cfg.json"])
    ]
    # the local gateway fills its kong.yml backend variables
    deck = local_defaults(settings)
    assert (deck["DECK_BRIGHTNESS_HOST"], deck["DECK_BRIGHTNESS_PORT"]) == ("127.0.0.1", "50054")
    # the client: default endpoint and the retry policy for its gRPC service
    cfg = ClientConfig.from_env(env)
    assert cfg.endpoint_for("brightness") == "127.0.0.1:50054"
    assert "cxr.brightness.v1.BrightnessService" in {g for e in cfg.services.values() for g in e.grpc_services}
    # without the catalog file, nothing knows it
    assert "brightness" not in load_settings(None, environ={"CXR_API_KEY": TEST_KEY}).services
    with pytest.raises(ValueError, match="unknown service 'brightness'"):
        ClientConfig.from_env({}).endpoint_for("brightness")


def _png(value: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((128, 128), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def _wait_serving(client: AsyncCxrClient, proc, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if await client.health("brightness", timeout=2) == "SERVING":
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"brightness not SERVING after {timeout}s")


def _gateway_kong(settings_env: dict[str, str]) -> kong_model.KongConfig:
    """gateway/kong.yml plus the service's entries, backends filled from the catalog by local_defaults."""
    defaults = local_defaults(load_settings(None, environ=settings_env))
    env = {"DECK_CXR_API_KEY": TEST_KEY, "DECK_CXR_ADMIN_API_KEY": "admin-" + TEST_KEY}
    data = yaml.safe_load(kong_model.render((REPO / "gateway" / "kong.yml").read_text(), env, defaults))
    fragment = yaml.safe_load(kong_model.render(KONG_FRAGMENT.read_text(), env, defaults))
    data["services"] += fragment["services"]
    data["upstreams"] += fragment["upstreams"]
    return kong_model.KongConfig.model_validate(data)


async def test_brightness_service_answers_through_client_and_gateway(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "CXR_SERVICE_CATALOG": str(CATALOG),
        "CXR_API_KEY": TEST_KEY,
        "CXR_SERVICES__BRIGHTNESS__PORT": str(port),
        "CXR_SERVICES__BRIGHTNESS__METRICS_PORT": "0",
    }
    # the generic entry point builds the service from its catalog entry's binding
    proc = python_module("cxr_serving", "brightness", env=clean_env(**env))
    request = common_pb2.Image(data=_png(51), content_type="image/png")
    try:
        client_env = {"CXR_SERVICE_CATALOG": str(CATALOG), "CXR_API_KEY": TEST_KEY}
        client_env["CXR_BRIGHTNESS_ENDPOINT"] = f"127.0.0.1:{port}"
        async with AsyncCxrClient(ClientConfig.from_env(client_env)) as client:
            await _wait_serving(client, proc)
            assert (await client.health_all(timeout=2))["brightness"] == "SERVING"
            call = client.channel("brightness").unary_unary(
                METHOD,
                request_serializer=common_pb2.Image.SerializeToString,
                response_deserializer=cls_pb.Finding.FromString,
            )
            direct = await call(request, metadata=client.metadata(), timeout=10)
        assert direct.label == "brightness" and direct.probability == pytest.approx(51 / 255, abs=1e-6)

        # through the local gateway: its backend address for the service comes from the catalog
        gw = Gateway(_gateway_kong(env), ProtoCatalog.load(REPO / "gateway" / "protos.pb"))
        await gw.start("127.0.0.1", 0, 0, None)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.ports.grpc}") as ch:
                via_gw = ch.unary_unary(
                    METHOD,
                    request_serializer=common_pb2.Image.SerializeToString,
                    response_deserializer=cls_pb.Finding.FromString,
                )
                reply = await via_gw(request, metadata=(("x-api-key", TEST_KEY),), timeout=10)
                assert reply == direct
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await via_gw(request, timeout=10)  # no key: the gateway's key-auth covers the new route
                assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
            # the gateway routes no grpc.health.v1 and the service has no model admin to stand in for it
            gw_env = {"CXR_SERVICE_CATALOG": str(CATALOG), "CXR_API_KEY": TEST_KEY}
            gw_env["CXR_BRIGHTNESS_ENDPOINT"] = f"127.0.0.1:{gw.ports.grpc}"
            async with AsyncCxrClient(ClientConfig.from_env(gw_env)) as via_gateway:
                assert await via_gateway.health("brightness", timeout=5) == "UNKNOWN"
        finally:
            await gw.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
