"""The LLM client against a real OpenAI-compatible HTTP server process on loopback
(tests/support/openai_stub.py, a scripted stand-in for vLLM speaking the same protocol)."""

from __future__ import annotations

import socket
import time

import grpc
import pytest

from cxr_rag.config import LlmConfig
from cxr_rag.llm import Delta, Finish, LlmClient
from cxr_serving.errors import DependencyTimeoutError, DependencyUnavailableError
from cxr_serving.grpc_errors import STATUS_BY_KIND
from tests.support.rag import openai_stub, stub_counts

MSGS = [{"role": "user", "content": "Does it help?"}]


@pytest.fixture(scope="module")
def stub_url():
    with openai_stub() as url:
        yield url


def client(url: str, model: str, **over) -> LlmClient:
    cfg = LlmConfig.model_validate({"mode": "openai", "base_url": url, "backoff_initial_s": 0.05, **over})
    return LlmClient(cfg, model, think_open=model.startswith("deepseek-r1-distill"))


async def collect(c: LlmClient) -> tuple[str, str, str, int]:
    answer, reasoning, finish, n = [], [], "", 0
    async for item in c.stream(MSGS):
        if isinstance(item, Finish):
            finish = item.reason
        else:
            assert isinstance(item, Delta)
            n += 1
            (answer if item.kind == "answer" else reasoning).append(item.text)
    return "".join(answer), "".join(reasoning), finish, n


async def test_complete_and_stream(stub_url):
    c = client(stub_url, "answer-model")
    comp = await c.complete(MSGS)
    assert comp.text.startswith("The passages report a benefit [1].") and comp.finish_reason == "stop"
    assert comp.model == "answer-model" and comp.reasoning == ""
    answer, reasoning, finish, n = await collect(c)
    assert answer == comp.text and reasoning == "" and finish == "stop"
    assert n > 5  # really streamed in pieces
    await c.aclose()


@pytest.mark.parametrize("model", ["deepseek-r1-stub", "deepseek-r1-distill-x"])
async def test_reasoning_is_separated(stub_url, model):
    c = client(stub_url, model)
    comp = await c.complete(MSGS)
    assert "[1]" in comp.text and "think" not in comp.text.lower()
    assert comp.reasoning in ("Let me think about it.", "Reasoning first.")
    answer, reasoning, _, _ = await collect(c)
    assert answer.strip() == comp.text and reasoning == comp.reasoning
    await c.aclose()


async def test_timeout_is_deadline_error(stub_url):
    c = client(stub_url, "slow", timeout_s=0.5, max_retries=2)
    t = time.perf_counter()
    with pytest.raises(DependencyTimeoutError, match=r"no answer within 0.5s") as ei:
        await c.complete(MSGS)
    assert ei.value.reason == "LLM_TIMEOUT"
    assert time.perf_counter() - t < 2.5  # read timeouts are not retried
    with pytest.raises(DependencyTimeoutError):
        await collect(c)
    await c.aclose()


async def test_server_error_retried_then_unavailable(stub_url):
    c = client(stub_url, "error500", max_retries=2)
    before = stub_counts(stub_url).get("error500", 0)
    with pytest.raises(DependencyUnavailableError, match=r"HTTP 500 after 3 attempts.*CUDA out of memory") as ei:
        await c.complete(MSGS)
    assert ei.value.reason == "LLM_SERVER_ERROR" and ei.value.metadata["http_status"] == "500"
    assert stub_counts(stub_url)["error500"] - before == 3
    with pytest.raises(DependencyUnavailableError, match="HTTP 500"):
        await collect(c)
    await c.aclose()


async def test_transient_error_recovers_with_backoff(stub_url):
    c = client(stub_url, "flaky", max_retries=2)
    comp = await c.complete(MSGS)
    assert "[1]" in comp.text
    assert stub_counts(stub_url)["flaky"] == 2
    await c.aclose()


async def test_connection_refused_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    c = client(f"http://127.0.0.1:{port}", "answer-model", max_retries=1)
    with pytest.raises(
        DependencyUnavailableError, match=rf"127.0.0.1:{port}/v1 is unreachable .*after 2 attempts"
    ) as ei:
        await c.complete(MSGS)
    assert ei.value.reason == "LLM_UNAVAILABLE"
    with pytest.raises(DependencyUnavailableError, match="unreachable"):
        await collect(c)
    await c.aclose()


