"""Everything the RAG service holds at run time: store, embedder, BM25 index, LLM client.

`open()` (blocking; the server runs it in a thread while health says NOT_SERVING) loads the
embedding model, opens the store (checking the collection's embedding model), ingests
`documents_path` until one start-up ingestion of it has completed (so an interrupted first
start resumes on the next), and builds the BM25 index. Ingestion is
serialised by one lock; each batch of chunks it writes, re-labels or removes is applied to the
live BM25 index right after the store has it (no rebuild). Queries and ingestion embed with two
instances of the model (an export is loaded once, each with its own infer request), so a query never
waits for an ingestion batch's forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxr_rag import metrics
from cxr_rag.chunking import Document, content_hash
from cxr_rag.config import RagConfig
from cxr_rag.embeddings import Embedder, get_embedder, load_tokenizer, resolve_model_path
from cxr_rag.ingest import Ingestor, IngestStats, count_documents, read_documents
from cxr_rag.llm import LlmClient
from cxr_rag.pipeline import AnswerPipeline
from cxr_rag.retrieval import Retriever
from cxr_rag.store import VectorStore
from cxr_serving.errors import ModelNotReadyError

log = logging.getLogger(__name__)

STARTUP_MARKER = "startup_ingest"


class RagRuntime:
    def __init__(self, cfg: RagConfig) -> None:
        self.cfg = cfg
        self.model_path = resolve_model_path(cfg.embedding_model_path)
        self.tokenizer: Any = None
        self.embedder: Embedder | None = None  # queries (retrieval, extractive answers)
        self.ingest_embedder: Embedder | None = None  # ingestion: its own instance and lock
        self.store: VectorStore | None = None
        self.retriever: Retriever | None = None
        self.pipeline: AnswerPipeline | None = None
        self.llm: LlmClient | None = None
        if cfg.llm.mode == "openai":
            self.llm = LlmClient(cfg.llm, cfg.llm_model, cfg.think_open_in_prompt)
        self._ingest_lock = threading.Lock()
        self.last_ingest: IngestStats | None = None

    def open(self, *, progress: bool = True, build_index: bool = True) -> None:
        self.tokenizer = load_tokenizer(self.model_path)
        device, runtime = self.cfg.embedding_device, self.cfg.embedding_runtime
        self.embedder = get_embedder(self.model_path, device, runtime=runtime)
        self.ingest_embedder = get_embedder(self.model_path, device, role="ingest", runtime=runtime)
        self.store = VectorStore.open(self.cfg, self.cfg.embedding_name, self.embedder.dimension)
        self.retriever = Retriever(self.store, self.embedder, self.cfg.candidates, self.cfg.rrf_k)
        if self.cfg.ingest_on_start and self.cfg.documents_path is not None:
            self._startup_ingest(Path(self.cfg.documents_path), progress)
        if build_index:
            self.retriever.rebuild_index()
        self.pipeline = AnswerPipeline(self.cfg, self.retriever, self.embedder, self.tokenizer, self.llm)
        metrics.set_ready(self.ready, self.store.count())

    def _startup_ingest(self, docs: Path, progress: bool) -> None:
        """Ingest `documents_path` unless a previous start completed it (marker in the collection).

        An interrupted first start leaves no marker: the next start ingests again, skipping every
        chunk already stored, i.e. it resumes."""
        assert self.store is not None
        if not docs.exists():
            log.warning("models.rag.documents_path %s does not exist: nothing ingested at start", docs)
            return
        marker = content_hash(str(docs.resolve()), self.cfg.embedding_name, str(self.cfg.chunk_tokens))
        if self.store.marker(STARTUP_MARKER) == marker:
            log.info("%s was ingested by an earlier start (%d chunks): skipping", docs, self.store.count())
            return
        log.info("ingesting %s into '%s' (%d chunks present)", docs, self.cfg.collection, self.store.count())
        self.ingest(read_documents(docs), progress=progress, rebuild=False, total_documents=count_documents(docs))
        self.store.set_marker(STARTUP_MARKER, marker)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and self.retriever is not None and self.retriever.index_ready

    def require_ready(self) -> AnswerPipeline:
        if not self.ready or self.pipeline is None:
            raise ModelNotReadyError(
                "the literature store is still opening (loading, ingesting or indexing)", reason="RAG_NOT_READY"
            )
        return self.pipeline

    def ingestor(self, *, live_index: bool = True) -> Ingestor:
        assert self.store is not None and self.ingest_embedder is not None
        return Ingestor(
            self.store,
            self.ingest_embedder,
            self.tokenizer,
            self.cfg.chunk_tokens,
            self.cfg.chunk_overlap_tokens,
            self.cfg.embedding_batch_size,
            self.cfg.ingest_window,
            index=self.retriever.index if live_index and self.retriever is not None else None,
        )

    def ingest(
        self,
        documents: Iterable[Document],
        *,
        progress: bool = True,
        rebuild: bool = True,
        total_documents: int | None = None,
    ) -> IngestStats:
        """`rebuild=False`: the BM25 index is not kept up to date (it is built from the store afterwards)."""
        with self._ingest_lock:
            ingestor = self.ingestor(live_index=rebuild)
            stats = ingestor.ingest(documents, progress=progress, total_documents=total_documents)
            self.last_ingest = stats
            if self.store is not None:
                metrics.CHUNKS.set(self.store.count())
            return stats

    async def aclose(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()
