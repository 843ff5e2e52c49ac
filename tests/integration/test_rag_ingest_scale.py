"""Ingestion at scale on real components: the OpenVINO / ONNX Runtime embedder checked against torch at load
(and torch serving when an export is damaged), Chroma's max batch size, stale chunks of re-ingested
documents across write windows, and `cxr-rag ingest` killed and run again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_rag.chunking import Chunk, Document
from cxr_rag.config import EmbeddingRuntimeConfig
from cxr_rag.embedding_runtime import MODEL_LABEL
from cxr_rag.embeddings import Embedder, default_model_path, get_embedder, load_tokenizer
from cxr_rag.ingest import Ingestor, read_documents
from cxr_rag.store import VectorStore
from cxr_serving.metrics import RUNTIME_FALLBACK
from cxr_serving.runtimes.backends import openvino_cpu_capabilities
from tests.support.paths import REPO
from tests.support.rag import rag_cfg, subset_corpus

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CACHE = REPO / "var" / "cache" / "test-rag-embedder"  # shared by the tests and runs: an export is made once


def fast_runtime() -> EmbeddingRuntimeConfig:
    """The default fast path (OpenVINO bfloat16) where this CPU has native BF16, else OpenVINO float32."""
    precision = "bfloat16" if "BF16" in openvino_cpu_capabilities() else "float32"
    return EmbeddingRuntimeConfig(backend="openvino", precision=precision, cache_dir=CACHE)


def chunk_texts(n: int) -> list[str]:
    docs = read_documents(subset_corpus(), limit=n)
    return [d.text for d in docs]


def fallback_gauge() -> float:
    return float(RUNTIME_FALLBACK.labels(MODEL_LABEL)._value.get())


def test_fast_embedder_agrees_with_torch_and_reuses_its_export():
    rt = fast_runtime()
    fast = Embedder(default_model_path(), "cpu", rt)
    assert (fast.backend, fast.precision) == ("openvino", rt.precision), fast.runtime_note
    assert fast.check is not None and fast.check.numbers["min_cosine"] >= 0.99
    assert fallback_gauge() == 0
    texts = chunk_texts(60)  # real passages, not the held check texts
    got = fast.encode(texts, batch_size=16)
    ref = get_embedder(default_model_path()).encode(texts)
    assert got.shape == ref.shape and float((got * ref).sum(axis=1).min()) >= 0.99
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    query = get_embedder(default_model_path(), "cpu", "query", rt)
    ingest = get_embedder(default_model_path(), "cpu", "ingest", rt)  # the same export, loaded once
    assert ingest is not query and ingest._encode_lock is not query._encode_lock and ingest._fast is not query._fast
    assert (ingest.backend, ingest.cache_path) == (query.backend, query.cache_path)
    assert float((ingest.encode(texts[:8]) * ref[:8]).sum(axis=1).min()) >= 0.99
    again = Embedder(default_model_path(), "cpu", rt)
    assert not again.exported and again.cache_path == fast.cache_path  # the cache, keyed by the model files' digest
    assert fast.cache_path is not None and fast.cache_path.parent.parent == CACHE


def test_ingest_role_runs_batches_side_by_side_and_each_chunk_gets_its_own_vector():
    rt = fast_runtime()
    query = get_embedder(default_model_path(), "cpu", "query", rt)
    ingest = get_embedder(default_model_path(), "cpu", "ingest", rt)
    assert (query.hint, ingest.hint) == ("latency", "throughput")  # queries stay on the latency-compiled export
    assert ingest.status()["hint"] == "throughput" and ingest.cache_path == query.cache_path
    # lengths from a question to a 256-token paragraph, in an order unlike the length order the batches use
    texts = chunk_texts(40)
    texts = [t[: 40 + 97 * i % len(t)] for i, t in enumerate(texts)] + ["Pneumothorax?"]
    got = ingest.encode(texts, batch_size=4)  # about 11 batches in one call, several in flight at once
    one_by_one = np.concatenate([query.encode([t]) for t in texts])
    cos = got @ one_by_one.T
    assert float(np.diag(cos).min()) >= 0.999  # each row is its own text's vector
    assert (cos.argmax(axis=1) == np.arange(len(texts))).all()


def test_a_window_is_embedded_in_one_call_and_each_chunk_stored_with_its_own_vector(tmp_path):
    store = VectorStore.open(rag_cfg(tmp_path / "db"), MODEL, 384)
    emb = TimedEmbedder(get_embedder(default_model_path(), "cpu", "ingest", fast_runtime()))
    ing = Ingestor(store, emb, load_tokenizer(default_model_path()), 200, 40, batch_size=4, write_batch=48)  # type: ignore[arg-type]
    docs = list(read_documents(subset_corpus(), limit=60))
    stats = ing.ingest(docs, progress=False)
    sizes = [len(t) for t in emb.per_call]
    # one call per window (not per 4 x batch_size chunks), so the embedder sorts the whole window by length
    assert max(sizes) > 4 * 4 and max(sizes) <= 48 and sum(sizes) == stats.chunks_added == store.count()
    stored = store._col.get(include=["embeddings", "documents"])
    query = get_embedder(default_model_path(), "cpu", "query", fast_runtime())
    own = np.concatenate([query.encode([d]) for d in stored["documents"]])
    assert float((np.asarray(stored["embeddings"]) * own).sum(axis=1).min()) >= 0.999


def test_damaged_export_fails_the_check_and_torch_serves(tmp_path):
    import onnx
    from onnx import numpy_helper

    rt = EmbeddingRuntimeConfig(backend="onnxruntime", precision="float32", cache_dir=tmp_path / "cache")
    good = Embedder(default_model_path(), "cpu", rt)
    assert good.backend == "onnxruntime" and good.exported, good.runtime_note
    assert good.cache_path is not None
    path = good.cache_path / "model.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:  # a corrupted artefact: every weight matrix perturbed
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(w + rng.normal(0, 0.05, w.shape).astype(np.float32), init.name))
    onnx.save(model, str(path))
    damaged = Embedder(default_model_path(), "cpu", rt)
    assert damaged.backend == "torch" and not damaged.exported
    assert "failed the agreement check against torch" in damaged.runtime_note
    assert damaged.check is not None and damaged.check.numbers["min_cosine"] < 0.99
    assert fallback_gauge() == 1
    texts = chunk_texts(8)
    ref = get_embedder(default_model_path()).encode(texts)
    assert float((damaged.encode(texts) * ref).sum(axis=1).min()) > 0.9999  # torch itself serves


def test_upsert_respects_chromas_max_batch_size(tmp_path):
    store = VectorStore.open(rag_cfg(tmp_path / "db"), MODEL, 384)
    limit = store.max_batch_size
    assert limit == store._client.get_max_batch_size() and limit > 0
    n = limit + 7
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(n, 384)).astype(np.float32)
    chunks = [Chunk(f"c{i}", f"text {i}", {"doc_id": f"d{i}"}) for i in range(n)]
    with pytest.raises(Exception, match="greater than max batch size"):  # what one write of them all does
        store._col.upsert(ids=[c.id for c in chunks], embeddings=vecs, documents=[c.text for c in chunks])
    store.upsert(chunks, vecs)
    assert store.count() == n


class SpyStore(VectorStore):
    """The real store, counting stale-chunk lookups."""

    lookups = 0

    def document_chunk_ids(self, doc_ids, batch=256):
        SpyStore.lookups += 1
        return super().document_chunk_ids(doc_ids, batch)


def test_reingest_replaces_stale_chunks_window_by_window(tmp_path):
    base = VectorStore.open(rag_cfg(tmp_path / "db"), MODEL, 384)
    store = SpyStore(base._client, base._col, base.mode, base.location, MODEL, 384)
    emb = get_embedder(default_model_path())
    ing = Ingestor(store, emb, load_tokenizer(default_model_path()), 200, 40, batch_size=8, write_batch=4)
    docs = list(read_documents(subset_corpus(), limit=16))
    SpyStore.lookups = 0
    first = ing.ingest(docs, progress=False)
    assert SpyStore.lookups == 0  # an empty store has nothing stale
    old = {d.key: store.document_chunk_ids([d.key]) for d in docs}
    changed = {docs[1].key, docs[13].key}  # in the first and the last write window
    # and a document id given twice, in different windows: its two texts add up, neither replaces the other
    extra = Document(key=docs[2].key, text="Kerley B lines suggest interstitial edema.", title="", source="x")
    again = [
        Document(d.key, f"Replaced text {i}: pleural plaques after asbestos exposure.", d.title, d.source, d.metadata)
        if d.key in changed
        else d
        for i, d in enumerate(docs)
    ] + [extra]
    second = ing.ingest(again, progress=False)
    assert SpyStore.lookups >= 4  # one per window
    assert second.chunks_removed == sum(len(old[k]) for k in changed)
    assert second.chunks_added == len(changed) + 1
    for key in changed:
        stored = store.document_chunk_ids([key])
        assert len(stored) == 1 and not stored & old[key]
    assert (
        store.document_chunk_ids([docs[2].key]) >= old[docs[2].key]
        and len(store.document_chunk_ids([docs[2].key])) == len(old[docs[2].key]) + 1
    )
    assert store.count() == first.chunks_added - second.chunks_removed + second.chunks_added


def _cli(config: Path, corpus: Path, limit: int) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CXR_CONFIG_PATH", None)
    cmd = [sys.executable, "-m", "cxr_rag.cli", "--config", str(config), "ingest", str(corpus), "--limit", str(limit)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_ingest_killed_then_rerun_embeds_only_the_rest(tmp_path):
    limit = 400  # the whole subset: about 300 passages, 320 chunks
    runtime = fast_runtime().model_dump(mode="json")
    rag = {"vector_db_path": str(tmp_path / "db"), "embedding_runtime": runtime, "ingest_window": 128}  # 3 windows
    cfg = {"models": {"rag": rag}}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg))
    proc = _cli(config, subset_corpus(), limit)
    done = {"chunks": 0}
    tail: list[str] = []

    def watch() -> None:  # the progress bar on stderr: "ingest:  25%|..| 100/400 [.., new_chunks=128 ..]"
        assert proc.stderr is not None
        buf = ""
        while (ch := proc.stderr.read(1)) != "":
            buf = (buf + ch)[-400:]
            for m in re.finditer(r"new_chunks=(\d+)", buf):
                done["chunks"] = int(m.group(1))
        tail.append(buf)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    deadline = time.monotonic() + 400
    while done["chunks"] < 100 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"ingest ended before it could be killed: {tail}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    interrupted = VectorStore.open(rag_cfg(tmp_path / "db"), MODEL, 384)
    stored = interrupted.count()
    del interrupted
    assert 100 <= stored < 400

    rerun = _cli(config, subset_corpus(), limit)
    out, err = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, err[-3000:]
    stats = json.loads(out)
    assert stats["embedder"]["backend"] == "openvino", stats["embedder"]
    docs = list(read_documents(subset_corpus(), limit=limit))
    ing = Ingestor(None, None, load_tokenizer(default_model_path()), 200, 40)  # type: ignore[arg-type]
    distinct = len(ing.chunk(docs)[2])
    assert stats["chunks_skipped"] == stored  # what the killed run wrote is not embedded again
    assert stats["chunks_added"] == distinct - stored
    assert stats["chunks_total"] == distinct  # and nothing is stored twice
    assert f"{len(docs)}/{len(docs)}" in err and "new_chunks=" in err  # the progress bar, in documents


class TimedStore(VectorStore):
    """The real store, recording when each upsert ran. With `hold_for` set, an upsert waits (5 s at most)
    until that embedder has begun another encode, until one such wait succeeds or three have timed out: a
    pipelined writer then overlaps an embed (a producer blocked on the full queue during one wait can encode
    during the next; an encode already running when a wait begins overlaps that upsert too), and a serialised
    writer times out three times and overlaps none."""

    def __init__(self, *args, hold_for: TimedEmbedder | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.upserts: list[tuple[float, float]] = []
        self.hold_for = hold_for
        self._holds_left = 3

    def upsert(self, chunks, embeddings):
        t = time.perf_counter()
        if self.hold_for is not None and self._holds_left > 0:
            met = self.hold_for.wait_for_call(after=self.hold_for.begun, timeout=5.0)
            self._holds_left = 0 if met else self._holds_left - 1
        super().upsert(chunks, embeddings)
        self.upserts.append((t, time.perf_counter()))


class TimedEmbedder:
    """The real embedder, recording when each encode ran and every text it embedded."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.calls: list[tuple[float, float]] = []
        self.texts: list[str] = []
        self.per_call: list[list[str]] = []
        self.dimension = embedder.dimension
        self.begun = 0
        self._cond = threading.Condition()

    def wait_for_call(self, after: int, timeout: float) -> bool:
        """Wait until more than `after` encodes have begun."""
        with self._cond:
            return self._cond.wait_for(lambda: self.begun > after, timeout)

    def encode(self, texts, batch_size=32):
        t = time.perf_counter()
        with self._cond:
            self.begun += 1
            self._cond.notify_all()
        out = self.embedder.encode(texts, batch_size)
        self.calls.append((t, time.perf_counter()))
        self.texts += texts
        self.per_call.append(list(texts))
        return out


