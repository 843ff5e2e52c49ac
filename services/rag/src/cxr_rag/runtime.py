"""Everything the RAG service holds at run time: store, embedder, BM25 index, LLM client.

`open()` (blocking; the server runs it in a thread while health says NOT_SERVING) loads the
embedding model, opens the store (checking the collection's embedding model), ingests
`documents_path` when the collection is empty, and builds the BM25 index. Ingestion is
serialised by one lock; after new chunks arrive the BM25 index is rebuilt and swapped in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cxr_rag.chunking import Document
from cxr_rag.config import RagConfig
from cxr_rag.embeddings import Embedder, get_embedder, load_tokenizer, resolve_model_path
from cxr_rag.ingest import Ingestor, IngestStats, read_documents
from cxr_rag.llm import LlmClient
from cxr_rag.pipeline import AnswerPipeline
from cxr_rag.retrieval import Retriever
from cxr_rag.store import VectorStore
from cxr_serving.errors import ModelNotReadyError

log = logging.getLogger(__name__)


class RagRuntime:
    def __init__(self, cfg: RagConfig) -> None:
        self.cfg = cfg
        self.model_path = resolve_model_path(cfg.embedding_model_path)
        self.tokenizer: Any = None
        self.embedder: Embedder | None = None
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
        self.embedder = get_embedder(self.model_path, self.cfg.embedding_device)
        self.store = VectorStore.open(self.cfg, self.cfg.embedding_name, self.embedder.dimension)
        self.retriever = Retriever(self.store, self.embedder, self.cfg.candidates, self.cfg.rrf_k)
        docs = self.cfg.documents_path
        if self.cfg.ingest_on_empty and docs is not None and self.store.count() == 0:
            if Path(docs).exists():
                log.info("collection '%s' is empty: ingesting %s", self.cfg.collection, docs)
                self.ingest(read_documents(Path(docs)), progress=progress, rebuild=False)
            else:
                log.warning("models.rag.documents_path %s does not exist: starting with an empty store", docs)
        if build_index:
            self.retriever.rebuild_index()
        self.pipeline = AnswerPipeline(self.cfg, self.retriever, self.embedder, self.tokenizer, self.llm)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and self.retriever is not None and self.retriever.index_ready

    def require_ready(self) -> AnswerPipeline:
        if not self.ready or self.pipeline is None:
            raise ModelNotReadyError(
                "the literature store is still opening (loading, ingesting or indexing)", reason="RAG_NOT_READY"
            )
        return self.pipeline

    def ingestor(self) -> Ingestor:
        assert self.store is not None and self.embedder is not None
        return Ingestor(
            self.store,
            self.embedder,
            self.tokenizer,
            self.cfg.chunk_tokens,
            self.cfg.chunk_overlap_tokens,
            self.cfg.embedding_batch_size,
        )

    def ingest(self, documents: Iterable[Document], *, progress: bool = True, rebuild: bool = True) -> IngestStats:
        with self._ingest_lock:
            stats = self.ingestor().ingest(documents, progress=progress)
            self.last_ingest = stats
            if rebuild and stats.chunks_added and self.retriever is not None:
                self.retriever.rebuild_index()
            return stats

    async def aclose(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()
