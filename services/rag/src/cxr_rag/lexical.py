"""BM25 over the same chunks as the vector store: a live index of immutable segments.

Additions become a new small segment; deletions mark rows dead (a new `alive` array, never an
edit of one a search is reading); a chunk added again under its id replaces the old row. Every
change publishes a new immutable snapshot (segments, alive rows, corpus statistics) with one
reference assignment, so a search reads a consistent snapshot without any lock and is never
held up by an ingestion. When there are more than `max_segments` segments, the smaller ones are
merged in a background thread (dead rows dropped) and swapped in; deletions made meanwhile are
carried over. Scores are BM25 as bm25s computes it by default ("lucene": idf = ln(1 + (N - df +
0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b dl / avgdl))), with N, df and avgdl over the live
chunks, so a live index scores exactly as one built from scratch over the same chunks.

Tokens: lower-cased words of 2+ characters, English stop words removed, and a light
"S-stemmer" (Harman 1991: plural endings only) so `patients`/`patient` match without an
extra stemming dependency.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import bm25s
import numpy as np
from scipy import sparse

from cxr_rag.store import StoredChunk

log = logging.getLogger(__name__)

K1 = 1.5
B = 0.75


def s_stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def tokenize(texts: list[str]) -> list[list[str]]:
    out = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    return [[s_stem(w) for w in doc] for doc in out]  # type: ignore[union-attr]


@dataclass(frozen=True)
class LexicalHit:
    chunk: StoredChunk
    score: float


class Segment:
    """Chunks with their term frequencies (docs x terms, CSC: a term's postings are one column)."""

    def __init__(self, chunks: list[StoredChunk], tf: sparse.csc_matrix, lengths: np.ndarray) -> None:
        self.chunks = chunks
        self.tf = tf
        self.lengths = lengths
        self.row_of = {c.id: i for i, c in enumerate(chunks)}

    def __len__(self) -> int:
        return len(self.chunks)

    def postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        if term >= self.tf.shape[1]:
            return _EMPTY_ROWS, _EMPTY_TF
        lo, hi = self.tf.indptr[term], self.tf.indptr[term + 1]
        return self.tf.indices[lo:hi], self.tf.data[lo:hi]


_EMPTY_ROWS = np.zeros(0, dtype=np.int32)
_EMPTY_TF = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class Snapshot:
    """What one search reads: segments with their alive rows, and the live corpus statistics."""

    segments: tuple[Segment, ...]
    alive: tuple[np.ndarray, ...]
    docs: int
    total_length: float


class LexicalIndex:
    def __init__(self, chunks: Sequence[StoredChunk] = (), *, max_segments: int = 8) -> None:
        started = time.perf_counter()
        self.max_segments = max_segments
        self._vocab: dict[str, int] = {}
        self._write = threading.Lock()  # writers (add, remove, merge swap) only; searches never take it
        self._snap = Snapshot((), (), 0, 0.0)
        self._merging: threading.Thread | None = None
        self.tokenized = 0  # chunks tokenized since creation: an addition costs its own chunks, not the corpus
        self.merges = 0
        self.add(chunks)
        self.build_seconds = time.perf_counter() - started
        log.info("BM25 index over %d chunks built in %.2fs", len(self), self.build_seconds)

    def __len__(self) -> int:
        return self._snap.docs

    @property
    def segments(self) -> int:
        return len(self._snap.segments)

    # -- writers ----------------------------------------------------------------------

    def _segment(self, chunks: list[StoredChunk], tokens: list[list[str]]) -> Segment:
        """Called with the write lock held: the vocabulary only grows."""
        rows, cols, vals = [], [], []
        lengths = np.zeros(len(chunks), dtype=np.float32)
        for r, words in enumerate(tokens):
            lengths[r] = len(words)
            counts: dict[int, int] = {}
            for w in words:
                t = self._vocab.setdefault(w, len(self._vocab))
                counts[t] = counts.get(t, 0) + 1
            rows += [r] * len(counts)
            cols += list(counts)
            vals += list(counts.values())
        tf = sparse.csc_matrix(
            (np.asarray(vals, dtype=np.float32), (np.asarray(rows, np.int32), np.asarray(cols, np.int32))),
            shape=(len(chunks), len(self._vocab)),
        )
        tf.sort_indices()
        return Segment(chunks, tf, lengths)

    def add(self, chunks: Iterable[StoredChunk]) -> None:
        """Index `chunks`; one whose id is already indexed replaces the old row (new text or metadata)."""
        new = list({c.id: c for c in chunks}.values())
        if not new:
            return
        tokens = tokenize([c.text for c in new])  # outside the lock: the slow part
        with self._write:
            snap = self._kill(self._snap, {c.id for c in new})
            seg = self._segment(new, tokens)
            self._publish(
                Snapshot(
                    (*snap.segments, seg),
                    (*snap.alive, np.ones(len(seg), dtype=bool)),
                    snap.docs + len(seg),
                    snap.total_length + float(seg.lengths.sum()),
                )
            )
            self.tokenized += len(new)
        self._maybe_merge()

    def remove(self, ids: Iterable[str]) -> None:
        with self._write:
            self._publish(self._kill(self._snap, set(ids)))

    def _kill(self, snap: Snapshot, ids: set[str]) -> Snapshot:
        if not ids:
            return snap
        alive = list(snap.alive)
        docs, total = snap.docs, snap.total_length
        for i, seg in enumerate(snap.segments):
            rows = [r for r in (seg.row_of.get(x) for x in ids) if r is not None and alive[i][r]]
            if rows:
                alive[i] = alive[i].copy()
                alive[i][rows] = False
                docs -= len(rows)
                total -= float(seg.lengths[rows].sum())
        return Snapshot(snap.segments, tuple(alive), docs, total)

    def _publish(self, snap: Snapshot) -> None:
        self._snap = snap  # one reference assignment: searches see the old or the new snapshot, whole

    # -- background merge -----------------------------------------------------------------

    def _maybe_merge(self) -> None:
        if len(self._snap.segments) <= self.max_segments:
            return
        with self._write:
            if self._merging is not None:
                return  # the running merger looks again before it stops
            self._merging = threading.Thread(target=self._merge_while_needed, name="bm25-merge", daemon=True)
            self._merging.start()

    def wait_merges(self, timeout: float = 60) -> None:
        t = self._merging
        if t is not None:
            t.join(timeout)

    def _merge_while_needed(self) -> None:
        while True:
            with self._write:  # decided under the lock an addition publishes under: no addition goes unseen
                if len(self._snap.segments) <= self.max_segments:
                    self._merging = None
                    return
            if not self._merge():
                with self._write:
                    self._merging = None
                return

    def _merge(self) -> bool:
        """Merge the smaller segments until max_segments // 2 + 1 remain; searches go on meanwhile."""
        try:
            snap = self._snap
            order = sorted(range(len(snap.segments)), key=lambda i: len(snap.segments[i]))
            pick = order[: max(2, len(order) - self.max_segments // 2)]
            chunks: list[StoredChunk] = []
            parts, lengths, taken = [], [], []
            width = max(snap.segments[i].tf.shape[1] for i in pick)
            for i in pick:
                seg, keep = snap.segments[i], np.flatnonzero(snap.alive[i])
                chunks += [seg.chunks[r] for r in keep]
                m = seg.tf.tocsr()[keep]
                parts.append(sparse.csr_matrix((m.data, m.indices, m.indptr), shape=(len(keep), width)))
                lengths.append(seg.lengths[keep])
                taken.append((seg, keep))
            tf = sparse.vstack(parts, format="csc") if parts else sparse.csc_matrix((0, width), dtype=np.float32)
            tf.sort_indices()
            merged = Segment(chunks, tf.astype(np.float32), np.concatenate(lengths) if lengths else _EMPTY_TF)
            with self._write:
                cur = self._snap
                index_of = {id(s): i for i, s in enumerate(cur.segments)}
                # rows that died since the merge began (deleted or replaced) die in the merged segment too
                merged_alive = np.concatenate([cur.alive[index_of[id(seg)]][keep] for seg, keep in taken])
                picked = {id(seg) for seg, _ in taken}
                rest = [i for i, s in enumerate(cur.segments) if id(s) not in picked]
                self._publish(
                    Snapshot(
                        (*(cur.segments[i] for i in rest), merged),
                        (*(cur.alive[i] for i in rest), merged_alive),
                        cur.docs,
                        cur.total_length,
                    )
                )
                self.merges += 1
            return True
        except Exception:  # a failed merge leaves the index as it was: still correct, only more segments
            log.exception("BM25 segment merge failed")
            return False

    def chunks(self, ids: Iterable[str]) -> dict[str, StoredChunk]:
        """The indexed (live) chunks among `ids`, from one snapshot: the dense side's hits without a store read."""
        snap = self._snap
        out: dict[str, StoredChunk] = {}
        for i in ids:
            for seg, alive in zip(snap.segments, snap.alive, strict=True):
                r = seg.row_of.get(i)
                if r is not None and alive[r]:
                    out[i] = seg.chunks[r]
                    break
        return out

    # -- search --------------------------------------------------------------------------

    def search(self, query: str, n: int, filters: dict[str, str] | None = None) -> list[LexicalHit]:
        snap = self._snap
        if not snap.docs:
            return []
        terms = [t for t in (self._vocab.get(w) for w in tokenize([query])[0]) if t is not None]
        if not terms:
            return []
        avgdl = snap.total_length / snap.docs
        postings = [[seg.postings(t) for seg in snap.segments] for t in terms]
        scores = [np.zeros(len(seg), dtype=np.float32) for seg in snap.segments]
        for per_seg in postings:
            live = [(r[alive[r]], tf[alive[r]]) for (r, tf), alive in zip(per_seg, snap.alive, strict=True)]
            df = sum(len(rows) for rows, _ in live)
            if not df:
                continue
            idf = np.float32(np.log(1 + (snap.docs - df + 0.5) / (df + 0.5)))
            for s, seg, (rows, tf) in zip(scores, snap.segments, live, strict=True):
                norm = K1 * ((1 - B) + B * seg.lengths[rows] / np.float32(avgdl))
                s[rows] += idf * tf / (tf + norm)
        flat = np.concatenate(scores)
        starts = np.cumsum([0, *(len(seg) for seg in snap.segments)])
        nonzero = np.flatnonzero(flat > 0)
        if not filters and len(nonzero) > n:
            nonzero = nonzero[np.argpartition(-flat[nonzero], n - 1)[:n]]
        hits: list[LexicalHit] = []
        for g in nonzero[np.argsort(-flat[nonzero], kind="stable")]:
            i = int(np.searchsorted(starts, g, side="right")) - 1
            chunk = snap.segments[i].chunks[g - starts[i]]
            if filters and not all(chunk.metadata.get(k) == v for k, v in filters.items()):
                continue
            hits.append(LexicalHit(chunk, float(flat[g])))
            if len(hits) >= n:
                break
        return hits
