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