async def test_garbage_output_is_a_clear_error(stub_url):
    c = client(stub_url, "garbage")
    with pytest.raises(DependencyUnavailableError, match="not an OpenAI chat completion") as ei:
        await c.complete(MSGS)
    assert ei.value.reason == "LLM_BAD_RESPONSE"
    with pytest.raises(DependencyUnavailableError, match="not an OpenAI chat completion"):
        await collect(c)
    with pytest.raises(DependencyUnavailableError, match="mid-stream"):
        await collect(client(stub_url, "midstream-error"))
    await c.aclose()


async def test_concurrency_cap(stub_url):
    import asyncio

    c = client(stub_url, "slow", max_concurrency=2, timeout_s=10)
    t = time.perf_counter()
    await asyncio.gather(*(c.complete(MSGS) for _ in range(4)))
    # 4 calls of 3 s, two at a time: two rounds
    assert time.perf_counter() - t >= 5.5
    await c.aclose()


BUDGET_S = 1.0
MARGIN_S = 1.5  # scheduling slack on a loaded 2-core CI host (2.05 s seen); the trickle would go on for 30 s
GUARD_S = 10.0  # fails the test instead of hanging when the budget is not enforced


async def test_timeout_is_a_total_budget_against_a_trickling_server(stub_url):
    """One SSE token (or one byte of JSON whitespace) every 0.2 s: each read is quick, the call is not."""
    import asyncio

    c = client(stub_url, "trickle", timeout_s=BUDGET_S, max_retries=3)
    t = time.perf_counter()
    with pytest.raises(DependencyTimeoutError, match=r"no answer within 1s") as ei:
        async with asyncio.timeout(GUARD_S):
            await c.complete(MSGS)
    elapsed = time.perf_counter() - t
    assert ei.value.reason == "LLM_TIMEOUT" and STATUS_BY_KIND[ei.value.kind] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert BUDGET_S - 0.05 <= elapsed <= BUDGET_S + MARGIN_S, elapsed

    tokens = 0
    t = time.perf_counter()
    with pytest.raises(DependencyTimeoutError, match=r"no answer within 1s") as ei:
        async with asyncio.timeout(GUARD_S):
            async for item in c.stream(MSGS):
                assert isinstance(item, Delta) and item.text == "tok "
                tokens += 1
    elapsed = time.perf_counter() - t
    assert ei.value.reason == "LLM_TIMEOUT"
    assert BUDGET_S - 0.05 <= elapsed <= BUDGET_S + MARGIN_S, elapsed
    assert 2 <= tokens <= 6  # it was streaming (one token per 0.2 s) until the budget ran out
    await c.aclose()


async def test_retries_stay_within_the_budget(stub_url):
    """HTTP 500 every time. A retry is made only when its backoff ends before the call's deadline:
    with a first backoff (2 s + jitter) longer than the budget there is no retry, and the call ends
    with the server's own error at once instead of sleeping through ten backoffs; with short
    backoffs that fit, every retry is made."""
    import asyncio

    c = client(stub_url, "error500", timeout_s=BUDGET_S, max_retries=10, backoff_initial_s=2.0)
    before = stub_counts(stub_url).get("error500", 0)
    t = time.perf_counter()
    with pytest.raises(DependencyUnavailableError, match=r"HTTP 500 after 1 attempt \(no time left") as ei:
        async with asyncio.timeout(GUARD_S):
            await c.complete(MSGS)
    assert time.perf_counter() - t <= BUDGET_S, time.perf_counter() - t
    assert ei.value.reason == "LLM_SERVER_ERROR"
    assert stub_counts(stub_url)["error500"] - before == 1
    with pytest.raises(DependencyUnavailableError, match=r"HTTP 500 after 1 attempt \(no time left"):
        async with asyncio.timeout(GUARD_S):
            await collect(c)
    await c.aclose()

    c = client(stub_url, "error500", timeout_s=10, max_retries=4, backoff_initial_s=0.05, backoff_max_s=0.05)
    before = stub_counts(stub_url)["error500"]
    with pytest.raises(DependencyUnavailableError, match=r"HTTP 500 after 5 attempts: "):
        await c.complete(MSGS)
    assert stub_counts(stub_url)["error500"] - before == 5
    await c.aclose()
