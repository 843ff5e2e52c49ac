"""Ingestion: JSONL / text / Markdown / PDF -> token chunks -> embeddings -> upserts.

Idempotent and resumable: chunk ids are content hashes, ids already in the store are
skipped *before* embedding, and every batch is written as soon as it is embedded (by a writer
thread, in order, while the next batch embeds), so an interrupted run loses at most the few
batches in flight and the next run continues where it stopped.
Documents are read, chunked and written in windows of `write_batch` chunks, so memory does
not grow with the corpus; a window's new chunks are embedded in one call, so the embedder sorts them all
by length (a batch pads little) and a throughput-compiled export runs several of its batches at once.
A document id ingested again replaces its old text: once a window's new chunks are written, the
stored chunks of its document ids that this run has not produced are deleted (an interrupted run
deletes them on the next). Into a store that was empty at the start no stale chunk can exist, and
that lookup is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxr_rag.chunking import Chunk, Document, chunk_document, content_hash
from cxr_rag.embeddings import Embedder
from cxr_rag.lexical import LexicalIndex
from cxr_rag.store import StoredChunk, VectorStore
from cxr_serving.errors import InvalidInputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | JSONL_SUFFIXES | PDF_SUFFIXES
WRITE_BATCH = 1024  # chunks per window, sorted by length as one: the larger, the less its batches pad
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass
class IngestStats:
    documents: int = 0
    chunks_added: int = 0
    chunks_skipped: int = 0
    chunks_removed: int = 0  # stale chunks of re-ingested document ids
    chunks_updated: int = 0  # stored chunks whose text is unchanged but whose metadata (title, place) is new
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "chunks_added": self.chunks_added,
            "chunks_skipped": self.chunks_skipped,
            "chunks_removed": self.chunks_removed,
            "chunks_updated": self.chunks_updated,
            "seconds": round(self.seconds, 2),
        }


def _meta_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "; ".join(str(x) for x in v)
    return "" if v is None else str(v)


def jsonl_documents(path: Path, limit: int | None = None) -> Iterator[Document]:
    """Records like ../shared/data/pubmedqa/corpus.jsonl: id, text, title, anything else is metadata."""
    with path.open(encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            text = rec.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"{path}:{lineno}: record has no 'text'")
            key = str(rec.get("id") or content_hash(text))
            meta = {k: _meta_value(v) for k, v in rec.items() if k not in ("id", "text", "title", "source")}
            pmid = meta.get("pmid")
            source = str(rec.get("source") or (f"PMID:{pmid}" if pmid else path.name))
            yield Document(key=key, text=text, title=str(rec.get("title") or ""), source=source, metadata=meta)
            n += 1
            if limit is not None and n >= limit:
                return


def markdown_documents(path: Path) -> Iterator[Document]:
    """One document per heading section; the heading becomes `section`, the first H1 the title."""
    text = path.read_text(encoding="utf-8", errors="replace")
    heads = list(_HEADING.finditer(text))
    title = next((m.group(2) for m in heads if m.group(1) == "#"), path.stem)
    spans = [("", 0, heads[0].start() if heads else len(text))]
    spans += [
        (m.group(2), m.end(), heads[i + 1].start() if i + 1 < len(heads) else len(text)) for i, m in enumerate(heads)
    ]
    for section, start, end in spans:
        body = text[start:end].strip()
        if body:
            yield Document(
                key=f"{path.name}#{section or 'preamble'}",
                text=body,
                title=title,
                source=str(path),
                metadata={"section": section, "format": "markdown"},
            )


def text_documents(path: Path) -> Iterator[Document]:
    body = path.read_text(encoding="utf-8", errors="replace")
    if body.strip():
        yield Document(key=path.name, text=body, title=path.stem, source=str(path), metadata={"format": "text"})


def pdf_documents(path: Path) -> Iterator[Document]:
    """One document per page (pypdf text extraction); `page` is 1-based."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        meta_title = reader.metadata.title if reader.metadata and reader.metadata.title else None
        title = str(meta_title or path.stem)
        for i, page in enumerate(reader.pages, 1):
            body = page.extract_text() or ""
            if body.strip():
                yield Document(
                    key=f"{path.name}#page={i}",
                    text=body,
                    title=title,
                    source=str(path),
                    metadata={"page": str(i), "pages": str(len(reader.pages)), "format": "pdf"},
                )
    except PdfReadError as exc:
        raise InvalidInputError(f"{path}: cannot read PDF ({exc})") from None


