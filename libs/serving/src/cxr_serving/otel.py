"""OpenTelemetry tracing: off by default; OTLP/gRPC exporter when `monitoring.tracing_enabled`."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from cxr_serving.settings import MonitoringConfig

_installed = False


def setup_tracing(
    service: str, cfg: MonitoringConfig, exporter: SpanExporter | None = None, environment: str = ""
) -> TracerProvider | None:
    """Install a global tracer provider once per process; returns it, or None when disabled. Spans carry
    the top-level `environment` setting as `deployment.environment` (to tell staging from production)."""
    global _installed
    if not cfg.tracing_enabled and exporter is None:
        return None
    attributes = {"service.name": f"{cfg.service_name_prefix}-{service}"}
    if environment:
        attributes["deployment.environment"] = environment
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint) if cfg.otlp_endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if not _installed:
        trace.set_tracer_provider(provider)
        _installed = True
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer("cxr_serving")
