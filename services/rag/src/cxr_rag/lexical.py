"""BM25 over the same chunks as the vector store (bm25s), rebuilt from the store's contents.

Tokens: lower-cased words of 2+ characters, English stop words removed, and a light
"S-stemmer" (Harman 1991: plural endings only) so `patients`/`patient` match without an
extra stemming dependency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import bm25s
import numpy as np

from cxr_rag.store import StoredChunk

log = logging.getLogger(__name__)


def s_stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def _stem_all(words: list[str]) -> list[str]:
    return [s_stem(w) for w in words]


def tokenize(texts: list[str]) -> list[list[str]]:
    out = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    return [[s_stem(w) for w in doc] for doc in out]  # type: ignore[union-attr]


@dataclass(frozen=True)
class LexicalHit:
    chunk: StoredChunk
    score: float


class LexicalIndex:
    def __init__(self, chunks: Sequence[StoredChunk]) -> None:
        started = time.perf_counter()
        self.chunks = list(chunks)
        self._bm25 = bm25s.BM25()
        if self.chunks:
            self._bm25.index(tokenize([c.text for c in self.chunks]), show_progress=False)
        self.build_seconds = time.perf_counter() - started
        log.info("BM25 index over %d chunks built in %.2fs", len(self.chunks), self.build_seconds)

    def __len__(self) -> int:
        return len(self.chunks)

    def _mask(self, filters: dict[str, str] | None) -> np.ndarray | None:
        if not filters:
            return None
        return np.array(
            [all(c.metadata.get(k) == v for k, v in filters.items()) for c in self.chunks], dtype=np.float32
        )

    def search(self, query: str, n: int, filters: dict[str, str] | None = None) -> list[LexicalHit]:
        if not self.chunks:
            return []
        terms = tokenize([query])[0]
        if not terms:
            return []
        scores = self._bm25.get_scores(terms, weight_mask=self._mask(filters))
        n = min(n, len(self.chunks))
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [LexicalHit(self.chunks[i], float(scores[i])) for i in top if scores[i] > 0]
