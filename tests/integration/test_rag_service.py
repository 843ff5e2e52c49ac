"""gRPC end to end: the real RAG server on 127.0.0.1 (embedded Chroma holding a PubMedQA
subset), all four RPCs, in extractive mode and against an OpenAI-compatible server."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.config import rag_config
from cxr_rag.pipeline import EXTRACTIVE_PREFIX
from cxr_rag.service import build_binding
from cxr_serving.runtimes.backends import openvino_cpu_capabilities
from tests.support.rag import assert_citations_grounded, openai_stub, shared_store, subset_corpus
from tests.support.servers import auth, make_settings, running_server

OFF_TOPIC = "What is the best recipe for sourdough bread?"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def settings_for(**rag):
    section = {"vector_db_path": str(shared_store()), "documents_path": None, **rag}
    return make_settings(models={"rag": section})


def binding_for(settings):
    return build_binding(settings, rag_config(settings, environ={}))


@pytest.fixture(scope="module")
def question() -> dict:
    first = json.loads(subset_corpus().read_text().splitlines()[0])
    q = {"pmid": first["pmid"], "question": "Is oral endotracheal intubation efficacy impaired in the helicopter?"}
    return q


async def test_search_literature_modes_filters_and_errors(question):
    s = settings_for()
    async with running_server(s, binding_for(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.RagServiceStub(ch)
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for mode in (pb.RETRIEVAL_MODE_UNSPECIFIED, pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL):
            r = await stub.SearchLiterature(
                pb.SearchLiteratureRequest(query=question["question"], top_k=3, mode=mode), metadata=auth()
            )
            assert len(r.passages) == 3
            assert r.passages[0].metadata["pmid"] == question["pmid"], mode
            assert r.passages[0].score >= r.passages[1].score
            assert r.passages[0].source == f"PMID:{question['pmid']}"
        hybrid = await stub.SearchLiterature(pb.SearchLiteratureRequest(query=question["question"]), metadata=auth())
        assert len(hybrid.passages) == 5  # configured default top_k
        assert hybrid.passages[0].dense_rank >= 1 and hybrid.passages[0].lexical_rank >= 1
        filtered = await stub.SearchLiterature(
            pb.SearchLiteratureRequest(query=question["question"], filters={"section": "METHODS"}), metadata=auth()
        )
        assert filtered.passages and {p.metadata["section"] for p in filtered.passages} == {"METHODS"}
        for bad, text in (
            (pb.SearchLiteratureRequest(query="  "), "query: must not be empty"),
            (pb.SearchLiteratureRequest(query="x", top_k=500), "top_k: must be between 1 and 50"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.SearchLiterature(bad, metadata=auth())
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in ei.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.SearchLiterature(pb.SearchLiteratureRequest(query="x"))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_answer_and_stream_extractive(question):
    s = settings_for()
    async with running_server(s, binding_for(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.RagServiceStub(ch)
        assert metric("cxr_model_loaded", model="rag") == 1 and metric("cxr_rag_chunks") >= 300
        retrievals, refusals = (
            metric("cxr_inference_total", model="retrieval:hybrid"),
            metric("cxr_rag_no_relevant_total"),
        )
        r = await stub.AnswerQuestion(pb.AnswerQuestionRequest(question=question["question"]), metadata=auth())
        assert metric("cxr_inference_total", model="retrieval:hybrid") == retrievals + 1
        assert r.extractive and r.llm.name == "extractive" and r.finish_reason == "stop"
        # the query embeddings come from the configured fast path when this CPU has native bfloat16
        if "BF16" in openvino_cpu_capabilities():
            assert (r.llm.backend, r.llm.precision) == ("openvino", "bfloat16"), r.llm.runtime_note
            assert r.llm.runtime_note.startswith("agreement check passed: min_cosine=")
        else:
            assert r.llm.backend == "torch" and "openvino/bfloat16 unavailable" in r.llm.runtime_note
        assert r.answer.startswith(EXTRACTIVE_PREFIX)
        assert r.citations and r.passages
        by_id = {p.id: p for p in r.passages}
        for c in r.citations:
            assert f"[{c.number}]" in r.answer
            assert by_id[c.passage_id].id == r.passages[c.number - 1].id
            assert c.source.startswith("PMID:")
        assert any(c.source == f"PMID:{question['pmid']}" for c in r.citations)

        msgs = [
            m async for m in stub.StreamAnswer(pb.StreamAnswerRequest(question=question["question"]), metadata=auth())
        ]
        assert msgs[0].passages and not msgs[0].text_delta
        assert "".join(m.text_delta for m in msgs) == r.answer
        assert msgs[-1].finish_reason == "stop" and msgs[-1].extractive and msgs[-1].citations

        off = await stub.AnswerQuestion(pb.AnswerQuestionRequest(question=OFF_TOPIC), metadata=auth())
        assert off.finish_reason == "no_relevant_passages" and not off.citations
        assert "No relevant passages were found" in off.answer
        assert metric("cxr_rag_no_relevant_total") == refusals + 1
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.AnswerQuestion(pb.AnswerQuestionRequest(question=""), metadata=auth())
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ingest_documents_rpc_is_idempotent_and_searchable():
    s = settings_for()
    doc = pb.Document(
        text="Zebra-stripe pneumatosis is a fictional radiographic sign invented for this test.",
        title="Test note",
        source="unit-test",
        metadata={"section": "TEST"},
    )
    async with running_server(s, binding_for(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.RagServiceStub(ch)
        r1 = await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[doc]), metadata=auth())
        r2 = await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[doc]), metadata=auth())
        assert (r1.documents_received, r2.chunks_added, r2.chunks_skipped) == (1, 0, 1)
        assert r1.chunks_added + r1.chunks_skipped == 1  # skipped if an earlier test run added it
        # BM25 sees the new chunk right away (index rebuilt after ingestion)
        found = await stub.SearchLiterature(
            pb.SearchLiteratureRequest(query="zebra-stripe pneumatosis", mode=pb.RETRIEVAL_MODE_LEXICAL, top_k=1),
            metadata=auth(),
        )
        assert found.passages[0].title == "Test note" and found.passages[0].metadata["section"] == "TEST"
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=[pb.Document(text=" ")]), metadata=auth())
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[0].text" in ei.value.details()


async def test_embedding_mismatch_keeps_service_not_serving():
    s = settings_for(embedding_model_name="some-other-model")
    async with running_server(s, binding_for(s)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pb_grpc.RagServiceStub(ch).SearchLiterature(pb.SearchLiteratureRequest(query="x"), metadata=auth())
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "still opening" in ei.value.details()


async def test_answers_through_an_openai_compatible_server(question):
    with openai_stub() as url:
        base = {"mode": "openai", "base_url": url, "max_retries": 1, "backoff_initial_s": 0.01}

        async def call(model: str, **llm):
            s = settings_for(llm={**base, "model": model, **llm})
            async with (
                running_server(s, binding_for(s)) as server,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
            ):
                stub = pb_grpc.RagServiceStub(ch)
                req = pb.AnswerQuestionRequest(question=question["question"], include_reasoning=True)
                one = await stub.AnswerQuestion(req, metadata=auth())
                plain = await stub.AnswerQuestion(
                    pb.AnswerQuestionRequest(question=question["question"]), metadata=auth()
                )
                sreq = pb.StreamAnswerRequest(question=question["question"], include_reasoning=True)
                stream = [m async for m in stub.StreamAnswer(sreq, metadata=auth())]
                return one, plain, stream

        one, plain, stream = await call("answer-model")
        assert not one.extractive and one.llm.name == "answer-model" and one.finish_reason == "stop"
        assert [c.number for c in one.citations] == [1, 2]  # [99] names no passage: dropped
        assert one.citations[0].passage_id == one.passages[0].id
        assert "".join(m.text_delta for m in stream) == one.answer
        assert stream[0].passages and [c.number for c in stream[-1].citations] == [1, 2]

        one, plain, stream = await call("deepseek-r1-stub")
        assert one.answer == "Yes, it helps [1]." and one.reasoning == "Let me think about it."
        assert plain.reasoning == ""  # reasoning only on request
        assert "".join(m.reasoning_delta for m in stream) == "Let me think about it."
        assert "".join(m.text_delta for m in stream) == "Yes, it helps [1]."

        assert metric("cxr_inference_total", model="llm:deepseek-r1-stub") >= 3
        errors = metric("cxr_rag_llm_errors_total", reason="LLM_SERVER_ERROR")
        for model, llm, code, text in (
            ("error500", {}, grpc.StatusCode.UNAVAILABLE, "answered HTTP 500 after 2 attempts"),
            ("slow", {"timeout_s": 0.5}, grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within 0.5s"),
            ("garbage", {}, grpc.StatusCode.UNAVAILABLE, "not an OpenAI chat completion"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call(model, **llm)
            assert ei.value.code() == code and text in ei.value.details(), model
        assert metric("cxr_rag_llm_errors_total", reason="LLM_SERVER_ERROR") == errors + 1


async def test_reasoning_fields_and_unused_think_block_through_the_service(question):
    """vLLM sends reasoning in its own field (`reasoning`, formerly `reasoning_content`) in both the
    JSON and the SSE forms: the service returns it only on request, and numbers cited inside it are
    never citations. An R1-named model writing no think tags gives the same answer streamed or not."""
    with openai_stub() as url:
        for model, answer, reasoning, cited in (
            ("vllm-reasoning", "Supported [2].", "Weighing [1] against [2].", [2]),
            ("vllm-reasoning-content", "Supported [2].", "Weighing [1] against [2].", [2]),
            ("deepseek-r1-notags", "Passage [1] says so; see [7].", "", [1]),
        ):
            s = settings_for(llm={"mode": "openai", "base_url": url, "model": model, "max_retries": 0})
            async with (
                running_server(s, binding_for(s)) as server,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
            ):
                stub = pb_grpc.RagServiceStub(ch)
                q = question["question"]
                one = await stub.AnswerQuestion(
                    pb.AnswerQuestionRequest(question=q, top_k=3, include_reasoning=True), metadata=auth()
                )
                plain = await stub.AnswerQuestion(pb.AnswerQuestionRequest(question=q, top_k=3), metadata=auth())
                sreq = pb.StreamAnswerRequest(question=q, top_k=3, include_reasoning=True)
                stream = [m async for m in stub.StreamAnswer(sreq, metadata=auth())]
            assert len(one.passages) == 3, model
            assert (one.answer, one.reasoning, [c.number for c in one.citations]) == (answer, reasoning, cited), model
            assert_citations_grounded(one.answer, one.citations, one.passages)
            assert plain.answer == answer and plain.reasoning == "", model
            passages = stream[0].passages
            assert [p.id for p in passages] == [p.id for p in one.passages], model
            assert "".join(m.text_delta for m in stream).strip() == answer, model
            assert [c.number for c in stream[-1].citations] == cited, model
            assert_citations_grounded(answer, stream[-1].citations, passages)
            if reasoning:
                assert "".join(m.reasoning_delta for m in stream) == reasoning, model
