"""Which key the client, the `cxr` CLI and the `cxr-mcp` tools send: the inference key on
inference calls, the admin key (and only it) on LoadModel, UnloadModel and IngestDocuments, and
nothing at all for an admin call without an admin key.

A real grpc.aio server on 127.0.0.1 (port 0) serves the three generated services (every RPC
answers UNIMPLEMENTED) behind an interceptor that records each call's method and its `x-api-key`
and `authorization` metadata; clients run on the server's own event loop."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from mcp import Client

from cxr_client import AsyncCxrClient, ClientConfig, CxrClientError
from cxr_client.cli import build_parser, main, run
from cxr_client.errors import AdminKeyNotConfiguredError, PermissionDeniedError
from cxr_client.mcp.server import build_server
from cxr_protos.classification.v1 import classification_service_pb2_grpc as cls_grpc
from cxr_protos.rag.v1 import rag_service_pb2_grpc as rag_grpc
from cxr_protos.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc
from tests.support.paths import cxr14_images
from tests.support.servers import free_port

INFERENCE_KEY = "inference-key-0123456789"
ADMIN_KEY = "admin-key-9876543210abcdef"
ADMIN_METHODS = {"LoadModel", "UnloadModel", "IngestDocuments", "PromoteModel", "RollbackModel", "SetModelRouting"}


@dataclass
class Seen:
    method: str
    api_keys: list[str]
    authorization: list[str]


@dataclass
class Recorder(grpc.aio.ServerInterceptor):
    calls: list[Seen] = field(default_factory=list)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        md = list(handler_call_details.invocation_metadata or ())
        self.calls.append(
            Seen(
                method=handler_call_details.method.rsplit("/", 1)[-1],
                api_keys=[str(v) for k, v in md if k == "x-api-key"],
                authorization=[str(v) for k, v in md if k == "authorization"],
            )
        )
        return await continuation(handler_call_details)

    def take(self) -> list[Seen]:
        out, self.calls = self.calls, []
        return out


@contextlib.asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.aio.server(interceptors=[recorder])
    cls_grpc.add_ClassificationServiceServicer_to_server(cls_grpc.ClassificationServiceServicer(), server)
    seg_grpc.add_SegmentationServiceServicer_to_server(seg_grpc.SegmentationServiceServicer(), server)
    rag_grpc.add_RagServiceServicer_to_server(rag_grpc.RagServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        await server.stop(None)


def assert_keys(calls: list[Seen], *, admin: bool, what: str) -> None:
    """Every call of one command: admin methods with the admin key alone, the rest with the inference key alone."""
    assert calls, f"{what}: no call reached the server"
    for c in calls:
        assert (c.method in ADMIN_METHODS) is admin, (what, c.method)
        assert c.api_keys == ([ADMIN_KEY] if admin else [INFERENCE_KEY]), (what, c)
        assert c.authorization == [], (what, c)


@pytest.fixture
def docs_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "d1", "title": "Effusion", "text": "Pleural effusion on a radiograph."}) + "\n")
    return path


# ---------------------------------------------------------------- the Python client


async def test_client_sends_the_admin_key_only_on_admin_calls():
    img = cxr14_images(1)[0]
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, api_key=INFERENCE_KEY, admin_api_key=ADMIN_KEY, retries=False)
        async with AsyncCxrClient(cfg) as client:
            inference = [
                client.classify(img),
                client.classify_images([img]),
                client.segment(img),
                client.search_literature("effusion"),
                client.answer_question("effusion?"),
                client.list_models("classification"),
                client.list_models("segmentation"),
            ]
            for coro in inference:
                with pytest.raises(CxrClientError):
                    await coro
            for stream in (client.stream_classify_images([img]), client.stream_answer("effusion?")):
                with pytest.raises(CxrClientError):
                    async for _ in stream:
                        pass
            calls = rec.take()
            assert len(calls) == 9
            assert_keys(calls, admin=False, what="inference calls")

            admin = [
                client.load_model("classification", "binary_classifier", checkpoint_path="x.pth"),
                client.unload_model("segmentation", "segmentation"),
                client.ingest_documents([{"id": "d1", "text": "t"}]),
                client.promote_model("classification", "binary_classifier", "v2"),
                client.rollback_model("segmentation", "segmentation"),
                client.set_model_routing(
                    "classification", "binary_classifier", candidate_version="v2", canary_percent=5
                ),
            ]
            for coro in admin:
                with pytest.raises(CxrClientError):
                    await coro
            calls = rec.take()
            assert sorted(c.method for c in calls) == sorted(ADMIN_METHODS)
            assert_keys(calls, admin=True, what="admin calls")


async def test_admin_call_without_admin_key_fails_before_sending():
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, api_key=INFERENCE_KEY, retries=False)
        async with AsyncCxrClient(cfg) as client:
            for name, coro in (
                ("LoadModel", client.load_model("classification", "binary_classifier")),
                ("UnloadModel", client.unload_model("classification", "binary_classifier")),
                ("IngestDocuments", client.ingest_documents([{"text": "t"}])),
            ):
                with pytest.raises(AdminKeyNotConfiguredError) as exc:
                    await coro
                assert isinstance(exc.value, PermissionDeniedError)
                assert exc.value.reason == "ADMIN_KEY_NOT_CONFIGURED" and name in exc.value.message
                assert "CXR_ADMIN_API_KEY" in exc.value.message
            assert rec.take() == []  # nothing reached the server, the inference key least of all


async def test_inference_calls_never_fall_back_to_the_admin_key():
    """With only an admin key configured, inference calls go out with no key at all."""
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, admin_api_key=ADMIN_KEY, retries=False)
        async with AsyncCxrClient(cfg) as client:
            with pytest.raises(CxrClientError):
                await client.search_literature("effusion")
            with pytest.raises(CxrClientError):
                await client.list_models("classification")
        calls = rec.take()
        assert [c.method for c in calls] == ["SearchLiterature", "ListModels"]
        assert all(c.api_keys == [] and c.authorization == [] for c in calls), calls


def test_admin_key_from_env_first_of_a_list():
    cfg = ClientConfig.from_env({"CXR_API_KEY": "i1,i2", "CXR_ADMIN_API_KEY": " a1 , a2"})
    assert (cfg.api_key, cfg.admin_api_key) == ("i1", "a1")
    assert ClientConfig.from_env({"CXR_API_KEY": "i1"}).admin_api_key is None


# ---------------------------------------------------------------- the CLI


CLI_INFERENCE = [
    ["classify", "{img}"],
    ["segment", "{img}"],
    ["ask", "pleural effusion?"],
    ["ask", "pleural effusion", "--search-only"],
    ["ask", "pleural effusion?", "--stream"],
    ["analyze", "{img}", "--no-literature"],
    ["models", "list"],
    ["evaluate", "labels.csv", "images", "--out", "unused"],
    ["health"],
]
CLI_ADMIN = [
    (["models", "load", "classification", "binary_classifier", "--checkpoint", "x.pth"], "LoadModel"),
    (["models", "unload", "segmentation", "segmentation"], "UnloadModel"),
    (
        ["models", "route", "classification", "binary_classifier", "--candidate", "v2", "--canary", "5"],
        "SetModelRouting",
    ),
    (["models", "promote", "classification", "binary_classifier"], "PromoteModel"),
    (["models", "rollback", "segmentation", "segmentation"], "RollbackModel"),
    (["ingest", "{docs}"], "IngestDocuments"),
]


async def _cli(argv: list[str]) -> None:
    """One CLI command on this loop (what main() runs under asyncio.run)."""
    args = build_parser().parse_args(argv)
    with contextlib.suppress(CxrClientError):
        await run(args)


@pytest.mark.parametrize("how", ["env", "flags"])
async def test_cli_sends_each_command_the_right_key(how: str, monkeypatch, docs_file: Path, capsys):
    img = str(cxr14_images(1)[0])
    for k in ("CXR_ENDPOINT", "CXR_API_KEY", "CXR_ADMIN_API_KEY", "CXR_TLS", "CXR_TLS_ROOT_CERTS"):
        monkeypatch.delenv(k, raising=False)
    for svc in ("CLASSIFICATION", "SEGMENTATION", "RAG"):
        monkeypatch.delenv(f"CXR_{svc}_ENDPOINT", raising=False)
    async with recording_server() as (target, rec):
        if how == "env":
            monkeypatch.setenv("CXR_ENDPOINT", target)
            monkeypatch.setenv("CXR_API_KEY", INFERENCE_KEY)
            monkeypatch.setenv("CXR_ADMIN_API_KEY", ADMIN_KEY)
            prefix: list[str] = []
        else:
            prefix = ["--endpoint", target, "--api-key", INFERENCE_KEY, "--admin-api-key", ADMIN_KEY]
        for argv in CLI_INFERENCE:
            await _cli(prefix + [a.format(img=img) for a in argv])
            assert_keys(rec.take(), admin=False, what=" ".join(argv))
        for argv, method in CLI_ADMIN:
            await _cli(prefix + [a.format(docs=docs_file) for a in argv])
            calls = rec.take()
            assert [c.method for c in calls] == [method], argv
            assert_keys(calls, admin=True, what=" ".join(argv))
    capsys.readouterr()


async def test_cli_admin_command_without_admin_key_sends_nothing(monkeypatch, docs_file: Path):
    monkeypatch.delenv("CXR_ADMIN_API_KEY", raising=False)
    async with recording_server() as (target, rec):
        for argv, _ in CLI_ADMIN:
            argv = ["--endpoint", target, "--api-key", INFERENCE_KEY] + [a.format(docs=docs_file) for a in argv]
            with pytest.raises(AdminKeyNotConfiguredError):
                await run(build_parser().parse_args(argv))
        assert rec.take() == []


def test_cli_admin_command_without_admin_key_is_a_usage_error(monkeypatch, capsys):
    """Exit 2 with what to set; a call that had been attempted would end in UNAVAILABLE (exit 1)."""
    monkeypatch.delenv("CXR_ADMIN_API_KEY", raising=False)
    closed = f"127.0.0.1:{free_port()}"
    rc = main(["--endpoint", closed, "--api-key", INFERENCE_KEY, "models", "unload", "classification", "m"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "UnloadModel is an admin call" in err and "CXR_ADMIN_API_KEY" in err and "--admin-api-key" in err


# ---------------------------------------------------------------- the MCP server

MCP_INFERENCE = {
    "classify_binary": {"image_path": "{img}"},
    "classify_findings": {"image_path": "{img}"},
    "segment_anatomy": {"image_path": "{img}"},
    "search_literature": {"query": "effusion"},
    "answer_question": {"question": "effusion?"},
    "analyze_study": {"image_path": "{img}"},
    "list_models": {},
}


async def test_mcp_tools_send_the_right_key():
    img = str(cxr14_images(1)[0])
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, api_key=INFERENCE_KEY, admin_api_key=ADMIN_KEY, retries=False)
        async with Client(build_server(cfg, admin_tools=True)) as mcp:
            tools = {t.name for t in (await mcp.list_tools()).tools}
            assert tools >= set(MCP_INFERENCE) | {"unload_model"}
            for tool, args in MCP_INFERENCE.items():
                await mcp.call_tool(tool, {k: v.format(img=img) for k, v in args.items()})
                assert_keys(rec.take(), admin=False, what=tool)
            res = await mcp.call_tool("unload_model", {"service": "segmentation", "model_name": "segmentation"})
            assert res.is_error and "UNIMPLEMENTED" in res.content[0].text  # it reached the server
            calls = rec.take()
            assert [c.method for c in calls] == ["UnloadModel"]
            assert_keys(calls, admin=True, what="unload_model")


async def test_mcp_admin_tool_without_admin_key_says_so_and_sends_nothing():
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, api_key=INFERENCE_KEY, retries=False)
        async with Client(build_server(cfg, admin_tools=True)) as mcp:
            res = await mcp.call_tool("unload_model", {"service": "segmentation", "model_name": "segmentation"})
        assert res.is_error
        text = res.content[0].text
        assert "ADMIN_KEY_NOT_CONFIGURED" in text and "UnloadModel is an admin call" in text
        assert rec.take() == []


async def test_mcp_admin_tools_are_opt_in_even_with_an_admin_key(monkeypatch):
    """An agent can be prompt-injected through the text it reads: without the opt-in, unload_model is not
    listed and cannot be called, even though the MCP server holds an admin key."""
    async with recording_server() as (target, rec):
        cfg = ClientConfig(endpoint=target, api_key=INFERENCE_KEY, admin_api_key=ADMIN_KEY, retries=False)
        for env, expect in ((None, False), ("0", False), ("1", True), ("true", True)):
            if env is None:
                monkeypatch.delenv("CXR_MCP_ADMIN_TOOLS", raising=False)
            else:
                monkeypatch.setenv("CXR_MCP_ADMIN_TOOLS", env)
            async with Client(build_server(cfg)) as mcp:
                tools = {t.name for t in (await mcp.list_tools()).tools}
                assert tools >= set(MCP_INFERENCE), env
                assert ("unload_model" in tools) is expect, env
                res = await mcp.call_tool("unload_model", {"service": "segmentation", "model_name": "segmentation"})
                assert res.is_error
                if expect:
                    assert "UNIMPLEMENTED" in res.content[0].text  # reached the server with the admin key
                    assert_keys(rec.take(), admin=True, what=f"unload_model CXR_MCP_ADMIN_TOOLS={env}")
                else:
                    assert "unload_model" in res.content[0].text and rec.take() == []  # unknown tool, nothing sent
        monkeypatch.setenv("CXR_MCP_ADMIN_TOOLS", "1")
        async with Client(build_server(cfg, admin_tools=False)) as mcp:  # the explicit argument wins
            assert "unload_model" not in {t.name for t in (await mcp.list_tools()).tools}
        monkeypatch.setenv("CXR_MCP_ADMIN_TOOLS", "maybe")
        with pytest.raises(ValueError, match="CXR_MCP_ADMIN_TOOLS='maybe'"):
            build_server(cfg)


def test_mcp_console_script_refuses_an_unknown_admin_tools_value(monkeypatch, capsys):
    from cxr_client.mcp.server import main as mcp_main

    monkeypatch.setenv("CXR_MCP_ADMIN_TOOLS", "enabled")
    with pytest.raises(SystemExit) as exc:
        mcp_main([])
    assert exc.value.code == 2 and "CXR_MCP_ADMIN_TOOLS='enabled'" in capsys.readouterr().err
