"""`priority` from the client library and the `cxr` CLI (`--priority stat|routine` on classify and segment)
reaches the model's batcher on real servers (toy classification, real segmentation): counted by
`cxr_requests_queued_total{model,priority}`."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from cxr_client import AsyncCxrClient
from cxr_client.cli import build_parser, run
from tests.support.paths import cxr14_images
from tests.support.servers import TEST_KEY, make_settings, running_server
from tests.support.targets import segmentation
from tests.support.toy_service import build_toy


def _queued(model: str) -> dict[str, float]:
    return {
        p: REGISTRY.get_sample_value("cxr_requests_queued_total", {"model": model, "priority": p}) or 0.0
        for p in ("stat", "routine")
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {p: after[p] - before[p] for p in after}


async def _cli(port: int, *argv: str) -> int:
    return await run(build_parser().parse_args(["--endpoint", f"127.0.0.1:{port}", "--api-key", TEST_KEY, *argv]))


async def test_cli_classify_priority_reaches_the_batcher():
    settings = make_settings()
    image = str(cxr14_images(1)[0])
    async with running_server(settings, build_toy(settings)) as server:
        before = _queued("toy")
        assert await _cli(server.port, "classify", image, "--priority", "stat") == 0
        assert _delta(_queued("toy"), before) == {"stat": 1, "routine": 0}
        assert await _cli(server.port, "classify", image) == 0  # default: routine
        assert _delta(_queued("toy"), before) == {"stat": 1, "routine": 1}


async def test_cli_segment_and_client_priority_reach_the_real_segmentation_batcher():
    target = segmentation()
    settings = target.settings()
    image = cxr14_images(1)[0]
    async with running_server(settings, target.build(settings)) as server:
        before = _queued("segmentation")
        assert await _cli(server.port, "segment", str(image), "--priority", "stat") == 0
        assert _delta(_queued("segmentation"), before) == {"stat": 1, "routine": 0}
        async with AsyncCxrClient(endpoint=f"127.0.0.1:{server.port}", api_key=TEST_KEY) as client:
            await client.segment(image.read_bytes(), mask_encoding="none", priority="routine")
            with pytest.raises(ValueError, match="priority must be one of"):
                await client.segment(image.read_bytes(), priority="urgent")  # type: ignore[arg-type]
        assert _delta(_queued("segmentation"), before) == {"stat": 1, "routine": 1}


async def test_mcp_classify_tool_passes_priority(monkeypatch):
    from mcp import Client

    from cxr_client.config import ClientConfig
    from cxr_client.mcp.server import build_server

    monkeypatch.setenv("CXR_MCP_BINARY_MODEL", "toy")
    settings = make_settings()
    image = str(cxr14_images(1)[0])
    async with running_server(settings, build_toy(settings)) as server:
        cfg = ClientConfig(endpoint=f"127.0.0.1:{server.port}", api_key=TEST_KEY)
        before = _queued("toy")
        async with Client(build_server(cfg)) as mcp:
            res = await mcp.call_tool("classify_binary", {"image_path": image, "priority": "stat"})
            assert not res.is_error, res
            assert _delta(_queued("toy"), before) == {"stat": 1, "routine": 0}
            res = await mcp.call_tool("classify_binary", {"image_path": image})
            assert not res.is_error, res
            res = await mcp.call_tool("classify_binary", {"image_path": image, "priority": "urgent"})
            assert res.is_error  # the tool's schema admits only stat and routine
        assert _delta(_queued("toy"), before) == {"stat": 1, "routine": 1}
