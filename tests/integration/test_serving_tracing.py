"""Tracing and transport limits of the shared runtime on a real server."""

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cxr_protos.classification.v1 import classification_service_pb2 as pb
from cxr_protos.classification.v1 import classification_service_pb2_grpc as pb_grpc
from cxr_protos.common.v1 import common_pb2
from cxr_serving.otel import setup_tracing
from cxr_serving.settings import MonitoringConfig
from tests.support.servers import auth, make_settings, running_server
from tests.support.toy_service import build_toy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_server_span_joins_the_callers_trace(sample_png):
    exporter = InMemorySpanExporter()
    provider = setup_tracing("classification", MonitoringConfig(tracing_enabled=True), exporter=exporter)
    assert provider is not None
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
