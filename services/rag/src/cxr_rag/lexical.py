"""BM25 over the same chunks as the vector store: a live index of immutable, compact segments.

Additions become a new small segment; deletions mark rows dead (a new `alive` array, never an
edit of one a search is reading); a chunk added again under its id replaces the old row. Every
change publishes a new immutable snapshot (segments, alive rows, corpus statistics) with one
reference assignment, so a search reads a consistent snapshot without any lock and is never
held up by an ingestion. When there are more than `max_segments` segments, the smaller ones are
merged in a background thread (dead rows dropped) and swapped in; deletions made meanwhile are
carried over. Scores are BM25 as bm25s computes it by default ("lucene": idf = ln(1 + (N - df +
0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b dl / avgdl))), with N, df and avgdl over the live
chunks, so a live index scores exactly as one built from scratch over the same chunks.

Memory: a segment holds numpy arrays only (postings as int32 rows and uint8 term counts per term,
uint16 in a segment where a word occurs more than 255 times in one chunk,
document lengths, 64-bit hashes of the chunk ids); each chunk's id, text and metadata go to the
segment's unlinked temporary file (`records_dir`, default the temporary directory) and are read
back for the hits a search returns, so no Python object per chunk stays in memory.

Tokens: lower-cased words of 2+ characters, English stop words removed, and a light
"S-stemmer" (Harman 1991: plural endings only) so `patients`/`patient` match without an
extra stemming dependency.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import logging
import marshal
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import bm25s
import numpy as np

from cxr_rag.store import StoredChunk

log = logging.getLogger(__name__)

K1 = 1.5
B = 0.75
BUILD_BATCH = 8192  # chunks tokenized at a time while an index is built: bounds the Python objects alive at once
TF_MAX = np.iinfo(np.uint16).max


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


def counts_array(tf: np.ndarray) -> np.ndarray:
    """Term counts in the smallest unsigned type that holds them: uint8 almost always (5 bytes a posting
    with its int32 row instead of 6), uint16 (clipped at 65,535) where a word is repeated more."""
    if len(tf) and int(tf.max()) > np.iinfo(np.uint8).max:
        clipped: np.ndarray = np.minimum(tf, TF_MAX).astype(np.uint16)
        return clipped
    return tf.astype(np.uint8)


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """64-bit hashes of chunk ids: what a segment keeps to find a row by id (a match is checked on the record)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


@dataclass(frozen=True)
class LexicalHit:
    chunk: StoredChunk
    score: float


