"""The LLM client and the RAG service against `transformers serve` (a real OpenAI-compatible
inference server) running tiny Llamas built by the test: real tokenisation, generation and SSE
streaming, no downloads. The randomly initialised one writes gibberish; the scripted ones
(tests/support/rag.py build_scripted_chat_model: weights set so decoding follows a token script)
write out-of-range [n], an unclosed <think> and a closed one, through the same real server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.config import LlmConfig, rag_config
from cxr_rag.llm import Delta, Finish, LlmClient
from cxr_rag.service import build_binding
from cxr_serving.errors import DependencyTimeoutError, DependencyUnavailableError
from tests.support.rag import (
    assert_citations_grounded,
    build_scripted_chat_model,
    build_tiny_chat_model,
    shared_store,
    wait_http,
)
from tests.support.servers import auth, free_port, make_settings, running_server

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
    proc = subprocess.Popen(  # not pinned to one model: each request's model is loaded on first use
        [_transformers_cli(), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
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


QUESTION = "Is oral endotracheal intubation efficacy impaired in the helicopter?"
TOP_K = 2
MAX_TOKENS = 10
# name -> (token script, answer, reasoning, cited numbers); TOP_K passages, so [3], [99] and [0] name none
SCRIPTS = {
    "citing": (["finding", "[2]", "[99]", "[0]", "[1]", "[3]", "[SEP]"], "finding [2] [99] [0] [1] [3]", "", [2, 1]),
    "unclosed-think": (["<think>", "[1]", "lung"], "", "[1] lung [1] lung [1] lung [1] lung [1]", []),
    "closed-think": (
        ["<think>", "weighing", "[1]", "</think>", "supported", "[2]", "[SEP]"],
        "supported [2]",
        "weighing [1]",
        [2],
    ),
}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict[str, str]:
    return {
        name: str(build_scripted_chat_model(tmp_path_factory.mktemp(name), tokens))
        for name, (tokens, *_) in SCRIPTS.items()
    }


async def ask_service(url: str, model: str) -> tuple[pb.AnswerQuestionResponse, pb.AnswerQuestionResponse, list]:
    """AnswerQuestion with and without include_reasoning, and StreamAnswer with it, through the real
    rag service (gRPC on 127.0.0.1, embedded Chroma holding the PubMedQA subset, BM25)."""
    llm = {"mode": "openai", "base_url": url, "model": model, "max_tokens": MAX_TOKENS, "max_retries": 0}
    section = {"vector_db_path": str(shared_store()), "documents_path": None, "llm": llm}
    s = make_settings(models={"rag": section})
    async with (
        running_server(s, build_binding(s, rag_config(s, environ={}))) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
    ):
        stub = pb_grpc.RagServiceStub(ch)
        req = pb.AnswerQuestionRequest(question=QUESTION, top_k=TOP_K, include_reasoning=True)
        one = await stub.AnswerQuestion(req, metadata=auth())
        plain = await stub.AnswerQuestion(pb.AnswerQuestionRequest(question=QUESTION, top_k=TOP_K), metadata=auth())
        sreq = pb.StreamAnswerRequest(question=QUESTION, top_k=TOP_K, include_reasoning=True)
        stream = [m async for m in stub.StreamAnswer(sreq, metadata=auth())]
    return one, plain, stream


async def test_service_with_gibberish_from_the_random_model(served):
    url, model, _ = served
    one, plain, stream = await ask_service(url, model)
    assert not one.extractive and one.llm.name == model and one.finish_reason in ("length", "stop")
    assert one.answer.strip() and len(one.passages) == TOP_K
    for answer, citations, passages in (
        (one.answer, one.citations, one.passages),
        (plain.answer, plain.citations, plain.passages),
        ("".join(m.text_delta for m in stream), stream[-1].citations, stream[0].passages),
    ):
        assert_citations_grounded(answer, citations, passages)
    assert stream[-1].finish_reason in ("length", "stop") and len(stream) >= 3


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_service_citations_from_scripted_output(served, scripted, name):
    url = served[0]
    _, answer, reasoning, cited = SCRIPTS[name]
    one, plain, stream = await ask_service(url, scripted[name])
    assert len(one.passages) == TOP_K
    assert (one.answer, one.reasoning, [c.number for c in one.citations]) == (answer, reasoning, cited)
    assert_citations_grounded(one.answer, one.citations, one.passages)
    assert [c.passage_id for c in one.citations] == [one.passages[n - 1].id for n in cited]
    assert (plain.answer, plain.reasoning, [c.number for c in plain.citations]) == (answer, "", cited)
    passages = stream[0].passages
    assert [p.id for p in passages] == [p.id for p in one.passages]
    assert "".join(m.text_delta for m in stream).strip() == answer
    assert "".join(m.reasoning_delta for m in stream).strip() == reasoning
    assert [c.number for c in stream[-1].citations] == cited
    assert_citations_grounded(answer, stream[-1].citations, passages)
    assert one.finish_reason == stream[-1].finish_reason == ("length" if name == "unclosed-think" else "stop")


async def test_connection_refused_after_the_server_stops(served):
    url, model, proc = served
    proc.terminate()
    proc.wait(15)
    c = client(url, model, max_retries=1, backoff_initial_s=0.01)
    with pytest.raises(DependencyUnavailableError, match="unreachable"):
        await c.complete(MSGS)
    await c.aclose()
