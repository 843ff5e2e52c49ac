"""The LLM client against `transformers serve` (a real OpenAI-compatible inference server)
running a tiny randomly initialised Llama built by the test: real tokenisation, generation and
SSE streaming, no downloads. Its text is gibberish; the protocol is what is under test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_rag.config import LlmConfig
from cxr_rag.llm import Delta, Finish, LlmClient
from cxr_serving.errors import DependencyTimeoutError, DependencyUnavailableError
from tests.support.rag import build_tiny_chat_model, wait_http
from tests.support.servers import free_port

pytestmark = pytest.mark.slow
MSGS = [{"role": "user", "content": "Is a widened mediastinum a sign of aortic injury?"}]


def _transformers_cli() -> str:
    exe = Path(sys.executable).with_name("transformers")
    return str(exe) if exe.exists() else (shutil.which("transformers") or "transformers")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("accelerate")
    model = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llm"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [_transformers_cli(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}", str(model), proc
    finally:
        proc.terminate()
        proc.wait(15)


def client(url: str, model: str, **over) -> LlmClient:
    cfg = LlmConfig.model_validate({"mode": "openai", "base_url": url, "max_tokens": 8, "max_retries": 0, **over})
    return LlmClient(cfg, model)


async def test_complete_and_stream_against_transformers_serve(served):
    url, model, _ = served
    c = client(url, model)
    comp = await c.complete(MSGS)
    assert comp.text and comp.finish_reason in ("length", "stop")
    pieces, finish = [], None
    async for item in c.stream(MSGS):
        if isinstance(item, Finish):
            finish = item.reason
        else:
            assert isinstance(item, Delta) and item.kind == "answer"
            pieces.append(item.text)
    assert len(pieces) >= 2 and finish in ("length", "stop")
    await c.aclose()


async def test_timeout_against_transformers_serve(served):
    url, model, _ = served
    c = client(url, model, timeout_s=0.001, max_tokens=64)
    with pytest.raises(DependencyTimeoutError):
        await c.complete(MSGS)
    await c.aclose()


async def test_connection_refused_after_the_server_stops(served):
    url, model, proc = served
    proc.terminate()
    proc.wait(15)
    c = client(url, model, max_retries=1, backoff_initial_s=0.01)
    with pytest.raises(DependencyUnavailableError, match="unreachable"):
        await c.complete(MSGS)
    await c.aclose()
