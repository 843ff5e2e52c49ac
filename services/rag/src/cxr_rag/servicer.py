"""gRPC adapter: protobuf <-> pipeline/runtime. No retrieval or LLM logic here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cxr_protos.common.v1 import common_pb2
from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.chunking import Document, content_hash
from cxr_rag.config import RagConfig
from cxr_rag.pipeline import (
    EXTRACTIVE_MODEL,
    AnswerRequest,
    Citation,
    DoneEvent,
    PassagesEvent,
    ReasoningEvent,
    TextEvent,
)
from cxr_rag.retrieval import Mode, Passage
from cxr_rag.runtime import RagRuntime
from cxr_serving.errors import InvalidInputError

_MODES: dict[int, Mode] = {
    pb.RETRIEVAL_MODE_UNSPECIFIED: Mode.HYBRID,
    pb.RETRIEVAL_MODE_HYBRID: Mode.HYBRID,
    pb.RETRIEVAL_MODE_DENSE: Mode.DENSE,
    pb.RETRIEVAL_MODE_LEXICAL: Mode.LEXICAL,
}


def _mode(value: int) -> Mode:
    try:
        return _MODES[value]
    except KeyError:
        raise InvalidInputError(f"mode: unknown retrieval mode {value}") from None


def passage_pb(p: Passage) -> pb.RetrievedPassage:
    return pb.RetrievedPassage(
        id=p.id,
        text=p.text,
        title=p.title,
        source=p.source,
        score=p.score,
        metadata=p.metadata,
        dense_rank=p.dense_rank,
        lexical_rank=p.lexical_rank,
    )


def citation_pb(c: Citation) -> pb.Citation:
    return pb.Citation(number=c.number, passage_id=c.passage.id, title=c.passage.title, source=c.passage.source)


class RagServicer(pb_grpc.RagServiceServicer):  # type: ignore[misc]  # generated *_pb2_grpc has no stub: its base is Any
    def __init__(self, runtime: RagRuntime, cfg: RagConfig) -> None:
        self.runtime = runtime
        self.cfg = cfg

    def llm_info(self, model: str | None = None) -> common_pb2.ModelInfo:
        if self.runtime.llm is None:
            return common_pb2.ModelInfo(
                name=EXTRACTIVE_MODEL,
                version=EXTRACTIVE_MODEL,
                architecture="extractive: retrieved sentences ranked by similarity, no language model",
                state=common_pb2.MODEL_STATE_READY,
                **self.embedder_info(),  # type: ignore[arg-type]  # every key is a string field of ModelInfo
            )
        return common_pb2.ModelInfo(
            name=model or self.runtime.llm.model,
            version=model or self.runtime.llm.model,
            architecture="openai-compatible chat completions",
            state=common_pb2.MODEL_STATE_READY,
            device=self.runtime.llm.base_url,
        )

    def embedder_info(self) -> dict[str, str]:
        """What computes the embeddings the extractive answer ranks sentences by (the fast path, or torch and why)."""
        emb = self.runtime.embedder
        if emb is None:
            return {"device": self.cfg.embedding_device}
        note = emb.runtime_note
        return {"device": emb.device, "backend": emb.backend, "precision": emb.precision, "runtime_note": note}

    def _request(self, r: pb.AnswerQuestionRequest | pb.StreamAnswerRequest) -> AnswerRequest:
        return AnswerRequest(
            question=r.question,
            top_k=r.top_k,
            filters=dict(r.filters),
            mode=_mode(r.mode),
            max_tokens=r.max_tokens,
            temperature=r.temperature if r.temperature else None,
            include_reasoning=r.include_reasoning,
        )

    async def AnswerQuestion(
        self,
        request: pb.AnswerQuestionRequest,
        context: grpc.aio.ServicerContext[pb.AnswerQuestionRequest, pb.AnswerQuestionResponse],
    ) -> pb.AnswerQuestionResponse:
        pipeline = self.runtime.require_ready()
        ans = await pipeline.answer(self._request(request))
        return pb.AnswerQuestionResponse(
            answer=ans.text,
            citations=[citation_pb(c) for c in ans.citations],
            passages=[passage_pb(p) for p in ans.passages],
            llm=self.llm_info(ans.model),
            finish_reason=ans.finish_reason,
            reasoning=ans.reasoning,
            extractive=ans.extractive,
        )

    async def StreamAnswer(
        self,
        request: pb.StreamAnswerRequest,
        context: grpc.aio.ServicerContext[pb.StreamAnswerRequest, pb.StreamAnswerResponse],
    ) -> AsyncIterator[pb.StreamAnswerResponse]:
        pipeline = self.runtime.require_ready()
        async for ev in pipeline.stream(self._request(request)):
            if isinstance(ev, PassagesEvent):
                yield pb.StreamAnswerResponse(passages=[passage_pb(p) for p in ev.passages])
            elif isinstance(ev, TextEvent):
                yield pb.StreamAnswerResponse(text_delta=ev.text)
            elif isinstance(ev, ReasoningEvent):
                yield pb.StreamAnswerResponse(reasoning_delta=ev.text)
            elif isinstance(ev, DoneEvent):
                yield pb.StreamAnswerResponse(
                    citations=[citation_pb(c) for c in ev.citations],
                    finish_reason=ev.finish_reason,
                    llm=self.llm_info(ev.model),
                    extractive=ev.extractive,
                )

    async def SearchLiterature(
        self,
        request: pb.SearchLiteratureRequest,
        context: grpc.aio.ServicerContext[pb.SearchLiteratureRequest, pb.SearchLiteratureResponse],
    ) -> pb.SearchLiteratureResponse:
        self.runtime.require_ready()
        retriever = self.runtime.retriever
        assert retriever is not None
        k = request.top_k or self.cfg.top_k
        if k < 1 or k > self.cfg.max_top_k:
            raise InvalidInputError(f"top_k: must be between 1 and {self.cfg.max_top_k}")
        result = await asyncio.to_thread(
            retriever.search, request.query, k, _mode(request.mode), dict(request.filters) or None
        )
        return pb.SearchLiteratureResponse(passages=[passage_pb(p) for p in result.passages])

    async def IngestDocuments(
        self,
        request: pb.IngestDocumentsRequest,
        context: grpc.aio.ServicerContext[pb.IngestDocumentsRequest, pb.IngestDocumentsResponse],
    ) -> pb.IngestDocumentsResponse:
        self.runtime.require_ready()
        if not request.documents:
            raise InvalidInputError("documents: at least one document is required")
        if len(request.documents) > self.cfg.max_documents_per_request:
            raise InvalidInputError(
                f"documents: at most {self.cfg.max_documents_per_request} per request (got {len(request.documents)})"
            )
        docs = []
        for i, d in enumerate(request.documents):
            if not d.text.strip():
                raise InvalidInputError(f"documents[{i}].text: must not be empty")
            docs.append(
                Document(
                    key=d.id or content_hash(d.text),
                    text=d.text,
                    title=d.title,
                    source=d.source or "api",
                    metadata=dict(d.metadata),
                )
            )
        stats = await asyncio.to_thread(self.runtime.ingest, docs, progress=False)
        return pb.IngestDocumentsResponse(
            documents_received=len(docs),
            chunks_added=stats.chunks_added,
            chunks_skipped=stats.chunks_skipped,
            chunks_removed=stats.chunks_removed,
        )
