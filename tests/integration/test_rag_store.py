"""Store and ingestion on real embedded ChromaDB: idempotency, resumption, file formats,
embedding-model mismatch, backup/restore, filters, the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cxr_rag import cli
from cxr_rag.chunking import Document, chunk_document
from cxr_rag.embeddings import default_model_path, get_embedder, load_tokenizer
from cxr_rag.ingest import Ingestor, read_documents
from cxr_rag.lexical import LexicalIndex
from cxr_rag.retrieval import Mode, Retriever, rrf_fuse
from cxr_rag.runtime import RagRuntime
from cxr_rag.store import StoreMismatchError, VectorStore
from cxr_serving.errors import InvalidInputError
from tests.support.paths import PUBMEDQA
from tests.support.rag import rag_cfg, shared_store, subset_corpus


@pytest.fixture(scope="module")
def store() -> VectorStore:
    d = shared_store()
    emb = get_embedder(default_model_path())
    return VectorStore.open(rag_cfg(d), "sentence-transformers/all-MiniLM-L6-v2", emb.dimension)


def ingestor(store: VectorStore, embedder=None, **kw) -> Ingestor:
    return Ingestor(
        store, embedder or get_embedder(default_model_path()), load_tokenizer(default_model_path()), 200, 40, **kw
    )


def test_embedder_is_loaded_once_per_process():
    assert get_embedder(default_model_path()) is get_embedder(default_model_path())


def test_subset_ingested_with_metadata(store):
    n_passages = len(subset_corpus().read_text().splitlines())
    assert store.count() >= n_passages  # a few long passages make two chunks
    chunk = next(c for c in store.all_chunks() if c.metadata.get("doc_id") == "10135926-0")
    assert chunk.metadata["pmid"] == "10135926" and chunk.metadata["section"] == "INTRODUCTION"
    assert chunk.metadata["source"] == "PMID:10135926" and chunk.metadata["year"] == "1994"
    assert "Intubation, Intratracheal" in chunk.metadata["meshes"]


def test_reingest_adds_nothing(store):
    before = store.count()
    stats = ingestor(store).ingest(read_documents(subset_corpus()), progress=False)
    assert stats.chunks_added == 0 and stats.chunks_skipped >= before - 5
    assert store.count() == before


class CountingEmbedder:
    """The real embedder, interrupted after `fail_after` calls (like a crash or Ctrl-C)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.inner = get_embedder(default_model_path())
        self.dimension = self.inner.dimension
        self.fail_after = fail_after
        self.texts = 0
        self.calls = 0

    def encode(self, texts, batch_size=32):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.texts += len(texts)
        return self.inner.encode(texts, batch_size)


