"""Audit trail: one `cxr.audit` line per request with who (gateway consumer, API-key fingerprint,
never the key), which models and versions answered, outcome and correlation id; refused calls
are audited too; health probes are not; no request content."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_serving.audit import key_fingerprint
from cxr_serving.logging_setup import JsonFormatter
from tests.support.servers import TEST_KEY, auth, running_server
from tests.support.targets import IMG, available_targets

TARGETS = {t.name: t for t in available_targets()}


@contextlib.contextmanager
def audit_lines() -> Iterator[list[dict]]:
    """The `cxr.audit` lines logged in the body (JSON-formatted, as in production)."""
    capture = Capture()
    audit_logger = logging.getLogger("cxr.audit")
    audit_logger.addHandler(capture)
    old_level = audit_logger.level
    audit_logger.setLevel(logging.INFO)
    try:
        yield capture.lines
    finally:
        audit_logger.removeHandler(capture)
        audit_logger.setLevel(old_level)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.mark.parametrize("name", sorted(n for n in TARGETS if n in ("toy", "classification")))
async def test_one_audit_line_per_request(name):
    target = TARGETS[name]
    settings = target.settings()
    with audit_lines() as logged:
        async with (
            running_server(settings, target.build(settings)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            call = target.valid(IMG, "image/png")
            fn = getattr(target.stub(ch), call.method)
            md = (*auth(), ("x-correlation-id", "cid-audit-1"), ("x-consumer-username", "radiology-pacs"))
            await fn(call.request, metadata=md, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):
                await fn(target.valid(b"not an image", "").request, metadata=auth(), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):
                await fn(call.request, metadata=auth("sk-not-a-valid-key"), timeout=30)
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)

    lines = [ln for ln in logged if ln.get("audit")]
    assert len(lines) == 3, lines  # health is not audited
    ok, bad_image, refused = lines
    assert ok["code"] == "OK" and ok["consumer"] == "radiology-pacs"
    assert ok["key_id"] == key_fingerprint(TEST_KEY) and ok["correlation_id"] == "cid-audit-1"
    assert ok["models"] and all("@" in m for m in ok["models"]), ok  # name@version of each model that answered
    assert ok["method"].endswith("/" + call.method) and ok["ts"] and ok["peer"]
    assert bad_image["code"] == "INVALID_ARGUMENT" and bad_image["models"] == []
    assert refused["code"] == "UNAUTHENTICATED" and refused["key_id"] == key_fingerprint("sk-not-a-valid-key")
    text = json.dumps(logged)
    assert TEST_KEY not in text and "sk-not-a-valid-key" not in text


async def test_a_call_its_client_cancels_mid_forward_is_audited_cancelled_with_its_peer():
    """The client-cancel path on its own (the deadline test above may end in the batcher's queue on a loaded
    host): the cancel comes only once the forward is running, so the handler is cut off, not refused."""
    from tests.support.toy_service import BrightnessModel, build_toy

    target = TARGETS["toy"]
    settings = target.settings()
    model = BrightnessModel(delay_s=1.5)
    with audit_lines() as logged:
        async with running_server(settings, build_toy(settings, model)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                fn = getattr(target.stub(ch), target.valid(IMG, "image/png").method)
                call = fn(target.valid(IMG, "image/png").request, metadata=auth(), timeout=60)
                deadline = time.monotonic() + 30
                while not model.batches and time.monotonic() < deadline:  # predict appends as it starts
                    await asyncio.sleep(0.005)
                assert model.batches == [1], "the forward never started"
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                deadline = time.monotonic() + 10
                while not any(ln.get("audit") for ln in logged) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
    lines = [ln for ln in logged if ln.get("audit")]
    assert len(lines) == 1, lines
    assert lines[0]["code"] == "CANCELLED", lines[0]
    assert lines[0]["peer"].startswith("ipv4:127.0.0.1:"), lines[0]


async def test_a_call_cut_off_by_its_deadline_is_audited_with_its_peer():
    """The peer is read while the call is alive: after the client's deadline grpc.aio's
    context.peer() reads a finished call (it returned '' here, and crashed the process once in CI)."""
    from tests.support.toy_service import BrightnessModel, build_toy

    target = TARGETS["toy"]
    settings = target.settings()
    with audit_lines() as logged:
        async with running_server(settings, build_toy(settings, BrightnessModel(delay_s=0.3))) as server:
            for _ in range(3):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                    fn = getattr(target.stub(ch), target.valid(IMG, "image/png").method)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await fn(target.valid(IMG, "image/png").request, metadata=auth(), timeout=0.1)
                    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    lines = [ln for ln in logged if ln.get("audit")]
    assert len(lines) == 3, lines
    for line in lines:
        # CANCELLED: gRPC ended the handler at the deadline; DEADLINE_EXCEEDED: on a loaded host the request's
        # deadline passed while it waited in the batcher's queue, which answers it so
        assert line["code"] in ("CANCELLED", "DEADLINE_EXCEEDED"), line
        assert line["peer"].startswith("ipv4:127.0.0.1:"), line
