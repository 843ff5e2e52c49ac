"""`cxr-mcp`: the platform as MCP tools for agents (the deployment guide's "CXR Agent MCP Server").

Every tool calls the services through `cxr_client.AsyncCxrClient`, so the server is configured like the
CLI. The admin tool `unload_model` exists only when opted in, because an agent reads untrusted text
(RAG passages) that could talk it into admin actions. Transports and configuration: libs/client/README.md.
"""

from __future__ import annotations

import argparse
import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from cxr_client.analyze import analyze_study as run_analysis
from cxr_client.analyze import finding_calibration, finding_threshold
from cxr_client.catalog import CatalogError
from cxr_client.cli import INSTANCE_STATES, to_dict
from cxr_client.client import AsyncCxrClient, Priority
from cxr_client.config import ClientConfig
from cxr_client.errors import CxrClientError
from cxr_client.images import decode_base64_image
from cxr_client.report import to_markdown
from cxr_protos.dicom.v1 import dicom_service_pb2 as dicom_pb

INSTRUCTIONS = (
    "Chest X-ray analysis tools (classification, anatomy segmentation with the cardiothoracic ratio, "
    "literature retrieval). Pass an image as image_path (a file readable by this server) or image_base64. "
    "Results are NOT for diagnosis; say so when you report them, and warn when a result says untrained."
)
BINARY_MODEL = "binary_classifier"
FINDINGS_MODEL = "multiclass_classifier"
ADMIN_TOOLS_ENV = "CXR_MCP_ADMIN_TOOLS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_STATE_NUMBERS = {name: number for name, number in dicom_pb.InstanceState.items()}


