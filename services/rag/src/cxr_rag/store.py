"""One small interface over ChromaDB: embedded `PersistentClient` or `HttpClient` to a server.

The collection records the embedding model and dimension in its metadata; opening it with a
different model is a `StoreMismatchError`, never silently mixed vectors. Embeddings are
always computed by us (no Chroma embedding function), so the store never downloads a model.

Backups are logical snapshots through the client API (works for both modes and while the
service is serving): every record with its embedding, a manifest with counts and checksums;
the export is repeated if the collection changed while it was read (its ids before and after
differ: re-ingesting a document also deletes records), so the snapshot is consistent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cxr_rag.chunking import Chunk
from cxr_rag.config import RagConfig
from cxr_serving.errors import (
    CheckpointError,
    DependencyTimeoutError,
    DependencyUnavailableError,
    InvalidInputError,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
BACKUP_FORMAT = "cxr-rag-backup/1"


class StoreMismatchError(CheckpointError):
    """The collection was built with another embedding model (or dimension)."""

    reason = "COLLECTION_EMBEDDING_MISMATCH"


@dataclass(frozen=True)
class StoredChunk:
    id: str
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class DenseHit:
    id: str
    text: str
    metadata: dict[str, str]
    similarity: float  # cosine similarity, higher is better


def _chroma_settings() -> Any:
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    from chromadb.config import Settings as ChromaSettings

    return ChromaSettings(anonymized_telemetry=False, allow_reset=False)


def _client(cfg: RagConfig) -> tuple[Any, str, str]:
    import chromadb

    if cfg.vector_db_host:
        headers = {"Authorization": f"Bearer {cfg.vector_db_auth_token}"} if cfg.vector_db_auth_token else None
        where = f"{'https' if cfg.vector_db_ssl else 'http'}://{cfg.vector_db_host}:{cfg.vector_db_port}"
        try:
            client = chromadb.HttpClient(
                host=cfg.vector_db_host,
                port=cfg.vector_db_port,
                ssl=cfg.vector_db_ssl,
                headers=headers,
                settings=_chroma_settings(),
            )
            client.heartbeat()
        except Exception as exc:
            raise DependencyUnavailableError(
                f"Chroma server at {where} is unreachable: {exc}", reason="VECTOR_DB_UNAVAILABLE"
            ) from exc
        return client, "http", where
    path = Path(cfg.vector_db_path)
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=_chroma_settings()), "embedded", str(path.resolve())


class _GuardedCollection:
    """A Chroma server collection whose transport failures are `DependencyUnavailableError`
    (UNAVAILABLE) or `DependencyTimeoutError` (DEADLINE_EXCEEDED) naming the server, not INTERNAL."""

    def __init__(self, collection: Any, where: str) -> None:
        self._col = collection
        self._where = where

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._col, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            import httpx

            try:
                return attr(*args, **kwargs)
            except httpx.TimeoutException as exc:
                raise DependencyTimeoutError(
                    f"Chroma server at {self._where} timed out: {exc}", reason="VECTOR_DB_TIMEOUT"
                ) from exc
            except (httpx.TransportError, ConnectionError) as exc:
                raise DependencyUnavailableError(
                    f"Chroma server at {self._where} is unreachable: {exc}", reason="VECTOR_DB_UNAVAILABLE"
                ) from exc

        return call


class Page(NamedTuple):
    """One page of `VectorStore.iter_all`: the embeddings are read only when asked for."""

    ids: list[str]
    documents: list[str | None]
    metadatas: list[dict[str, str]]
    embeddings: Any | None


def _str_meta(meta: dict[str, Any] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else str(v) for k, v in (meta or {}).items()}


def where_clause(filters: dict[str, str] | None) -> dict[str, Any] | None:
    """Exact-match metadata filters as a Chroma `where`."""
    if not filters:
        return None
    items = [{k: v} for k, v in sorted(filters.items())]
    return items[0] if len(items) == 1 else {"$and": items}


def hnsw_settings(collection: Any) -> dict[str, Any]:
    """The HNSW configuration Chroma holds for the collection (space, max_neighbors, ef_construction, ef_search)."""
    return dict((collection.configuration or {}).get("hnsw") or {})


def _apply_search_beam(collection: Any, ef_search: int, wanted: dict[str, Any]) -> None:
    """Set ef_search on a collection made earlier with another; say so when its fixed build settings differ."""
    have = hnsw_settings(collection)
    if have.get("ef_search") != ef_search:
        collection.modify(configuration={"hnsw": {"ef_search": ef_search}})
    fixed = {k: (have.get(k), wanted[k]) for k in ("space", "max_neighbors", "ef_construction")}
    differ = {k: v for k, v in fixed.items() if v[0] != v[1]}
    if differ:
        log.warning(
            "collection '%s' was created with HNSW %s (configured: %s); these are fixed at creation, "
            "re-ingest into a new collection to change them",
            collection.name,
            {k: v[0] for k, v in differ.items()},
            {k: v[1] for k, v in differ.items()},
        )


class VectorStore:
    def __init__(self, client: Any, collection: Any, mode: str, location: str, embedding_model: str, dim: int) -> None:
        self._client = client
        self._col = collection
        self.mode = mode
        self.location = location
        self.embedding_model = embedding_model
        self.dimension = dim
        # records per write that Chroma accepts (SQLite's variable limit embedded, the server's own over HTTP)
        self.max_batch_size = int(client.get_max_batch_size())

    @classmethod
    def open(cls, cfg: RagConfig, embedding_model: str, dimension: int) -> VectorStore:
        client, mode, location = _client(cfg)
        wanted = {"embedding_model": embedding_model, "embedding_dim": dimension, "cxr_schema": SCHEMA_VERSION}
        hnsw = {
            "space": "cosine",
            "max_neighbors": cfg.hnsw.m,
            "ef_construction": cfg.hnsw.ef_construction,
            "ef_search": cfg.hnsw.ef_search,
        }
        col = client.get_or_create_collection(
            cfg.collection, embedding_function=None, metadata=wanted, configuration={"hnsw": hnsw}
        )
        have = dict(col.metadata or {})
        if have.get("embedding_model") != embedding_model or int(have.get("embedding_dim", -1)) != dimension:
            raise StoreMismatchError(
                f"collection '{cfg.collection}' at {location} holds vectors of embedding model "
                f"'{have.get('embedding_model', '<unknown>')}' (dim {have.get('embedding_dim', '?')}), but the "
                f"service is configured with '{embedding_model}' (dim {dimension}); use another "
                "models.rag.collection or re-ingest into a fresh store",
                metadata={"collection": cfg.collection},
            )
        _apply_search_beam(col, cfg.hnsw.ef_search, hnsw)
        log.info("vector store: %s collection '%s' at %s (%d chunks)", mode, cfg.collection, location, col.count())
        if mode == "http":
            col = _GuardedCollection(col, location)
        return cls(client, col, mode, location, embedding_model, dimension)

    @property
    def collection_name(self) -> str:
        return str(self._col.name)

    def count(self) -> int:
        return int(self._col.count())

    def marker(self, key: str) -> str | None:
        """A bookkeeping value kept in the collection's metadata (e.g. a completed start-up ingestion)."""
        value = (self._col.metadata or {}).get(key)
        return None if value is None else str(value)

    def set_marker(self, key: str, value: str) -> None:
        # hnsw:* keys must not be sent again (Chroma refuses to "change" the distance function)
        keep = {k: v for k, v in (self._col.metadata or {}).items() if not k.startswith("hnsw:")}
        self._col.modify(metadata={**keep, key: value})

    def existing_metadata(self, ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """The stored metadata of those of `ids` that are in the store."""
        if not ids:
            return {}
        res = self._col.get(ids=list(ids), include=["metadatas"])
        return {i: _str_meta(m) for i, m in zip(res["ids"], res["metadatas"], strict=True)}

    def update_metadata(self, chunks: Sequence[Chunk]) -> None:
        """New metadata for stored chunks (same id, so the same text and embedding)."""
        for s in range(0, len(chunks), self.max_batch_size):
            part = chunks[s : s + self.max_batch_size]
            self._col.update(ids=[c.id for c in part], metadatas=[c.metadata for c in part])

    def document_chunk_ids(self, doc_ids: Sequence[str], batch: int = 256) -> set[str]:
        """Ids of every stored chunk of these documents (metadata `doc_id`)."""
        out: set[str] = set()
        keys = sorted(set(doc_ids))
        for s in range(0, len(keys), batch):
            part = keys[s : s + batch]
            where = {"doc_id": part[0]} if len(part) == 1 else {"doc_id": {"$in": part}}
            out.update(self._col.get(where=where, include=[])["ids"])
        return out

    def delete(self, ids: Sequence[str], batch: int = 1000) -> None:
        for s in range(0, len(ids), batch):
            self._col.delete(ids=list(ids[s : s + batch]))

    def all_ids(self) -> set[str]:
        return set(self._col.get(include=[])["ids"])

    def upsert(self, chunks: Sequence[Chunk], embeddings: np.ndarray) -> None:
        """Written in slices of at most `max_batch_size` records: Chroma refuses a larger write."""
        vecs = np.asarray(embeddings, dtype=np.float32)
        for s in range(0, len(chunks), self.max_batch_size):
            part = chunks[s : s + self.max_batch_size]
            self._col.upsert(
                ids=[c.id for c in part],
                embeddings=vecs[s : s + len(part)],
                documents=[c.text for c in part],
                metadatas=[c.metadata for c in part],
            )

    def nearest(self, embedding: np.ndarray, n: int, filters: dict[str, str] | None = None) -> list[tuple[str, float]]:
        """(id, cosine similarity) of the `n` nearest chunks, without their text or metadata: reading those from
        SQLite is most of a query's cost, and the retriever holds them in memory (the BM25 index)."""
        res = self._col.query(
            query_embeddings=[np.asarray(embedding, dtype=np.float32)],
            n_results=n,
            where=where_clause(filters),
            include=["distances"],
        )
        return [(i, 1.0 - float(dist)) for i, dist in zip(res["ids"][0], res["distances"][0], strict=True)]

    def chunks(self, ids: Sequence[str]) -> dict[str, StoredChunk]:
        """The stored text and metadata of those of `ids` that are in the store."""
        if not ids:
            return {}
        res = self._col.get(ids=list(ids), include=["documents", "metadatas"])
        return {
            i: StoredChunk(i, d or "", _str_meta(m))
            for i, d, m in zip(res["ids"], res["documents"], res["metadatas"], strict=True)
        }

    def query(self, embedding: np.ndarray, n: int, filters: dict[str, str] | None = None) -> list[DenseHit]:
        if n <= 0:
            return []
        res = self._col.query(
            query_embeddings=[np.asarray(embedding, dtype=np.float32)],
            n_results=n,
            where=where_clause(filters),
            include=["documents", "metadatas", "distances"],
        )
        return [
            DenseHit(id=i, text=d or "", metadata=_str_meta(m), similarity=1.0 - float(dist))
            for i, d, m, dist in zip(
                res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True
            )
        ]

    def iter_all(self, page: int = 1000, embeddings: bool = False) -> Iterator[Page]:
        include = ["documents", "metadatas", *(["embeddings"] if embeddings else [])]
        offset = 0
        while True:
            res = self._col.get(limit=page, offset=offset, include=include)
            ids = res["ids"]
            if not ids:
                return
            yield Page(
                ids,
                res["documents"],
                [_str_meta(m) for m in res["metadatas"]],
                res["embeddings"] if embeddings else None,
            )
            offset += len(ids)

    def iter_chunks(self, page: int = 5000) -> Iterator[StoredChunk]:
        """Every stored chunk, read a page at a time (the BM25 index is built from this stream)."""
        for ids, docs, metas, _ in self.iter_all(page):
            yield from (StoredChunk(i, d or "", m) for i, d, m in zip(ids, docs, metas, strict=True))

    def all_chunks(self) -> list[StoredChunk]:
        return list(self.iter_chunks())

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "location": self.location,
            "collection": self.collection_name,
            "embedding_model": self.embedding_model,
            "embedding_dim": self.dimension,
            "chunks": self.count(),
            "hnsw": self.hnsw(),
            "max_batch_size": self.max_batch_size,
        }

    def hnsw(self) -> dict[str, Any]:
        return hnsw_settings(self._col)

    # -- backup / restore -------------------------------------------------------------

    def backup(self, dest: Path, attempts: int = 5) -> dict[str, Any]:
        """Write a consistent snapshot to the new directory `dest` (written beside it, then renamed)."""
        dest = Path(dest)
        if dest.exists():
            raise InvalidInputError(f"backup destination {dest} already exists")
        for attempt in range(1, attempts + 1):
            before = self.all_ids()
            ids: list[str] = []
            docs: list[str] = []
            metas: list[dict[str, str]] = []
            vecs: list[np.ndarray] = []
            for page in self.iter_all(embeddings=True):
                ids += page.ids
                docs += [x or "" for x in page.documents]
                metas += page.metadatas
                vecs.append(np.asarray(page.embeddings, dtype=np.float32))
            if self.all_ids() == before == set(ids) and len(ids) == len(before):
                break
            log.warning("collection changed during backup (attempt %d/%d), reading again", attempt, attempts)
            time.sleep(0.2 * attempt)
        else:
            raise DependencyUnavailableError("collection kept changing during backup; retry when ingestion is idle")
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        matrix = np.concatenate(vecs) if vecs else np.zeros((0, self.dimension), np.float32)
        np.save(tmp / "embeddings.npy", matrix)
        with (tmp / "records.jsonl").open("w", encoding="utf-8") as f:
            for i, d, m in zip(ids, docs, metas, strict=True):
                f.write(json.dumps({"id": i, "text": d, "metadata": m}, ensure_ascii=False) + "\n")
        manifest = {
            "format": BACKUP_FORMAT,
            "collection": self.collection_name,
            "embedding_model": self.embedding_model,
            "embedding_dim": self.dimension,
            "count": len(ids),
            "created_unix": time.time(),
            "sha256": {name: _sha256(tmp / name) for name in ("embeddings.npy", "records.jsonl")},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        tmp.rename(dest)
        log.info("backup of %d chunks written to %s", len(ids), dest)
        return manifest

    def restore(self, src: Path, batch: int = 500) -> dict[str, Any]:
        """Load a snapshot made by `backup` (verified by checksum) into this collection (upserts)."""
        src = Path(src)
        try:
            manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{src}: not a cxr-rag backup ({exc})") from None
        if manifest.get("format") != BACKUP_FORMAT:
            raise InvalidInputError(f"{src}: unknown backup format {manifest.get('format')!r}")
        for name, digest in manifest["sha256"].items():
            if _sha256(src / name) != digest:
                raise InvalidInputError(f"{src}/{name}: checksum mismatch, the backup is corrupt")
        if manifest["embedding_model"] != self.embedding_model or manifest["embedding_dim"] != self.dimension:
            raise StoreMismatchError(
                f"backup {src} holds vectors of '{manifest['embedding_model']}' (dim {manifest['embedding_dim']}), "
                f"this store uses '{self.embedding_model}' (dim {self.dimension})"
            )
        matrix = np.load(src / "embeddings.npy")
        with (src / "records.jsonl").open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        if len(records) != manifest["count"] or matrix.shape[0] != len(records):
            raise InvalidInputError(f"{src}: record count does not match the manifest")
        for s in range(0, len(records), batch):
            part = records[s : s + batch]
            self.upsert([Chunk(r["id"], r["text"], r["metadata"]) for r in part], matrix[s : s + batch])
        log.info("restored %d chunks from %s into '%s'", len(records), src, self.collection_name)
        return {**manifest, "restored": len(records), "count_after": self.count()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
