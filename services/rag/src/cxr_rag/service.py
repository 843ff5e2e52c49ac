"""The RAG service on the shared runtime: `build_binding(settings)` and `main()`."""

from __future__ import annotations

import asyncio

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.config import RagConfig, rag_config
from cxr_rag.runtime import RagRuntime
from cxr_rag.servicer import RagServicer
from cxr_serving.errors import ConfigError
from cxr_serving.server import ServiceBinding
from cxr_serving.settings import Settings

SERVICE = pb.DESCRIPTOR.services_by_name["RagService"].full_name


def build_binding(settings: Settings, cfg: RagConfig | None = None) -> ServiceBinding:
    cfg = cfg or rag_config(settings)
    if not cfg.enabled:
        raise ConfigError("models.rag.enabled: false, the rag service has nothing to serve")
    runtime = RagRuntime(cfg)
    servicer = RagServicer(runtime, cfg)

    async def start() -> None:
        await asyncio.to_thread(runtime.open)

    return ServiceBinding(
        name="rag",
        full_service_names=[SERVICE],
        register=lambda server: pb_grpc.add_RagServiceServicer_to_server(servicer, server),
        on_start=start,
        on_stop=runtime.aclose,
        readiness=lambda: runtime.ready,
        extra={"runtime": runtime},
    )


def main() -> None:
    from cxr_serving.cli import run_service

    raise SystemExit(run_service("rag", build_binding))