def _timed_ingestor(tmp_path: Path, write_queue: int, hold: bool = False) -> tuple[Ingestor, TimedStore, TimedEmbedder]:
    base = VectorStore.open(rag_cfg(tmp_path / f"db{write_queue}"), MODEL, 384)
    emb = TimedEmbedder(get_embedder(default_model_path()))
    store = TimedStore(base._client, base._col, base.mode, base.location, MODEL, 384, hold_for=emb if hold else None)
    tok = load_tokenizer(default_model_path())
    return Ingestor(store, emb, tok, 200, 40, batch_size=2, write_batch=1, write_queue=write_queue), store, emb  # type: ignore[arg-type]


def _overlapping(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> int:
    return sum(1 for s, e in a for s2, e2 in b if s < e2 and s2 < e)


def test_ingest_embeds_the_next_chunks_while_the_last_are_written(tmp_path):
    docs = list(read_documents(subset_corpus(), limit=12))
    piped, store, emb = _timed_ingestor(tmp_path, write_queue=2, hold=True)
    stats = piped.ingest(docs, progress=False)
    assert stats.chunks_added == store.count() == len(emb.texts) and len(store.upserts) >= 10
    assert _overlapping(store.upserts, emb.calls) >= 1  # some write ran while the next chunks embedded
    inline, store0, emb0 = _timed_ingestor(tmp_path, write_queue=0)  # no hold: inline, it would only time out
    assert inline.ingest(docs, progress=False).chunks_added == stats.chunks_added
    assert _overlapping(store0.upserts, emb0.calls) == 0  # write_queue 0: in turn
    assert set(store0.all_ids()) == set(store.all_ids())


def test_a_chunk_queued_for_writing_is_neither_embedded_nor_counted_twice(tmp_path):
    docs = list(read_documents(subset_corpus(), limit=10))
    twice = [d for doc in docs for d in (doc, doc)]  # every document again in the very next window
    ing, store, emb = _timed_ingestor(tmp_path, write_queue=4)
    stats = ing.ingest(twice, progress=False)
    distinct = len(ing.chunk(docs)[2])
    assert len(emb.texts) == stats.chunks_added == distinct == store.count()
    assert stats.chunks_skipped == distinct and stats.chunks_updated == 0


def test_a_failed_write_stops_the_ingestion_with_its_error(tmp_path):
    class BrokenStore(TimedStore):
        def upsert(self, chunks, embeddings):
            if self.upserts:
                raise RuntimeError("disk full")
            super().upsert(chunks, embeddings)

    ing, store, emb = _timed_ingestor(tmp_path, write_queue=2)
    ing.store = BrokenStore(store._client, store._col, store.mode, store.location, MODEL, 384)
    docs = list(read_documents(subset_corpus(), limit=40))
    with pytest.raises(RuntimeError, match="disk full"):
        ing.ingest(docs, progress=False)
    assert len(emb.texts) < len(ing.chunk(docs)[2])  # it stopped embedding, not only writing
