"""Model admin follows the catalog's `model_admin` flag: a service added by a catalog file alone
(CXR_SERVICE_CATALOG) lists, unloads and loads its models through the client, `cxr models` and the
MCP tools, at its own gRPC service name; a catalog service without model admin is left out.

The server is the real shared runtime serving the toy model's ListModels/LoadModel/UnloadModel
(cxr_serving.model_admin) under a gRPC service name no generated stub knows."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import grpc
from mcp import Client

from cxr_client import AsyncCxrClient, ClientConfig
from cxr_client.cli import build_parser, main, run
from cxr_client.mcp.server import build_server
from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.common.v1 import common_pb2
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings
from tests.support.paths import REPO
from tests.support.servers import TEST_KEY, make_settings, running_server
from tests.support.toy_service import build_toy

ADMIN_SERVICE = "cxr.toyadmin.v1.ToyAdminService"
BRIGHTNESS_CATALOG = REPO / "tests" / "support" / "brightness_catalog.json"  # model_admin: false


def _toy_under(settings: Settings, grpc_service: str) -> ServiceBinding:
    """The toy service, its three admin RPCs served at `/<grpc_service>/<Method>` and nothing else."""
    toy = build_toy(settings)
    servicer = toy.extra["servicer"]
    methods = {
        "ListModels": (servicer.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
        "LoadModel": (servicer.LoadModel, pb.LoadModelRequest, pb.LoadModelResponse),
        "UnloadModel": (servicer.UnloadModel, pb.UnloadModelRequest, pb.UnloadModelResponse),
    }
    handler = grpc.method_handlers_generic_handler(
        grpc_service,
        {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )
            for name, (fn, req, resp) in methods.items()
        },
    )
    return dataclasses.replace(
        toy, full_service_names=[grpc_service], register=lambda server: server.add_generic_rpc_handlers((handler,))
    )


def test_every_model_service_declares_the_same_admin_messages() -> None:
    """The client's one admin stub sends classification's messages to every model service: they must
    stay the same on the wire in each service's proto."""
    from cxr_protos.segmentation.v1 import segmentation_service_pb2 as seg_pb

    def type_of(f) -> object:
        m = f.message_type
        if m is not None and m.GetOptions().map_entry:  # a map's entry type is named per package; its wire is key/value
            return tuple((e.name, e.number, e.type) for e in m.fields)
        return m.full_name if m else ""

    def wire(module, name: str) -> list[tuple[str, int, int, object]]:
        fields = module.DESCRIPTOR.message_types_by_name[name].fields
        return [(f.name, f.number, f.type, type_of(f)) for f in fields]

    verbs = ["ListModels", "LoadModel", "UnloadModel", "GetModelCard", "RecordModelEvaluation"]
    for verb in [*verbs, "PromoteModel", "RollbackModel", "SetModelRouting"]:
        for kind in ("Request", "Response"):
            assert wire(seg_pb, verb + kind) == wire(pb, verb + kind), verb + kind


def _catalog(tmp_path: Path) -> str:
    path = tmp_path / "toyadmin_catalog.json"
    entry = {
        "name": "toyadmin",
        "package": "tests.support.toy_service",
        "binding": "tests.support.toy_service:build_toy",
        "grpc_services": [ADMIN_SERVICE],
        "port": 50059,
        "metrics_port": 9109,
        "model_admin": True,
        "idempotent": True,
    }
    path.write_text(json.dumps({"services": [entry]}))
    return os.pathsep.join([str(BRIGHTNESS_CATALOG), str(path)])


async def test_client_manages_the_models_of_a_catalog_service(tmp_path: Path) -> None:
    async with running_server(make_settings(), _toy_under(make_settings(), ADMIN_SERVICE)) as server:
        env = {
            "CXR_SERVICE_CATALOG": _catalog(tmp_path),
            "CXR_API_KEY": TEST_KEY,
            "CXR_ADMIN_API_KEY": TEST_KEY,
            "CXR_TOYADMIN_ENDPOINT": f"127.0.0.1:{server.port}",
        }
        async with AsyncCxrClient(ClientConfig.from_env(env)) as client:
            assert [m.name for m in await client.list_models("toyadmin")] == ["toy"]
            unloaded = await client.unload_model("toyadmin", "toy")
            assert unloaded.state == common_pb2.MODEL_STATE_UNLOADED
            assert server.binding.repository is not None
            assert server.binding.repository.status("toy").state == "unloaded"  # the server really unloaded it
            loaded = await client.load_model("toyadmin", "toy")
            assert (
                loaded.state == common_pb2.MODEL_STATE_READY
                and server.binding.repository.status("toy").state == "ready"
            )
            try:
                await client.list_models("brightness")
                raise AssertionError("brightness has no model admin")
            except ValueError as exc:
                assert "has no models to manage" in str(exc) and "toyadmin" in str(exc)


async def test_cli_and_mcp_list_the_models_of_a_catalog_service(tmp_path: Path, monkeypatch, capsys) -> None:
    for k in ("CXR_ENDPOINT", "CXR_CLASSIFICATION_ENDPOINT", "CXR_SEGMENTATION_ENDPOINT", "CXR_BRIGHTNESS_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    async with running_server(make_settings(), _toy_under(make_settings(), ADMIN_SERVICE)) as server:
        monkeypatch.setenv("CXR_SERVICE_CATALOG", _catalog(tmp_path))
        monkeypatch.setenv("CXR_API_KEY", TEST_KEY)
        monkeypatch.setenv("CXR_TOYADMIN_ENDPOINT", f"127.0.0.1:{server.port}")
        # point the built-in model services at a server that does not serve them: each fails on its own line
        monkeypatch.setenv("CXR_CLASSIFICATION_ENDPOINT", f"127.0.0.1:{server.port}")
        monkeypatch.setenv("CXR_SEGMENTATION_ENDPOINT", f"127.0.0.1:{server.port}")

        assert await run(build_parser().parse_args(["--json", "models", "list", "--service", "toyadmin"])) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["service"], r["name"], r["state"]) for r in rows] == [("toyadmin", "toy", "MODEL_STATE_READY")]

        # every model service of the catalog, the one without model admin (brightness) left out
        assert await run(build_parser().parse_args(["--json", "models", "list"])) == 1
        out = capsys.readouterr()
        assert [(r["service"], r["name"]) for r in json.loads(out.out)] == [("toyadmin", "toy")]
        failed = [
            line.split(":")[0]
            for line in out.err.splitlines()
            if line.split(":")[0] in ("classification", "segmentation", "rag", "brightness", "toyadmin")
        ]
        assert failed == ["classification", "segmentation"]
        assert "UNIMPLEMENTED" in out.err

        cfg = ClientConfig.from_env()
        async with Client(build_server(cfg, admin_tools=False)) as mcp:
            res = await mcp.call_tool("list_models", {"service": "toyadmin"})
            assert not res.is_error, res.content
            assert [m["name"] for m in res.structured_content["toyadmin"]] == ["toy"]
            res = await mcp.call_tool("list_models", {})
            assert set(res.structured_content) == {"classification", "segmentation", "toyadmin"}
            res = await mcp.call_tool("list_models", {"service": "brightness"})
            assert res.is_error and "has no models to manage" in res.content[0].text


def test_cli_refuses_a_service_without_model_admin(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CXR_SERVICE_CATALOG", _catalog(tmp_path))
    assert main(["models", "list", "--service", "brightness"]) == 2
    assert "has no models to manage" in capsys.readouterr().err