class Records:
    """One segment's chunks (id, text, metadata) in an unlinked temporary file, read back by row with pread.

    Records are `marshal`ed: the file lives only as long as this process, and a hit decodes faster than from
    JSON."""

    def __init__(self, directory: Path | None) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=directory, prefix="cxr-bm25-")
        self._ends = array.array("q")
        self._size = 0
        self.offsets = np.zeros(1, dtype=np.int64)

    def append(self, chunks: Iterable[StoredChunk]) -> None:
        parts = [marshal.dumps((c.id, c.metadata, c.text)) for c in chunks]
        self.append_raw(parts)

    def append_raw(self, parts: Sequence[bytes]) -> None:
        for p in parts:
            self._size += len(p)
            self._ends.append(self._size)
        self._file.write(b"".join(parts))

    def seal(self) -> Records:
        """No more appends: the offsets become one array and the file is flushed for pread."""
        self._file.flush()
        self.offsets = np.concatenate([[0], np.frombuffer(self._ends, dtype=np.int64)])
        self._ends = array.array("q")
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, row: int) -> bytes:
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        return os.pread(self._file.fileno(), hi - lo, lo)

    def get(self, row: int) -> StoredChunk:
        cid, meta, text = marshal.loads(self.raw(row))  # noqa: S302 - bytes this process wrote to its unlinked file
        return StoredChunk(cid, text, meta)

    def copy_rows(self, rows: np.ndarray, dest: Records, block: int = 4096) -> None:
        """Append `rows` (ascending) to `dest`, reading contiguous byte ranges a block of rows at a time."""
        fd = self._file.fileno()
        for s in range(0, len(rows), block):
            part = rows[s : s + block]
            lo, hi = int(self.offsets[part[0]]), int(self.offsets[part[-1] + 1])
            data = os.pread(fd, hi - lo, lo)
            starts, ends = self.offsets[part] - lo, self.offsets[part + 1] - lo
            dest.append_raw([data[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])

    def close(self) -> None:
        self._file.close()


class Segment:
    """Chunks with their term counts as CSC arrays (a term's postings: rows[indptr[t]:indptr[t + 1]])."""

    def __init__(
        self,
        indptr: np.ndarray,
        rows: np.ndarray,
        tf: np.ndarray,
        lengths: np.ndarray,
        keys: np.ndarray,
        records: Records,
    ) -> None:
        self.indptr = indptr
        self.rows = rows
        self.tf = tf
        self.lengths = lengths
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.key_rows = order.astype(np.int32)
        self.records = records

    def __len__(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        arrays = (self.indptr, self.rows, self.tf, self.lengths, self.keys, self.key_rows, self.records.offsets)
        return sum(a.nbytes for a in arrays)

    def postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        if term >= len(self.indptr) - 1:
            return _EMPTY_ROWS, _EMPTY_TF
        lo, hi = self.indptr[term], self.indptr[term + 1]
        return self.rows[lo:hi], self.tf[lo:hi]

    def locate(self, ids: Sequence[str], keys: np.ndarray, alive: np.ndarray) -> list[tuple[int, StoredChunk] | None]:
        """The alive row and record of each of `ids` (None: none in this segment); a hash match is confirmed
        on the record."""
        pos = np.searchsorted(self.keys, keys)
        out: list[tuple[int, StoredChunk] | None] = []
        for cid, key, p in zip(ids, keys.tolist(), pos.tolist(), strict=True):
            found = None
            while found is None and p < len(self.keys) and int(self.keys[p]) == key:
                r = int(self.key_rows[p])
                if alive[r]:
                    chunk = self.records.get(r)
                    found = (r, chunk) if chunk.id == cid else None
                p += 1
            out.append(found)
        return out

    def __del__(self) -> None:  # the last snapshot holding the segment is gone: its file goes with it
        self.records.close()


_EMPTY_ROWS = np.zeros(0, dtype=np.int32)
_EMPTY_TF = np.zeros(0, dtype=np.uint16)


Part = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None", int]  # indptr, rows, tf, renumber, offset


def _term_blocks(indptr: np.ndarray, block: int) -> Iterator[tuple[int, int]]:
    """Consecutive term ranges of about `block` postings each (one term alone may hold more)."""
    t0, n = 0, len(indptr) - 1
    while t0 < n:
        t1 = min(max(int(np.searchsorted(indptr, indptr[t0] + block, side="right")) - 1, t0 + 1), n)
        yield t0, t1
        t0 = t1


def _block(part: Part, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term, row, tf) of the part's postings of terms t0..t1, dead rows dropped and rows renumbered."""
    indptr, rows, tf, renumber, _ = part
    lo, hi = int(indptr[t0]), int(indptr[t1])
    terms = np.repeat(np.arange(t0, t1), np.diff(indptr[t0 : t1 + 1]))
    r, f = rows[lo:hi], tf[lo:hi]
    if renumber is not None:
        r = renumber[r]
        keep = r >= 0
        r, f, terms = r[keep], f[keep], terms[keep]
    return terms, r, f


def concat_postings(parts: Sequence[Part], width: int, block: int = 1 << 21) -> tuple[np.ndarray, ...]:
    """One CSC of `width` terms from parts stacked row-wise in order: each part's rows renumbered
    (`renumber[row]`, -1 = dropped) when given, then shifted by its offset. Works a block of postings
    at a time, so the temporary arrays stay small whatever the size of the parts."""
    counts = np.zeros(width, dtype=np.int64)
    for part in parts:
        indptr, renumber = part[0], part[3]
        if renumber is None:
            counts[: len(indptr) - 1] += np.diff(indptr)
            continue
        for t0, t1 in _term_blocks(indptr, block):
            counts[t0:t1] += np.bincount(_block(part, t0, t1)[0] - t0, minlength=t1 - t0)
    out_ptr = np.zeros(width + 1, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    rows = np.empty(int(out_ptr[-1]), dtype=np.int32)
    tf = np.empty(len(rows), dtype=np.result_type(*(p[2].dtype for p in parts)) if parts else np.uint8)
    fill = out_ptr[:-1].copy()
    for part in parts:
        for t0, t1 in _term_blocks(part[0], block):
            terms, r, f = _block(part, t0, t1)
            kc = np.bincount(terms - t0, minlength=t1 - t0)
            first = np.zeros(t1 - t0, dtype=np.int64)
            np.cumsum(kc[:-1], out=first[1:])
            dest = fill[terms] + (np.arange(len(r)) - first[terms - t0])
            rows[dest] = r + part[4]
            tf[dest] = f
            fill[t0:t1] += kc
    return out_ptr, rows, tf


@dataclass(frozen=True)
class Snapshot:
    """What one search reads: segments with their alive rows, and the live corpus statistics."""

    segments: tuple[Segment, ...]
    alive: tuple[np.ndarray, ...]
    docs: int
    total_length: float


class LexicalIndex:
    def __init__(
        self, chunks: Iterable[StoredChunk] = (), *, max_segments: int = 8, records_dir: Path | None = None
    ) -> None:
        started = time.perf_counter()
        self.max_segments = max_segments
        self.records_dir = records_dir
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

    def nbytes(self) -> int:
        """Bytes of the arrays the current snapshot holds (postings, lengths, id hashes, record offsets, alive)."""
        snap = self._snap
        return sum(s.nbytes() for s in snap.segments) + sum(a.nbytes for a in snap.alive)

    # -- writers ----------------------------------------------------------------------

    def _postings(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, rows, tf, lengths) of `texts`; tokenized outside the lock, the vocabulary grown under it."""
        tok = bm25s.tokenize(texts, stopwords="en", return_ids=True, show_progress=False)
        words = sorted(tok.vocab.items(), key=lambda kv: kv[1])  # type: ignore[union-attr]
        lengths = np.fromiter((len(d) for d in tok.ids), dtype=np.int64, count=len(texts))  # type: ignore[union-attr]
        flat = np.fromiter(itertools.chain.from_iterable(tok.ids), dtype=np.int64, count=int(lengths.sum()))  # type: ignore[union-attr]
        stems = [s_stem(w) for w, _ in words]
        with self._write:
            local = np.fromiter((self._vocab.setdefault(s, len(self._vocab)) for s in stems), np.int64, len(stems))
            width = len(self._vocab)
        n = len(texts)
        keys, tf = np.unique(local[flat] * n + np.repeat(np.arange(n), lengths), return_counts=True)
        indptr = np.zeros(width + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // n, minlength=width), out=indptr[1:])
        return indptr, (keys % n).astype(np.int32), counts_array(tf), lengths

    def _build(self, chunks: Iterator[StoredChunk]) -> tuple[Segment, np.ndarray] | None:
        """One segment from `chunks`, tokenized a batch at a time into compact arrays, and its alive rows
        (of an id given twice only the last row lives)."""
        records = Records(self.records_dir)
        parts: list[Part] = []
        lengths, keys = [], []
        rows = 0
        while True:
            batch = list(itertools.islice(chunks, BUILD_BATCH))
            if not batch:
                break
            indptr, prow, ptf, plen = self._postings([c.text for c in batch])
            parts.append((indptr, prow, ptf, None, rows))
            lengths.append(plen.astype(np.float32))
            keys.append(id_keys([c.id for c in batch]))
            records.append(batch)
            rows += len(batch)
            del batch  # before the next batch is read: one batch of chunk objects alive at a time
        if not rows:
            records.close()
            return None
        indptr, prow, ptf = concat_postings(parts, max(len(p[0]) - 1 for p in parts))
        del parts
        seg = Segment(indptr, prow, ptf, np.concatenate(lengths), np.concatenate(keys), records.seal())
        alive = np.ones(len(seg), dtype=bool)
        same = np.flatnonzero(seg.keys[1:] == seg.keys[:-1])
        if len(same):  # an id given twice, or (checked on the records) two ids of one hash
            last: dict[str, int] = {}
            for r in sorted({int(seg.key_rows[p]) for p in (*same.tolist(), *(same + 1).tolist())}):
                cid = seg.records.get(r).id
                if cid in last:
                    alive[last[cid]] = False
                last[cid] = r
        return seg, alive

    def add(self, chunks: Iterable[StoredChunk]) -> None:
        """Index `chunks`; one whose id is already indexed replaces the old row (new text or metadata).
        A list is taken whole; any other iterable is read a batch at a time (the store's chunks at start)."""
        ids: list[str] | None = None
        if isinstance(chunks, (list, tuple)):
            new = list({c.id: c for c in chunks}.values())
            ids = [c.id for c in new]
            chunks = new
        built = self._build(iter(chunks))  # outside the lock: the slow part
        if built is None:
            return
        seg, alive = built
        with self._write:
            snap = self._snap
            if snap.segments:
                if ids is None:
                    ids = [seg.records.get(r).id for r in range(len(seg))]
                snap = self._kill(snap, ids)
            self._publish(
                Snapshot(
                    (*snap.segments, seg),
                    (*snap.alive, alive),
                    snap.docs + int(alive.sum()),
                    snap.total_length + float(seg.lengths[alive].sum()),
                )
            )
            self.tokenized += len(seg)
        self._maybe_merge()

    def remove(self, ids: Iterable[str]) -> None:
        with self._write:
            self._publish(self._kill(self._snap, list(dict.fromkeys(ids))))

    def _kill(self, snap: Snapshot, ids: list[str]) -> Snapshot:
        if not ids or not snap.segments:
            return snap
        keys = id_keys(ids)
        alive = list(snap.alive)
        docs, total = snap.docs, snap.total_length
        for i, seg in enumerate(snap.segments):
            if not len(seg):
                continue
            pos = np.minimum(np.searchsorted(seg.keys, keys), len(seg.keys) - 1)
            hit = seg.keys[pos] == keys  # O(ids x log rows): an addition does not scan the segment
            if not hit.any():
                continue
            found = seg.locate([x for x, h in zip(ids, hit.tolist(), strict=True) if h], keys[hit], alive[i])
            rows = [f[0] for f in found if f is not None]
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
            records = Records(self.records_dir)
            parts: list[Part] = []
            lengths, keys, taken = [], [], []
            rows = 0
            for i in pick:
                seg, keep = snap.segments[i], np.flatnonzero(snap.alive[i])
                renumber = np.full(len(seg), -1, dtype=np.int32)
                renumber[keep] = np.arange(len(keep), dtype=np.int32)
                parts.append((seg.indptr, seg.rows, seg.tf, renumber, rows))
                lengths.append(seg.lengths[keep])
                key_of_row = np.empty(len(seg), dtype=np.uint64)
                key_of_row[seg.key_rows] = seg.keys
                keys.append(key_of_row[keep])
                seg.records.copy_rows(keep, records)
                taken.append((seg, keep))
                rows += len(keep)
            indptr, prow, ptf = concat_postings(parts, max(len(p[0]) - 1 for p in parts))
            del parts
            merged = Segment(indptr, prow, ptf, np.concatenate(lengths), np.concatenate(keys), records.seal())
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
        want = list(dict.fromkeys(ids))
        out: dict[str, StoredChunk] = {}
        if not want:
            return out
        keys = id_keys(want)
        for seg, alive in zip(snap.segments, snap.alive, strict=True):
            todo = [i for i, x in enumerate(want) if x not in out]
            if not todo:
                break
            for found in seg.locate([want[i] for i in todo], keys[todo], alive):
                if found is not None:
                    out[found[1].id] = found[1]
        return {x: out[x] for x in want if x in out}

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
                tf32 = tf.astype(np.float32)
                norm = K1 * ((1 - B) + B * seg.lengths[rows] / np.float32(avgdl))
                s[rows] += idf * tf32 / (tf32 + norm)
        flat = np.concatenate(scores)
        starts = np.cumsum([0, *(len(seg) for seg in snap.segments)])
        nonzero = np.flatnonzero(flat > 0)
        if not filters and len(nonzero) > n:
            nonzero = nonzero[np.argpartition(-flat[nonzero], n - 1)[:n]]
        hits: list[LexicalHit] = []
        for g in nonzero[np.argsort(-flat[nonzero], kind="stable")]:
            i = int(np.searchsorted(starts, g, side="right")) - 1
            chunk = snap.segments[i].records.get(int(g - starts[i]))
            if filters and not all(chunk.metadata.get(k) == v for k, v in filters.items()):
                continue
            hits.append(LexicalHit(chunk, float(flat[g])))
            if len(hits) >= n:
                break
        return hits
