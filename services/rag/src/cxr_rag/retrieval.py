"""Dense (Chroma), lexical (BM25) and hybrid retrieval fused by reciprocal-rank fusion.

Scores: dense = cosine similarity; lexical = BM25; hybrid = sum over lists of 1/(rrf_k + rank)
(Cormack et al. 2009). Every passage carries its 1-based rank in each list (0: absent) and,
when the dense search saw it, its cosine similarity, which the answer pipeline compares
against the relevance threshold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from cxr_rag.embeddings import Embedder
from cxr_rag.lexical import LexicalIndex
from cxr_rag.store import VectorStore
from cxr_serving.errors import InvalidInputError, ModelNotReadyError

log = logging.getLogger(__name__)


class Mode(StrEnum):
    DENSE = "dense"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


@dataclass
class Passage:
    id: str
    text: str
    metadata: dict[str, str]
    score: float = 0.0
    dense_rank: int = 0
    lexical_rank: int = 0
    similarity: float | None = None

    @property
    def title(self) -> str:
        return self.metadata.get("title", "")

    @property
    def source(self) -> str:
        return self.metadata.get("source", "")


@dataclass
class RetrievalResult:
    passages: list[Passage]
    best_similarity: float | None = None  # best dense cosine similarity seen (None: dense not run)
    timings_ms: dict[str, float] = field(default_factory=dict)


def rrf_fuse(lists: list[list[Passage]], k: int, rrf_k: int) -> list[Passage]:
    fused: dict[str, Passage] = {}
    for ranked in lists:
        for rank, p in enumerate(ranked, 1):
            cur = fused.get(p.id)
            if cur is None:
                cur = Passage(p.id, p.text, p.metadata)
                fused[p.id] = cur
            cur.score += 1.0 / (rrf_k + rank)
            cur.dense_rank = cur.dense_rank or p.dense_rank
            cur.lexical_rank = cur.lexical_rank or p.lexical_rank
            cur.similarity = cur.similarity if cur.similarity is not None else p.similarity
    return sorted(fused.values(), key=lambda p: (-p.score, p.dense_rank or 10**9, p.id))[:k]


class Retriever:
    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        candidates: int = 50,
        rrf_k: int = 60,
        *,
        concurrent_sides: bool = True,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.candidates = candidates
        self.rrf_k = rrf_k
        self._index: LexicalIndex | None = None
        self._rebuild_lock = threading.Lock()
        # a hybrid query's BM25 side runs here while its caller embeds the query and asks Chroma
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="bm25") if concurrent_sides else None

    @property
    def index_ready(self) -> bool:
        return self._index is not None

    @property
    def index(self) -> LexicalIndex | None:
        return self._index

    def rebuild_index(self) -> LexicalIndex:
        """Read every chunk from the store into a fresh BM25 index (at start), a page at a time, so the
        store's chunks are never all in memory as Python objects; later changes are applied to it as they
        happen (`LexicalIndex.add` / `remove`), never by reading the store again."""
        with self._rebuild_lock:
            index = LexicalIndex(self.store.iter_chunks())
            self._index = index
            return index

    def dense(self, query: str, n: int, filters: dict[str, str] | None) -> list[Passage]:
        """Nearest chunks by id from Chroma; their text and metadata from the BM25 index's snapshot (the same
        chunks, kept in memory), from the store only for a hit the index does not hold (yet)."""
        hits = self.store.nearest(self.embedder.encode([query])[0], n, filters)
        ids = [i for i, _ in hits]
        known = self._index.chunks(ids) if self._index is not None else {}
        if len(known) < len(ids):
            known.update(self.store.chunks([i for i in ids if i not in known]))
        out: list[Passage] = []
        for i, sim in hits:
            c = known.get(i)
            if c is not None:  # else deleted since the search found it
                out.append(Passage(i, c.text, c.metadata, score=sim, dense_rank=len(out) + 1, similarity=sim))
        return out

    @staticmethod
    def _timed(
        side: Callable[[str, int, dict[str, str] | None], list[Passage]],
        query: str,
        n: int,
        filters: dict[str, str] | None,
        timings: dict[str, float],
        key: str,
    ) -> list[Passage]:
        t = time.perf_counter()
        out = side(query, n, filters)
        timings[key] = (time.perf_counter() - t) * 1000
        return out

    def lexical(self, query: str, n: int, filters: dict[str, str] | None) -> list[Passage]:
        if self._index is None:
            raise ModelNotReadyError("the BM25 index is still being built", reason="INDEX_NOT_READY")
        return [
            Passage(h.chunk.id, h.chunk.text, h.chunk.metadata, score=h.score, lexical_rank=r)
            for r, h in enumerate(self._index.search(query, n, filters), 1)
        ]

    def search(
        self,
        query: str,
        k: int,
        mode: Mode = Mode.HYBRID,
        filters: dict[str, str] | None = None,
        *,
        need_similarity: bool = False,
    ) -> RetrievalResult:
        query = query.strip()
        if not query:
            raise InvalidInputError("query: must not be empty")
        if k < 1:
            raise InvalidInputError("top_k: must be at least 1")
        n = max(k, self.candidates)
        timings: dict[str, float] = {}
        dense: list[Passage] = []
        lexical: list[Passage] = []
        run_dense = mode in (Mode.DENSE, Mode.HYBRID) or need_similarity
        side: Future[list[Passage]] | None = None
        if mode in (Mode.LEXICAL, Mode.HYBRID):
            if run_dense and self._pool is not None:  # BM25 runs while the query embeds (which releases the GIL)
                side = self._pool.submit(self._timed, self.lexical, query, n, filters, timings, "lexical_ms")
            else:
                lexical = self._timed(self.lexical, query, n, filters, timings, "lexical_ms")
        if run_dense:
            dense = self._timed(self.dense, query, n, filters, timings, "dense_ms")
        if side is not None:
            lexical = side.result()
        if mode == Mode.DENSE:
            passages = dense[:k]
        elif mode == Mode.LEXICAL:
            passages = lexical[:k]
            sims = {p.id: p.similarity for p in dense}
            for p in passages:
                p.similarity = sims.get(p.id)
        else:
            passages = rrf_fuse([dense, lexical], k, self.rrf_k)
        best = max((p.similarity for p in dense if p.similarity is not None), default=None) if dense else None
        return RetrievalResult(passages, best, timings)