def test_ingestion_resumes_after_interruption(tmp_path):
    docs = list(read_documents(subset_corpus(), limit=24))
    st = VectorStore.open(rag_cfg(tmp_path / "db"), "sentence-transformers/all-MiniLM-L6-v2", 384)
    crashing = CountingEmbedder(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        ingestor(st, crashing, batch_size=4, write_batch=8).ingest(docs, progress=False)
    done = st.count()
    assert done == 2 * 8 or done == crashing.texts  # two batches were written before the crash
    resumed = CountingEmbedder()
    stats = ingestor(st, resumed, batch_size=4, write_batch=8).ingest(docs, progress=False)
    assert stats.chunks_skipped == done and stats.chunks_added == st.count() - done
    assert resumed.texts == stats.chunks_added  # nothing embedded twice


def _minimal_pdf(pages: list[str]) -> bytes:
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        content_id = len(objs)
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
            "/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"
        )
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_text_markdown_and_pdf(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(
        "# Pleural effusion guide\n\nIntro text about effusions.\n\n## Imaging\n\nBlunting of the "
        "costophrenic angle on chest radiographs.\n\n## Treatment\n\nThoracentesis drains fluid.\n"
    )
    (docs / "note.txt").write_text("Pneumothorax is air in the pleural space.")
    (docs / "paper.pdf").write_bytes(_minimal_pdf(["Cardiomegaly enlarges the heart shadow", "Page two on edema"]))
    (docs / "ignored.bin").write_bytes(b"\x00")
    found = list(read_documents(docs))
    by_key = {d.key: d for d in found}
    assert set(by_key) == {
        "guide.md#preamble",
        "guide.md#Pleural effusion guide",
        "guide.md#Imaging",
        "guide.md#Treatment",
        "note.txt",
        "paper.pdf#page=1",
        "paper.pdf#page=2",
    } - {"guide.md#preamble"}
    assert by_key["guide.md#Imaging"].metadata["section"] == "Imaging"
    assert by_key["guide.md#Imaging"].title == "Pleural effusion guide"
    assert by_key["paper.pdf#page=2"].metadata["page"] == "2"
    assert "Cardiomegaly" in by_key["paper.pdf#page=1"].text
    st = VectorStore.open(rag_cfg(tmp_path / "db"), "sentence-transformers/all-MiniLM-L6-v2", 384)
    stats = ingestor(st).ingest(found, progress=False)
    assert stats.chunks_added == 6
    r = Retriever(st, get_embedder(default_model_path()), candidates=10)
    r.rebuild_index()
    top = r.search("enlarged heart silhouette", 1, Mode.HYBRID).passages[0]
    assert top.metadata["page"] == "1" and top.source.endswith("paper.pdf")
    with pytest.raises(InvalidInputError, match="unsupported file type"):
        list(read_documents(docs / "ignored.bin"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2: record has no 'text'"):
        list(read_documents(bad))


def test_embedding_model_mismatch_is_a_clear_error(store):
    with pytest.raises(StoreMismatchError, match=r"embedding model 'sentence-transformers/all-MiniLM-L6-v2'.*'other'"):
        VectorStore.open(rag_cfg(Path(store.location)), "other", 384)
    with pytest.raises(StoreMismatchError, match="dim 768"):
        VectorStore.open(rag_cfg(Path(store.location)), "sentence-transformers/all-MiniLM-L6-v2", 768)


def test_backup_restore_round_trip(store, tmp_path):
    manifest = store.backup(tmp_path / "snap")
    assert manifest["count"] == store.count()
    with pytest.raises(InvalidInputError, match="already exists"):
        store.backup(tmp_path / "snap")
    fresh = VectorStore.open(rag_cfg(tmp_path / "restored"), store.embedding_model, store.dimension)
    result = fresh.restore(tmp_path / "snap")
    assert result["count_after"] == store.count()

    def dump(s: VectorStore):
        rows = {}
        for ids, docs, metas, embs in s.iter_all(embeddings=True):
            for i, d, m, e in zip(ids, docs, metas, embs, strict=True):
                rows[i] = (d, m, np.asarray(e))
        return rows

    a, b = dump(store), dump(fresh)
    assert a.keys() == b.keys()
    some = next(iter(a))
    assert a[some][:2] == b[some][:2] and np.allclose(a[some][2], b[some][2])
    # restoring twice is idempotent
    assert fresh.restore(tmp_path / "snap")["count_after"] == store.count()
    # a corrupted snapshot is refused
    rec = tmp_path / "snap" / "records.jsonl"
    rec.write_text(rec.read_text().replace("the", "teh", 1))
    with pytest.raises(InvalidInputError, match="checksum mismatch"):
        fresh.restore(tmp_path / "snap")


def test_metadata_filters(store):
    r = Retriever(store, get_embedder(default_model_path()), candidates=20)
    r.rebuild_index()
    for mode in Mode:
        res = r.search("outcome of surgery", 5, mode, {"section": "RESULTS"})
        assert res.passages and all(p.metadata["section"] == "RESULTS" for p in res.passages), mode
        none = r.search("outcome of surgery", 5, mode, {"section": "NO-SUCH-SECTION"})
        assert none.passages == [], mode


def test_cli_ingest_stats_backup_restore(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"models": {"rag": {"vector_db_path": str(tmp_path / "db")}}}))
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\nAtelectasis is a collapse of lung tissue.\n")
    monkeypatch.delenv("CXR_CONFIG_PATH", raising=False)

    def run(*argv: str) -> dict:
        capsys.readouterr()
        assert cli.main(["--config", str(cfg), "-q", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    assert run("ingest", str(doc))["chunks_added"] == 1
    assert run("ingest", str(doc))["chunks_skipped"] == 1
    stats = run("stats")
    assert stats["chunks"] == 1 and stats["mode"] == "embedded"
    assert run("backup", str(tmp_path / "bak"))["count"] == 1
    cfg.write_text(json.dumps({"models": {"rag": {"vector_db_path": str(tmp_path / "db2")}}}))
    assert run("restore", str(tmp_path / "bak"))["count_after"] == 1
    assert cli.main(["--config", str(cfg), "-q", "ingest", str(tmp_path / "missing.md")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_runtime_startup_ingestion_completes_once_and_resumes_after_interruption(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(subset_corpus().read_text().splitlines()[:5]) + "\n")
    cfg = rag_cfg(tmp_path / "db", documents_path=str(corpus))
    # an interrupted first start: two of the five passages stored, no completion marker
    partial = VectorStore.open(cfg, cfg.embedding_name, 384)
    ingestor(partial).ingest(list(read_documents(corpus))[:2], progress=False)
    rt = RagRuntime(cfg)
    rt.open(progress=False)
    assert rt.ready and rt.last_ingest is not None
    assert (rt.last_ingest.chunks_skipped, rt.last_ingest.chunks_added) == (2, 3)  # resumed
    rt2 = RagRuntime(cfg)
    rt2.open(progress=False)
    assert rt2.last_ingest is None  # completed before: the documents are not read again
    assert rt2.store is not None and rt2.store.count() == 5


PHRASE = "quokka tracheostomy xylograph"  # three words found in no PubMedQA passage, only in text A


def test_reingesting_a_document_id_replaces_its_old_chunks(tmp_path):
    """Document X with a long text A (many chunks), then X again with a short text B: A's chunks are
    gone from the store, from BM25 and from every search mode; X has exactly B's chunks."""
    passages = [json.loads(line) for line in subset_corpus().read_text().splitlines()[:60]]
    others = [Document(key=p["id"], text=p["text"], source="pubmedqa") for p in passages[:20]]
    body = [p["text"] for p in passages[20:]]
    text_a = " ".join([*body[:20], f"The {PHRASE} finding was reported.", *body[20:]])
    text_b = "Atelectasis is a partial collapse of the lung."
    tokenizer = load_tokenizer(default_model_path())
    rt = RagRuntime(rag_cfg(tmp_path / "db"))
    rt.open(progress=False)
    assert rt.store is not None and rt.retriever is not None
    rt.ingest(others, progress=False)

    first = rt.ingest([Document(key="X", text=text_a, title="A", source="a")], progress=False)
    a_chunks = {c.id for c in chunk_document(Document(key="X", text=text_a), tokenizer, 200, 40)}
    assert first.chunks_added == len(a_chunks) >= 10
    top = rt.retriever.search(PHRASE, 5, Mode.LEXICAL).passages
    assert top and top[0].metadata["doc_id"] == "X" and PHRASE in top[0].text  # findable before

    second = rt.ingest([Document(key="X", text=text_b, title="B", source="b")], progress=False)
    b_chunks = [c.id for c in chunk_document(Document(key="X", text=text_b), tokenizer, 200, 40)]

    stored_x = [c for c in rt.store.all_chunks() if c.metadata.get("doc_id") == "X"]
    assert [c.id for c in stored_x] == b_chunks and stored_x[0].metadata["title"] == "B"
    assert rt.store.count() == len(others) + len(b_chunks)
    everything = rt.store.count()
    for mode in Mode:
        for k in (5, everything):  # the top hits, and the whole store
            hits = rt.retriever.search(PHRASE, k, mode).passages
            assert not [p.id for p in hits if p.id in a_chunks], (mode, k)
            assert not [p for p in hits if PHRASE in p.text], (mode, k)
            x_hits = {p.id for p in hits if p.metadata.get("doc_id") == "X"}
            assert x_hits <= set(b_chunks), (mode, k)  # dense ranks every chunk; B's is the only one of X
            if mode is Mode.LEXICAL:
                assert not x_hits  # B has none of the phrase's words
    assert len(b_chunks) == 1 and second.chunks_added == 1 and second.chunks_removed == len(a_chunks)


def test_reingesting_the_same_chunk_text_refreshes_its_metadata(tmp_path):
    """Text B equal to A's first chunk keeps that chunk (same id, not embedded again) but it now says
    it is chunk 0 of 1 of title B, not chunk 0 of A's many."""
    passages = [json.loads(line) for line in subset_corpus().read_text().splitlines()[:12]]
    text_a = " ".join(p["text"] for p in passages)
    tokenizer = load_tokenizer(default_model_path())
    a = chunk_document(Document(key="Y", text=text_a, title="A"), tokenizer, 200, 40)
    assert len(a) >= 3
    st = VectorStore.open(rag_cfg(tmp_path / "db"), "sentence-transformers/all-MiniLM-L6-v2", 384)
    ingestor(st).ingest([Document(key="Y", text=text_a, title="A")], progress=False)
    stats = ingestor(st).ingest([Document(key="Y", text=a[0].text, title="B")], progress=False)
    (only,) = st.all_chunks()
    assert only.id == a[0].id and only.metadata["chunks"] == "1" and only.metadata["title"] == "B"
    assert (stats.chunks_added, stats.chunks_skipped, stats.chunks_removed) == (0, 1, len(a) - 1)


def test_reingesting_identical_text_with_a_new_title_refreshes_the_lexical_index(tmp_path):
    """Document Z re-ingested with the same text (same chunk id: nothing added or removed) but title B:
    lexical and hybrid hits for Z say title B, and a filter on the old title A finds nothing in any mode."""
    passages = [json.loads(line) for line in subset_corpus().read_text().splitlines()[:20]]
    others = [Document(key=p["id"], text=p["text"], source="pubmedqa") for p in passages[:19]]
    text = f"The {PHRASE} finding was reported."
    rt = RagRuntime(rag_cfg(tmp_path / "db"))
    rt.open(progress=False)
    assert rt.store is not None and rt.retriever is not None
    rt.ingest(others, progress=False)
    rt.ingest([Document(key="Z", text=text, title="A")], progress=False)
    before = rt.retriever.search(PHRASE, 5, Mode.LEXICAL).passages
    assert before and before[0].metadata["doc_id"] == "Z" and before[0].title == "A"

    again = rt.ingest([Document(key="Z", text=text, title="B")], progress=False)
    assert (again.chunks_added, again.chunks_removed, again.chunks_updated) == (0, 0, 1)
    (stored,) = [c for c in rt.store.all_chunks() if c.metadata.get("doc_id") == "Z"]
    assert stored.metadata["title"] == "B"
    for mode in (Mode.LEXICAL, Mode.HYBRID):
        z_hits = [p for p in rt.retriever.search(PHRASE, 5, mode).passages if p.metadata.get("doc_id") == "Z"]
        assert [p.title for p in z_hits] == ["B"], mode
        assert [p.id for p in rt.retriever.search(PHRASE, 5, mode, {"title": "B"}).passages] == [stored.id], mode
    for mode in Mode:
        assert rt.retriever.search(PHRASE, 5, mode, {"title": "A"}).passages == [], mode


class RecordingIndex(LexicalIndex):
    """The real BM25 index, recording the thread each search runs on."""

    def __init__(self, chunks):
        super().__init__(chunks)
        self.threads: list[int] = []

    def search(self, query, n, filters=None):
        self.threads.append(threading.get_ident())
        return super().search(query, n, filters)


class RecordingCollection:
    """The real Chroma collection, recording each call's name and `include`."""

    def __init__(self, col):
        self.col = col
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __getattr__(self, name):
        attr = getattr(self.col, name)

        def call(*args, **kwargs):
            self.calls.append((name, tuple(kwargs.get("include") or ())))
            return attr(*args, **kwargs)

        return call


QUESTIONS = [json.loads(line)["question"] for line in (PUBMEDQA / "questions.jsonl").read_text().splitlines()[:12]]


def _as_tuples(passages):
    return [(p.id, p.text, p.metadata, p.score, p.dense_rank, p.lexical_rank, p.similarity) for p in passages]


def _retriever(store, index, concurrent_sides):
    r = Retriever(store, get_embedder(default_model_path()), 50, 60, concurrent_sides=concurrent_sides)
    r._index = index
    return r


def test_hybrid_runs_bm25_beside_the_dense_side_with_the_sequential_results(store):
    index = RecordingIndex(store.all_chunks())
    both, seq = _retriever(store, index, True), _retriever(store, index, False)
    for i, q in enumerate(QUESTIONS):
        filters = {"year": "1994"} if i % 4 == 3 else None
        got = both.search(q, 10, Mode.HYBRID, filters)
        want = seq.search(q, 10, Mode.HYBRID, filters)
        assert got.passages and _as_tuples(got.passages) == _as_tuples(want.passages)
        fused = rrf_fuse([seq.dense(q, 50, filters), seq.lexical(q, 50, filters)], 10, 60)
        assert _as_tuples(got.passages) == _as_tuples(fused) and got.best_similarity == want.best_similarity
        assert set(got.timings_ms) == {"dense_ms", "lexical_ms"}
    me = threading.get_ident()
    assert index.threads[0::3] and me not in index.threads[0::3]  # concurrent: on the pool
    assert set(index.threads[1::3]) == set(index.threads[2::3]) == {me}  # sequential: in the caller


def test_dense_hits_take_text_and_metadata_from_the_index_not_the_store(store):
    base = VectorStore.open(rag_cfg(shared_store()), "sentence-transformers/all-MiniLM-L6-v2", 384)
    spy = RecordingCollection(base._col)
    base._col = spy
    emb = get_embedder(default_model_path())
    q = QUESTIONS[0]
    want = [(h.id, h.text, h.metadata, h.similarity) for h in base.query(emb.encode([q])[0], 50)]
    chunks = base.all_chunks()
    full = _retriever(base, LexicalIndex(chunks), True)
    spy.calls.clear()
    for q2 in QUESTIONS:
        full.search(q2, 5)
    assert all(name == "query" and include == ("distances",) for name, include in spy.calls), spy.calls
    assert [(p.id, p.text, p.metadata, p.similarity) for p in full.dense(q, 50, None)] == want
    # a hit the index does not hold (yet) is read from the store
    partial = _retriever(base, LexicalIndex([c for c in chunks if c.id != want[0][0]]), True)
    spy.calls.clear()
    assert [(p.id, p.text, p.metadata, p.similarity) for p in partial.dense(q, 50, None)] == want
    assert [name for name, _ in spy.calls] == ["query", "get"]
