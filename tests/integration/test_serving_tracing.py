"""Tracing and transport limits of the shared runtime on a real server."""

from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.otel import setup_tracing
from cxr_serving.settings import MonitoringConfig
from tests.support.servers import auth, make_settings, running_server
from tests.support.toy_service import build_toy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def traced() -> tuple[Any, InMemorySpanExporter]:
    """Tracing on, into memory. The process's tracer provider is installed once: the tests share it."""
    exporter = InMemorySpanExporter()
    provider = setup_tracing("classification", MonitoringConfig(tracing_enabled=True), exporter=exporter)
    assert provider is not None
    installed = trace.get_tracer_provider()
    if installed is not provider:  # another module installed the process's provider first
        installed.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
        provider = installed
    return provider, exporter


async def test_server_span_joins_the_callers_trace(sample_png, traced):
    provider, exporter = traced
    exporter.clear()
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        md = (*auth(), ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"), ("x-correlation-id", "trace-test"))
        await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(
            pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png)), metadata=md
        )
    provider.force_flush()
    spans = [sp for sp in exporter.get_finished_spans() if sp.name.endswith("/ClassifyImage")]
    assert spans, [sp.name for sp in exporter.get_finished_spans()]
    span = spans[-1]
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.attributes["cxr.correlation_id"] == "trace-test"
    assert span.attributes["rpc.grpc.status_code"] == "OK"


async def test_a_failed_call_leaves_an_error_span_with_the_exception(traced):
    """The interceptor records a handler's exception on the span (an event and an ERROR status, as
    `trace.use_span` does) and the status code it mapped to."""
    provider, exporter = traced
    exporter.clear()
    s = make_settings()
    async with running_server(s, build_toy(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(
                pb.ClassifyImageRequest(image=common_pb2.Image(data=b"not an image")), metadata=auth()
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    provider.force_flush()
    [span] = [sp for sp in exporter.get_finished_spans() if sp.name.endswith("/ClassifyImage")]
    assert span.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert span.status.status_code.name == "ERROR" and "ImageRejectedError" in (span.status.description or "")
    assert [e.name for e in span.events] == ["exception"], span.events


def test_tracing_is_off_by_default():
    assert setup_tracing("classification", MonitoringConfig()) is None


async def test_max_message_size_is_enforced(sample_png):
    s = make_settings(server_config__max_message_mb=0.05)
    async with running_server(s, build_toy(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert len(sample_png) > 0.05 * 1024 * 1024
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.ClassificationServiceStub(ch).ClassifyImage(
                pb.ClassifyImageRequest(image=common_pb2.Image(data=sample_png)), metadata=auth()
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
