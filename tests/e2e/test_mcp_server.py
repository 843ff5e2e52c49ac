"""cxr-mcp end to end: the MCP SDK's real client against our MCP server (streamable HTTP on a
real port, and stdio as a subprocess), the server calling the three real services."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys

import pytest
import uvicorn
from mcp import Client, StdioServerParameters

from cxr_client import AsyncCxrClient
from cxr_client.mcp.server import build_server
from tests.support.client_stack import POSITIVE, get_stack
from tests.support.paths import cxr14_images, dicom_files
from tests.support.servers import free_port

# One stack of the three real services for the process (~25-35 s to start on 2 busy cores).
pytestmark = pytest.mark.slow

TOOLS = {
    "classify_binary",
    "classify_findings",
    "segment_anatomy",
    "search_literature",
    "answer_question",
    "analyze_study",
    "list_models",
}


@pytest.fixture(scope="module")
def stack():
    return get_stack("real")


@contextlib.asynccontextmanager
async def http_mcp(stack):
    """Our MCP server on streamable HTTP (uvicorn, real socket), yields its URL."""
    port = free_port()
    app = build_server(stack.config(), admin_tools=True).streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "MCP HTTP server did not start"
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def structured(result) -> dict:
    assert not result.is_error, result.content
    data = result.structured_content
    return data.get("result", data) if isinstance(data, dict) and set(data) == {"result"} else data


async def test_tools_over_streamable_http(stack):
    img = cxr14_images(1)[0]
    async with http_mcp(stack) as url, Client(url) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) >= TOOLS
        assert "image_base64" in tools["classify_binary"].input_schema["properties"]

        binary = structured(await client.call_tool("classify_binary", {"image_path": str(img)}))
        (model,) = binary["models"]
        assert model["model"] == "binary_classifier" and model["findings"][0]["label"] == "abnormal"
        assert binary["untrained"] and binary["disclaimer"] == "not for diagnosis"

        b64 = base64.b64encode(img.read_bytes()).decode()
        findings = structured(
            await client.call_tool("classify_findings", {"image_base64": b64, "positives_only": True})
        )
        assert [f["label"] for f in findings["models"][0]["findings"]] == [POSITIVE]

        seg = structured(await client.call_tool("segment_anatomy", {"image_path": str(dicom_files()[0])}))
        assert "measurements" in seg and {m["label"] for m in seg["masks"]} >= {"heart", "left_lung"}

        lit = structured(await client.call_tool("search_literature", {"query": "pleural effusion", "top_k": 3}))
        assert 1 <= len(lit["passages"]) <= 3 and lit["passages"][0]["text"]

        ans = structured(await client.call_tool("answer_question", {"question": "Does chest radiography help?"}))
        assert ans["answer"] and ans["extractive"]

        rep = structured(await client.call_tool("analyze_study", {"image_path": str(img)}))
        assert rep["report"]["positive_findings"] == [POSITIVE]
        assert (rep["report"]["literature"] or rep["report"]["literature_notes"]) and rep["report"]["untrained"]
        assert "Not for diagnosis" in rep["markdown"]

        models = structured(await client.call_tool("list_models", {}))
        names = {m["name"] for m in models["classification"]}
        assert names == {"binary_classifier", "multiclass_classifier"} and models["segmentation"]


async def test_tool_errors_reach_the_agent(stack):
    async with http_mcp(stack) as url, Client(url) as client:
        res = await client.call_tool("classify_binary", {"image_base64": base64.b64encode(b"junk").decode()})
        assert res.is_error and "IMAGE_FORMAT_UNKNOWN" in res.content[0].text
        res = await client.call_tool("classify_binary", {})
        assert res.is_error and "exactly one of image_path or image_base64" in res.content[0].text
        res = await client.call_tool("segment_anatomy", {"image_path": "/nonexistent.png"})
        assert res.is_error and "not a readable file" in res.content[0].text
        res = await client.call_tool("unload_model", {"service": "segmentation", "model_name": "nope"})
        assert res.is_error and "NOT_FOUND" in res.content[0].text


async def test_unload_model_then_reload(stack):
    async with http_mcp(stack) as url, Client(url) as client:
        res = structured(
            await client.call_tool("unload_model", {"service": "segmentation", "model_name": "segmentation"})
        )
        assert res["name"] == "segmentation" and res.get("state") == "MODEL_STATE_UNLOADED"
        err = await client.call_tool("segment_anatomy", {"image_path": str(cxr14_images(1)[0])})
        assert err.is_error and "UNAVAILABLE" in err.content[0].text
    async with AsyncCxrClient(stack.config()) as c:
        info = await c.load_model("segmentation", "segmentation")
    assert info.state == 3  # READY again for the other tests


async def test_stdio_transport(stack):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cxr_client.mcp.server"],
        # PYTHONPATH passes through so the subprocess imports the code under test, as the tests' own import does
        env=stack.env() | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    async with Client(params) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools >= TOOLS and "unload_model" not in tools  # admin tools are opt-in, admin key or not
        res = await client.call_tool("classify_binary", {"image_path": str(cxr14_images(1)[0])})
        data = structured(res)
        assert data["models"][0]["model"] == "binary_classifier"
        assert json.loads(res.content[0].text)["models"][0]["model"] == "binary_classifier"


async def test_streamable_http_console_script(stack):
    """`cxr-mcp --transport streamable-http` as its own process."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cxr_client.mcp.server",
        "--transport",
        "streamable-http",
        "--port",
        str(port),
        "--enable-admin-tools",
        env={**os.environ, **stack.env()},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for _ in range(150):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        async with Client(url) as client:
            assert "unload_model" in {t.name for t in (await client.list_tools()).tools}
            res = structured(await client.call_tool("list_models", {"service": "segmentation"}))
            assert res["segmentation"][0]["name"] == "segmentation"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
