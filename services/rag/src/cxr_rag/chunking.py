"""Token-window chunking with overlap, on the embedding model's own tokenizer.

Windows are cut at token boundaries and mapped back to character offsets, so a chunk's text
is an exact slice of the source (no detokenisation artefacts). Chunk ids are content hashes
of (document key, chunk text): re-ingesting the same document yields the same ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One unit of ingestion (a JSONL record, a file, a PDF page, a Markdown section)."""

    key: str  # stable document id: given id, else a content hash
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    metadata: dict[str, str]


def content_hash(*parts: str, length: int = 32) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:length]


def token_windows(text: str, tokenizer: Any, chunk_tokens: int, overlap: int) -> list[str]:
    """Split `text` into windows of at most `chunk_tokens` tokens, consecutive windows sharing `overlap`."""
    text = text.strip()
    if not text:
        return []
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    if len(offsets) <= chunk_tokens:
        return [text]
    step = chunk_tokens - overlap
    out = []
    start = 0
    while start < len(offsets):
        end = min(start + chunk_tokens, len(offsets))
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            out.append(piece)
        if end == len(offsets):
            break
        start += step
    return out


def chunk_document(doc: Document, tokenizer: Any, chunk_tokens: int, overlap: int) -> list[Chunk]:
    windows = token_windows(doc.text, tokenizer, chunk_tokens, overlap)
    chunks = []
    for i, piece in enumerate(windows):
        meta = {
            **doc.metadata,
            "doc_id": doc.key,
            "title": doc.title,
            "source": doc.source,
            "chunk": str(i),
            "chunks": str(len(windows)),
        }
        chunks.append(Chunk(id=content_hash(doc.key, piece), text=piece, metadata=meta))
    return chunks