def read_documents(path: Path, limit: int | None = None) -> Iterator[Document]:
    """Documents from a file or (recursively, sorted) a directory of supported files."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in SUPPORTED):
            yield from read_documents(p)
        return
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from jsonl_documents(path, limit)
    elif suffix in MARKDOWN_SUFFIXES:
        yield from markdown_documents(path)
    elif suffix in TEXT_SUFFIXES:
        yield from text_documents(path)
    elif suffix in PDF_SUFFIXES:
        yield from pdf_documents(path)
    else:
        raise InvalidInputError(f"{path}: unsupported file type (use {', '.join(sorted(SUPPORTED))})")


def count_documents(path: Path, limit: int | None = None) -> int | None:
    """Records of a JSONL file (the progress bar's total); None for other inputs."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() in JSONL_SUFFIXES):
        return None
    with path.open("rb") as f:
        n = sum(1 for line in f if line.strip())
    return n if limit is None else min(n, limit)


class Ingestor:
    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        tokenizer: Any,
        chunk_tokens: int,
        overlap_tokens: int,
        batch_size: int = 32,
        write_batch: int = WRITE_BATCH,
        index: LexicalIndex | None = None,
        write_queue: int = 2,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.batch_size = batch_size
        self.write_batch = write_batch
        self.index = index  # the live BM25 index, given each change right after the store has it
        self.write_queue = write_queue  # steps embedded ahead of the writer thread; 0: write inline, in turn

    def chunk(self, documents: Iterable[Document]) -> tuple[int, set[str], list[Chunk]]:
        """How many documents, their ids, and every distinct chunk (documents sharing an id add up)."""
        n_docs, keys = 0, set()
        chunks, seen = [], set()
        for doc in documents:
            n_docs += 1
            keys.add(doc.key)
            for c in chunk_document(doc, self.tokenizer, self.chunk_tokens, self.overlap_tokens):
                if c.id not in seen:
                    seen.add(c.id)
                    chunks.append(c)
        return n_docs, keys, chunks

    def windows(self, documents: Iterable[Document]) -> Iterator[tuple[int, set[str], list[Chunk]]]:
        """`chunk` over consecutive groups of whole documents of about `write_batch` chunks each."""
        group: list[Document] = []
        pending = 0
        for doc in documents:
            group.append(doc)
            pending += max(1, len(doc.text) // 800)  # a cheap size estimate; chunking happens per group
            if pending >= self.write_batch:
                yield self.chunk(group)
                group, pending = [], 0
        if group:
            yield self.chunk(group)

    def _index_add(self, chunks: list[Chunk]) -> None:
        if self.index is not None and chunks:
            self.index.add(StoredChunk(c.id, c.text, c.metadata) for c in chunks)

    def _remove_stale(self, keys: set[str], produced: set[str]) -> int:
        stale = sorted(self.store.document_chunk_ids(sorted(keys)) - produced)
        self.store.delete(stale)
        if self.index is not None:
            self.index.remove(stale)
        return len(stale)

    def _produce(self, documents: Iterable[Document], stats: IngestStats, writer: _Writer) -> None:
        """Chunk, look up and embed window after window; every store and index change goes to `writer` in order."""
        fresh = self.store.count() == 0  # nothing stored: nothing can be stale, no stale-chunk lookup per window
        for n_docs, keys, chunks in self.windows(documents):
            stats.documents += n_docs
            # a chunk still queued for writing is not in the store yet: it counts as present, never embedded twice
            queued = writer.queued_metadata([c.id for c in chunks])
            present = {**self.store.existing_metadata([c.id for c in chunks if c.id not in queued]), **queued}
            new = [c for c in chunks if c.id not in present]
            # the same text under a re-ingested id: keep the embedding, refresh its place and title
            changed = [c for c in chunks if c.id in present and present[c.id] != c.metadata]
            stats.chunks_skipped += len(chunks) - len(new)
            writer.put(_Write(changed=changed, skipped=len(chunks) - len(new)))
            step = max(1, math.ceil(len(new) / max(1, math.ceil(len(new) / self.write_batch))))  # equal parts
            for b in range(0, len(new), step):
                sub = new[b : b + step]
                writer.put(_Write(chunks=sub, vectors=self.embedder.encode([c.text for c in sub], self.batch_size)))
            writer.put(_Write(window_keys=None if fresh else keys, window_ids=[c.id for c in chunks], documents=n_docs))

    def ingest(
        self, documents: Iterable[Document], *, progress: bool = True, total_documents: int | None = None
    ) -> IngestStats:
        started = time.perf_counter()
        stats = IngestStats()
        # documents done of the total when it is known (JSONL), else chunks; the postfix counts chunks either way
        unit = "doc" if total_documents else "chunk"
        bar = tqdm(total=total_documents, desc="ingest", unit=unit, disable=not progress, mininterval=1.0)
        writer = _Writer(self, stats, bar, counting_chunks=not total_documents, depth=self.write_queue)
        try:
            self._produce(documents, stats, writer)
        finally:
            try:
                writer.finish()
            finally:
                bar.close()
        stats.seconds = time.perf_counter() - started
        log.info(
            "ingested %d documents: %d chunks added, %d already present, %d stale removed (%.1fs)",
            stats.documents,
            stats.chunks_added,
            stats.chunks_skipped,
            stats.chunks_removed,
            stats.seconds,
        )
        return stats


@dataclass
class _Write:
    """One step for the writer, applied in order: new metadata of stored chunks, new chunks with their
    vectors, or (`window_ids` set) the end of a window, whose documents' stale chunks are then removed."""

    changed: list[Chunk] = field(default_factory=list)
    skipped: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    vectors: np.ndarray | None = None
    window_ids: list[str] | None = None
    window_keys: set[str] | None = None  # None: nothing can be stale (the store was empty at the start)
    documents: int = 0


class _Writer:
    """Applies an ingestion's store and BM25 changes in a thread of its own, in order, while the next chunks
    embed; at most `depth` steps wait (memory stays bounded; 0: each step is applied inline, in turn).

    A step is applied only after every earlier one, so an interrupted run has written a prefix and the
    next run resumes after it. Chunks queued but not yet written are reported by `queued_metadata`, so
    a later window neither embeds nor counts them again."""

    def __init__(self, ingestor: Ingestor, stats: IngestStats, bar: Any, counting_chunks: bool, depth: int) -> None:
        self._ing = ingestor
        self._stats = stats
        self._bar = bar
        self._counting_chunks = counting_chunks
        self._produced: set[str] = set()  # chunk ids of this run, so a document id spread over windows adds up
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[dict[str, str], int]] = {}  # id -> (metadata, steps still queued)
        self._error: BaseException | None = None
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="rag-ingest-writer", daemon=True)
            self._thread.start()

    def queued_metadata(self, ids: list[str]) -> dict[str, dict[str, str]]:
        with self._lock:
            return {i: self._queued[i][0] for i in ids if i in self._queued}

    def put(self, step: _Write) -> None:
        if self._thread is None:
            self._apply(step)
            return
        with self._lock:
            for c in (*step.changed, *step.chunks):
                self._queued[c.id] = (c.metadata, self._queued.get(c.id, ({}, 0))[1] + 1)
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(step, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every queued step is written; raise the writer's error if it failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (step := self._queue.get()) is not None:
            if self._error is None:  # after a failure, drain without writing, so put() never blocks
                try:
                    self._apply(step)
                except BaseException as exc:
                    self._error = exc
            with self._lock:
                for c in (*step.changed, *step.chunks):
                    meta, n = self._queued[c.id]
                    if n > 1:
                        self._queued[c.id] = (meta, n - 1)
                    else:
                        del self._queued[c.id]

    def _apply(self, step: _Write) -> None:
        ing, stats, bar = self._ing, self._stats, self._bar
        if step.changed:
            ing.store.update_metadata(step.changed)
            ing._index_add(step.changed)
            stats.chunks_updated += len(step.changed)
        if step.chunks and step.vectors is not None:
            ing.store.upsert(step.chunks, step.vectors)
            ing._index_add(step.chunks)
            stats.chunks_added += len(step.chunks)
        if self._counting_chunks:
            bar.update(step.skipped + len(step.chunks))
        if step.window_ids is not None:
            if step.window_keys is not None:
                self._produced.update(step.window_ids)
                stats.chunks_removed += ing._remove_stale(step.window_keys, self._produced)
            if not self._counting_chunks:
                bar.update(step.documents)
            bar.set_postfix_str(f"new_chunks={stats.chunks_added} skipped={stats.chunks_skipped}", refresh=False)
