"""The interceptor's per-call context manager (`observability._Observed`): for each way a handler can end, the code
the access log, audit line and metrics get, whether the error map runs, and what propagates; the same when
recording the exception on the span fails."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from cxr_serving import observability

TRACER = TracerProvider().get_tracer("test")

CASES = {
    "none": (None, "OK", [], "returned"),
    "exception": (lambda: ValueError("bad"), "ERROR", ["ValueError"], "AbortError"),
    "abort": (lambda: grpc.aio.AbortError("aborted"), "ABORTED_BY_HANDLER", [], "AbortError"),
    "cancelled": (asyncio.CancelledError, "CANCELLED", [], "CancelledError"),
    "generator_exit": (GeneratorExit, "CANCELLED", [], "GeneratorExit"),  # a streaming handler closed mid-stream
}


def run_call(raise_: object, monkeypatch: pytest.MonkeyPatch, record_raises: bool) -> tuple[str, list[str], list[str]]:
    finished: list[str] = []
    failed: list[str] = []

    def begin(_context: object) -> tuple[str, object, str]:
        return "cid", TRACER.start_span("call"), "peer"

    async def fail(_context: object, exc: Exception, _cid: str) -> None:
        failed.append(type(exc).__name__)
        raise grpc.aio.AbortError("aborted by the error map")

    def finish(_context: object, _span: object, _started: float, code: str, _peer: str, _models: list[str]) -> None:
        finished.append(code)

    if record_raises:

        def cannot_record(_span: object, _exc: Exception) -> None:
            raise RuntimeError("the exception cannot be shown")

        monkeypatch.setattr(observability, "record_on_span", cannot_record)

    async def call() -> str:
        async with observability._Observed(None, begin, fail, finish):
            if raise_ is not None:
                raise raise_()  # type: ignore[misc,operator]
            return "value"

    try:
        asyncio.run(call())
        outcome = "returned"
    except BaseException as exc:  # what left the handler
        outcome = type(exc).__name__
    return outcome, finished, failed


@pytest.mark.parametrize("record_raises", [False, True], ids=["recorded", "recording_fails"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_ending_gets_its_code_and_the_error_map_runs_for_errors(case, record_raises, monkeypatch):
    raise_, code, failed, outcome = CASES[case]
    assert run_call(raise_, monkeypatch, record_raises) == (outcome, [code], failed)


def test_a_stream_closed_before_its_end_is_counted_cancelled_by_the_interceptor():
    """The interceptor's own streaming wrapper (not the context manager alone): a server stream that the
    server closes after one message, as grpc.aio does when it stops consuming a handler's generator, is
    counted CANCELLED, not OK."""
    from types import SimpleNamespace

    from cxr_serving.metrics import REQUESTS_TOTAL

    method = "/cxr.test.v1.Stream/Closed"

    async def three(_request: object, _context: object):
        for i in range(3):
            yield i

    class Context:
        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

        def code(self) -> None:
            return None

        async def send_initial_metadata(self, _md: object) -> None:
            return None

    async def continuation(_details: object) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(three)

    def counted(code: str) -> float:
        return REQUESTS_TOTAL.labels(method, code)._value.get()

    async def run() -> list[int]:
        details = SimpleNamespace(method=method, invocation_metadata=())
        handler = await observability.ObservabilityInterceptor("test").intercept_service(continuation, details)
        stream = handler.unary_stream(None, Context())
        first = [await stream.__anext__()]
        await stream.aclose()
        return first

    before = {code: counted(code) for code in ("OK", "CANCELLED")}
    assert asyncio.run(run()) == [0]
    assert counted("CANCELLED") == before["CANCELLED"] + 1
    assert counted("OK") == before["OK"]