def admin_tools_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """CXR_MCP_ADMIN_TOOLS as a boolean; any other value is refused rather than read as off."""
    value = (os.environ if environ is None else environ).get(ADMIN_TOOLS_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{ADMIN_TOOLS_ENV}={value!r}: expected one of 1/true/yes/on or 0/false/no/off")
    return value in _TRUE


def _image_bytes(image_path: str | None, image_base64: str | None) -> bytes:
    if bool(image_path) == bool(image_base64):
        raise ToolError("give exactly one of image_path or image_base64")
    if image_base64:
        try:
            return decode_base64_image(image_base64)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
    path = Path(str(image_path)).expanduser()
    if not path.is_file():
        raise ToolError(f"image_path {str(path)!r} is not a readable file on the MCP server's machine")
    return path.read_bytes()


def _tool_error(err: CxrClientError) -> ToolError:
    return ToolError(str(err))


def _predictions(resp: Any, *, positives_only: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"untrained": resp.untrained, "models": []}
    for pred in resp.predictions:
        findings = [
            {
                "label": f.label,
                "probability": round(float(f.probability), 4),
                "threshold": finding_threshold(f),
                "positive": f.positive,
                "calibration": finding_calibration(f),
            }
            for f in sorted(pred.findings, key=lambda f: -f.probability)
            if f.positive or not positives_only
        ]
        out["models"].append(
            {
                "model": pred.model.name,
                "version": pred.model.version,
                "untrained": pred.model.untrained,
                "findings": findings,
            }
        )
    if resp.untrained:
        out["warning"] = "untrained model: outputs are meaningless"
    out["disclaimer"] = "not for diagnosis"
    return out


def build_server(
    config: ClientConfig | None = None, *, name: str = "cxr", admin_tools: bool | None = None
) -> MCPServer:
    """The MCP server with its eight inference tools, plus `unload_model` when `admin_tools` (default:
    CXR_MCP_ADMIN_TOOLS) opts in; `config` defaults to ClientConfig.from_env()."""
    cfg = config or ClientConfig.from_env()
    if admin_tools is None:
        admin_tools = admin_tools_from_env()
    binary_model = os.environ.get("CXR_MCP_BINARY_MODEL", BINARY_MODEL)
    findings_model = os.environ.get("CXR_MCP_FINDINGS_MODEL", FINDINGS_MODEL)
    holder: dict[str, AsyncCxrClient] = {}

    def client() -> AsyncCxrClient:
        # created on first use, inside the event loop that serves the tools
        if "c" not in holder:
            holder["c"] = AsyncCxrClient(cfg)
        return holder["c"]

    server = MCPServer(name, instructions=INSTRUCTIONS, version="0.1.0")

    @server.tool()
    async def classify_binary(
        image_path: str | None = None, image_base64: str | None = None, priority: Priority = "routine"
    ) -> dict[str, Any]:
        """Normal vs abnormal probability of a chest X-ray (PNG, JPEG or DICOM). priority "stat": served
        before routine requests (an urgent study)."""
        try:
            resp = await client().classify(
                _image_bytes(image_path, image_base64), model_names=[binary_model], priority=priority
            )
        except CxrClientError as err:
            raise _tool_error(err) from None
        return _predictions(resp)

    @server.tool()
    async def classify_findings(
        image_path: str | None = None,
        image_base64: str | None = None,
        positives_only: bool = False,
        priority: Priority = "routine",
    ) -> dict[str, Any]:
        """Probabilities of the 14 NIH ChestX-ray14 findings (Atelectasis ... Hernia), with thresholds.
        priority "stat": served before routine requests."""
        try:
            resp = await client().classify(
                _image_bytes(image_path, image_base64), model_names=[findings_model], priority=priority
            )
        except CxrClientError as err:
            raise _tool_error(err) from None
        return _predictions(resp, positives_only=positives_only)

    @server.tool()
    async def segment_anatomy(
        image_path: str | None = None,
        image_base64: str | None = None,
        classes: list[str] | None = None,
        include_overlay: bool = False,
        priority: Priority = "routine",
    ) -> dict[str, Any]:
        """Anatomy masks (lungs, heart, clavicles): areas, bounding boxes and the cardiothoracic ratio.
        With include_overlay, `overlay_png_base64` holds a colour overlay image. priority "stat": served
        before routine requests."""
        try:
            resp = await client().segment(
                _image_bytes(image_path, image_base64),
                classes=classes or (),
                mask_encoding="none",
                include_overlay=include_overlay,
                priority=priority,
            )
        except CxrClientError as err:
            raise _tool_error(err) from None
        out = to_dict(resp)
        out.pop("overlay_png", None)
        if include_overlay and resp.overlay_png:
            out["overlay_png_base64"] = base64.b64encode(resp.overlay_png).decode()
        out["untrained"] = resp.untrained
        out["disclaimer"] = "not for diagnosis"
        return out

    @server.tool()
    async def search_literature(query: str, top_k: int = 5) -> dict[str, Any]:
        """Medical literature passages for a query (hybrid dense + BM25 retrieval), without an LLM."""
        try:
            resp = await client().search_literature(query, top_k=top_k)
        except CxrClientError as err:
            raise _tool_error(err) from None
        return {
            "passages": [
                {"id": p.id, "title": p.title, "source": p.source, "score": round(p.score, 4), "text": p.text}
                for p in resp.passages
            ]
        }

    @server.tool()
    async def answer_question(question: str, top_k: int = 0) -> dict[str, Any]:
        """An answer grounded in retrieved literature, with numbered citations."""
        try:
            resp = await client().answer_question(question, top_k=top_k)
        except CxrClientError as err:
            raise _tool_error(err) from None
        return {
            "answer": resp.answer,
            "citations": [{"number": c.number, "title": c.title, "source": c.source} for c in resp.citations],
            "model": resp.llm.name,
            "extractive": resp.extractive,
            "finish_reason": resp.finish_reason,
        }

    @server.tool()
    async def analyze_study(
        image_path: str | None = None, image_base64: str | None = None, top_k: int = 3
    ) -> dict[str, Any]:
        """Full study: findings with probabilities and thresholds, CTR, literature for positive findings,
        model versions, warnings and a disclaimer. `markdown` is a readable version of the report."""
        data = _image_bytes(image_path, image_base64)
        study = Path(image_path).name if image_path else "study"
        try:
            report = await run_analysis(client(), data, study=study, top_k=top_k, include_overlay=False)
        except CxrClientError as err:
            raise _tool_error(err) from None
        return {"report": report.model_dump(mode="json"), "markdown": to_markdown(report)}

    model_services = [name for name, entry in cfg.services.items() if entry.model_admin]

    def model_service(service: str) -> str:
        if service not in model_services:
            raise ToolError(f"service {service!r} has no models to manage; use one of {model_services}")
        return service

    @server.tool(description=f"Models of the services {', '.join(model_services)}, with state, version, device.")
    async def list_models(service: str | None = None) -> dict[str, Any]:
        services = [model_service(service)] if service else model_services
        out: dict[str, Any] = {}
        for svc in services:
            try:
                out[svc] = [to_dict(m) for m in await client().list_models(svc)]
            except CxrClientError as err:
                out[svc] = {"error": err.to_dict()}
        return out

    @server.tool()
    async def dicom_study_status(study_instance_uid: str) -> dict[str, Any]:
        """Where a study sent to the DICOM node (C-STORE or STOW-RS) stands: instances queued, in progress, done
        (results sent) or dead (given up, with the last error); `finished` once none is queued or in progress."""
        try:
            resp = await client().study_status(study_instance_uid)
        except CxrClientError as err:
            raise _tool_error(err) from None
        out = to_dict(resp, always_fields=True)
        for item in out.get("instances", []):
            item["state"] = INSTANCE_STATES.get(_STATE_NUMBERS.get(item["state"], 0), item["state"])
            item["priority"] = item["priority"].removeprefix("PRIORITY_").lower()
        return out

    if not admin_tools:
        return server

    @server.tool()
    async def unload_model(service: str, model_name: str) -> dict[str, Any]:
        """Unload a model of a service that lists models (list_models) to free its memory (it answers
        UNAVAILABLE until loaded again). Admin: needs the server's CXR_ADMIN_API_KEY."""
        try:
            return to_dict(await client().unload_model(model_service(service), model_name))
        except CxrClientError as err:
            raise _tool_error(err) from None

    return server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cxr-mcp", description="MCP server for the cxr platform (not for diagnosis).")
    p.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--path", default="/mcp", help="streamable-HTTP path")
    p.add_argument(
        "--enable-admin-tools",
        action="store_true",
        help=f"register the admin tool unload_model (also {ADMIN_TOOLS_ENV}=1); off by default because an "
        "agent can be talked into calls by the text it reads",
    )
    args = p.parse_args(argv)
    try:
        admin_tools = args.enable_admin_tools or admin_tools_from_env()
    except ValueError as exc:
        p.error(str(exc))
    try:
        server = build_server(admin_tools=admin_tools)
    except CatalogError as exc:
        p.error(str(exc))
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=args.host, port=args.port, streamable_http_path=args.path)


if __name__ == "__main__":
    main()
