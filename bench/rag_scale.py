"""RAG at literature scale: corpus, ingestion, query latency (embedded and Chroma server), quality, RSS.

    make bench-rag_scale                                   # 200,000 passages (~20 min with a fast embedder)
    BENCH_ARGS="--passages 1000000" make bench-rag_scale   # the documented longer run
    BENCH_ARGS="--passages 20000" make bench-rag_scale     # development size

One run, in order (every step reuses what an earlier run left under var/data/rag_scale/):
1. corpus: bench/rag_corpus.py writes N passages (the 800 questions' gold passages + distractors);
2. ingest: a `chroma run` server process on loopback, filled through `ingest_corpus` (the one swappable
   ingestion function: `--ingest module:function`); resumable, chunks already stored are skipped;
3. server latency: hybrid search p50/p99 at concurrency 1 and 8 against that server; its RSS;
4. the server stops; a fresh process opens the same directory embedded (as the rag service does by
   default), builds the BM25 index, and measures: hybrid/dense/lexical latency at concurrency 1 and 8,
   ANN recall of the HNSW index against exact search, quality of the 800 questions (recall@5, MRR per
   method; RRF tuned on one half of the questions, reported on the other), and its VmRSS/VmHWM.
Latency budgets are compared with the measured values side by side in the JSON, never as a bare
pass/fail; the host is 2 shared cores, so the load average is recorded at start and end.
Writes bench/results/rag_scale.json (N = 200,000) or rag_scale-<N>.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from bench import rag_corpus
from bench._revision import source_revision

ROOT = Path(__file__).resolve().parent.parent
DATA = rag_corpus.DATA
WORK = ROOT / "var" / "data" / "rag_scale"
RESULTS = ROOT / "bench" / "results"
DEFAULT_N = 200_000
COLLECTION = "rag_scale"
BUDGET_MS = {"hybrid_c1_p50": 30.0, "hybrid_c1_p99": 100.0}
KS = (1, 5, 10)
RRF_GRID = {"rrf_k": (5, 10, 20, 30, 60, 100), "dense_weight": (0.3, 0.4, 0.5, 0.6, 0.7)}


# -- quality metrics ----------------------------------------------------------------------------------
def passages_of(chunk_ranking: Sequence[tuple[str, dict[str, str]]]) -> list[str]:
    """Chunks (id, metadata) in rank order -> their source passage ids (metadata doc_id), duplicates dropped."""
    out: list[str] = []
    for cid, meta in chunk_ranking:
        pid = meta.get("doc_id", cid)
        if pid not in out:
            out.append(pid)
    return out


def quality(rankings: dict[str, list[str]], qrels: dict[str, set[str]], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k (a relevant passage in the top k) and MRR (first relevant rank, 0 if none ranked) per question, mean."""
    n = len(rankings)
    if n == 0:
        raise ValueError("no questions")
    hits = dict.fromkeys(ks, 0)
    rr = 0.0
    for qid, ranked in rankings.items():
        rel = qrels[qid]
        first = next((i for i, pid in enumerate(ranked, 1) if pid in rel), None)
        for k in ks:
            hits[k] += first is not None and first <= k
        rr += 1.0 / first if first else 0.0
    return {**{f"recall@{k}": round(hits[k] / n, 4) for k in ks}, "mrr": round(rr / n, 4)}


def weighted_rrf(lists: Sequence[Sequence[str]], weights: Sequence[float], rrf_k: int) -> list[str]:
    """Weighted reciprocal-rank fusion of id rankings (weights 1, 1 = the service's `rrf_fuse`); ties: first list."""
    score: dict[str, float] = defaultdict(float)
    first_rank: dict[str, tuple[int, ...]] = {}
    for li, ranked in enumerate(lists):
        for rank, pid in enumerate(ranked, 1):
            score[pid] += weights[li] / (rrf_k + rank)
            first_rank.setdefault(pid, (li, rank))
    return sorted(score, key=lambda p: (-score[p], first_rank[p]))


def split_questions(qids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Tune / test halves by the parity of the qid (a PubMed id): fixed, and unrelated to the corpus order."""
    tune = [q for q in qids if int(q) % 2 == 0]
    return tune, [q for q in qids if int(q) % 2 == 1]


def tune_fusion(
    dense: dict[str, list[str]], lexical: dict[str, list[str]], qrels: dict[str, set[str]], default_rrf_k: int
) -> dict[str, Any]:
    """Pick (rrf_k, dense weight) by MRR on the tune half; report every method on the test half only."""
    tune, test = split_questions(sorted(dense))

    def fused(qids: list[str], k: int, w: float) -> dict[str, list[str]]:
        return {q: weighted_rrf([dense[q], lexical[q]], [2 * w, 2 * (1 - w)], k) for q in qids}

    grid = []
    for k in RRF_GRID["rrf_k"]:
        for w in RRF_GRID["dense_weight"]:
            grid.append({"rrf_k": k, "dense_weight": w, **quality(fused(tune, k, w), qrels)})
    best = max(grid, key=lambda r: (r["mrr"], r["recall@5"], -abs(r["dense_weight"] - 0.5)))
    on_test = {
        "bm25": quality({q: lexical[q] for q in test}, qrels),
        "dense": quality({q: dense[q] for q in test}, qrels),
        "hybrid_default": quality(fused(test, default_rrf_k, 0.5), qrels),
        "hybrid_tuned": quality(fused(test, best["rrf_k"], best["dense_weight"]), qrels),
    }
    better = max(on_test["bm25"]["recall@5"], on_test["dense"]["recall@5"])
    better_mrr = max(on_test["bm25"]["mrr"], on_test["dense"]["mrr"])
    return {
        "split": "tune = even qid, test = odd qid",
        "tune_questions": len(tune),
        "test_questions": len(test),
        "chosen": {"rrf_k": best["rrf_k"], "dense_weight": best["dense_weight"]},
        "grid_on_tune": grid,
        "on_test": on_test,
        "hybrid_tuned_recall@5_ge_best_single": on_test["hybrid_tuned"]["recall@5"] >= better,
        "hybrid_tuned_mrr_ge_best_single": on_test["hybrid_tuned"]["mrr"] >= better_mrr,
    }


# -- inputs -------------------------------------------------------------------------------------------
def eval_questions() -> tuple[list[dict], dict[str, set[str]]]:
    questions = [json.loads(ln) for ln in (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    qrels: dict[str, set[str]] = defaultdict(set)
    with (DATA / "qrels.tsv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["relevance"]) > 0:
                qrels[row["qid"]].add(row["passage_id"])
    return [q for q in questions if qrels.get(q["qid"])], qrels


def corpus_file(n: int, seed: int) -> Path:
    out = rag_corpus.output_path(n, seed)
    manifest = out.with_suffix(".manifest.json")
    if not (out.is_file() and manifest.is_file()):
        rag_corpus.write_corpus(n, seed, out)
    return out


def proc_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process from /proc, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def open_in_stages(rt: Any) -> dict[str, Any]:
    """`rt.open()` as the service runs it, with VmRSS/VmHWM after each stage: the growth of a stage is what that
    component holds (embedders and store; Chroma's HNSW index, which its first query loads; the BM25 index)."""
    stages: dict[str, Any] = {"before_open": proc_memory_mb()}
    t = time.perf_counter()
    rt.open(progress=False, build_index=False)
    stages["embedders_and_store_open"] = proc_memory_mb()
    rt.store.nearest(rt.embedder.encode(["warm up the embedding model"])[0], 50)
    stages["chroma_hnsw_loaded_by_first_query"] = proc_memory_mb()
    t_index = time.perf_counter()
    rt.retriever.rebuild_index()
    stages["bm25_index_built"] = proc_memory_mb()
    return {
        "memory_mb": stages,
        "bm25_build_s": round(time.perf_counter() - t_index, 1),
        "open_s": round(time.perf_counter() - t, 1),
    }


def machine(when: str) -> dict[str, Any]:
    return {f"load_average_{when}": [round(x, 2) for x in os.getloadavg()], "unix_time": round(time.time())}


def rag_cfg(store: Path, **extra: Any) -> Any:
    from cxr_rag.config import RagConfig

    return RagConfig.model_validate(
        {"vector_db_path": str(store), "documents_path": None, "collection": COLLECTION, **extra}
    )


# -- ingestion: the one swappable step -----------------------------------------------------------------
def ingest_corpus(rt: Any, corpus: Path, progress: bool) -> dict[str, Any]:
    """The service's ingestion path (RagRuntime.ingest, resumable by chunk id) over the corpus file, with the
    embedder its config chooses (models.rag.embedding_runtime), which the result names."""
    from cxr_rag.ingest import read_documents

    stats = rt.ingest(read_documents(corpus), progress=progress, rebuild=False)
    embedder = rt.ingest_embedder.status() if rt.ingest_embedder is not None else {}
    return {**stats.as_dict(), "path": "cxr_rag.runtime.RagRuntime.ingest", "embedder": embedder}


def ingest_sentence_mean(rt: Any, corpus: Path, progress: bool, write_batch: int = 2048) -> dict[str, Any]:
    """Stand-in for a host that cannot embed N chunks in time (latency runs only): gold chunks get their real
    embedding; a distractor chunk gets the normalised mean of its sentences' real embeddings, each distinct
    sentence embedded once. Text, chunk ids and BM25 are exactly those of `ingest_corpus`."""
    from tqdm import tqdm

    from cxr_rag.ingest import read_documents

    store, emb = rt.store, rt.ingest_embedder
    ing = rt.ingestor(live_index=False)
    started = time.perf_counter()
    n_docs, _, chunks = ing.chunk(read_documents(corpus))
    cache: dict[str, np.ndarray] = {}
    added = embedded_chunks = embedded_sentences = 0
    bar = tqdm(total=len(chunks), desc="ingest (sentence-mean stand-in)", unit="chunk", disable=not progress)
    for s in range(0, len(chunks), write_batch):
        part = chunks[s : s + write_batch]
        present = store.existing_metadata([c.id for c in part])
        new = [c for c in part if c.id not in present]
        real = [c for c in new if not c.metadata.get("doc_id", "").startswith("dx-")]
        recombined = [c for c in new if c.metadata.get("doc_id", "").startswith("dx-")]
        split = [rag_corpus.sentences(c.text) for c in recombined]
        missing = sorted({x for sents in split for x in sents} - cache.keys())
        if missing:
            cache.update(zip(missing, emb.encode(missing, batch_size=64), strict=True))
            embedded_sentences += len(missing)
        vecs = [np.mean([cache[x] for x in sents], axis=0) for sents in split]
        if real:
            store.upsert(real, emb.encode([c.text for c in real], batch_size=32))
            embedded_chunks += len(real)
        if recombined:
            m = np.asarray(vecs, dtype=np.float32)
            store.upsert(recombined, m / np.linalg.norm(m, axis=1, keepdims=True))
        added += len(new)
        bar.update(len(part))
    bar.close()
    return {
        "documents": n_docs,
        "chunks_added": added,
        "chunks_skipped": len(chunks) - added,
        "chunks_embedded_by_the_model": embedded_chunks,
        "sentences_embedded_for_means": embedded_sentences,
        "seconds": round(time.perf_counter() - started, 2),
        "path": "bench.rag_scale:ingest_sentence_mean (STAND-IN vectors for distractors; latency only)",
    }


def skip_ingest(rt: Any, corpus: Path, progress: bool) -> dict[str, Any]:
    """Measure the store as it is (e.g. one whose ingestion was stopped part way): nothing is added."""
    return {"documents": 0, "chunks_added": 0, "path": "bench.rag_scale:skip_ingest (the store as it was)"}


def load_ingest(spec: str | None) -> Callable[[Any, Path, bool], dict[str, Any]]:
    if not spec:
        return ingest_corpus
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


# -- latency ------------------------------------------------------------------------------------------
def _pcts(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def latency(retriever: Any, queries: list[str], mode: Any, concurrency: int, per_worker: int, budget_s: float) -> dict:
    """Searches of top 5 by `concurrency` callers back to back, each bounded by a count and a time budget."""
    deadline = time.monotonic() + budget_s
    lat: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(per_worker):
            if time.monotonic() > deadline:
                return
            q = queries[(w * per_worker + i) % len(queries)]
            t = time.perf_counter()
            res = retriever.search(q, 5, mode)
            dt = (time.perf_counter() - t) * 1000
            with lock:
                lat.append(dt)
                for k, v in res.timings_ms.items():
                    parts[k].append(v)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        **_pcts(lat),
        "queries_per_s": round(len(lat) / wall, 1),
        "parts": {k: _pcts(v) for k, v in parts.items()},
    }


def latency_suite(retriever: Any, queries: list[str], modes: Sequence[str], quick: bool) -> dict[str, Any]:
    from cxr_rag.retrieval import Mode

    per_c1, per_c8, budget = (60, 10, 60.0) if quick else (300, 40, 180.0)
    retriever.search("warm up the embedding model", 5, Mode.HYBRID)
    out: dict[str, Any] = {}
    for m in modes:
        out[f"{m}_c1"] = latency(retriever, queries, Mode(m), 1, per_c1, budget)
    out["hybrid_c8"] = latency(retriever, queries, Mode.HYBRID, 8, per_c8, budget)
    return out


# -- the Chroma server process --------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_chroma(path: Path) -> tuple[subprocess.Popen[bytes], int]:
    import urllib.request

    exe = Path(sys.executable).with_name("chroma")
    port = free_port()
    path.mkdir(parents=True, exist_ok=True)
    log = (path.parent / "chroma-server.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chroma run exited with {proc.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=2).read()
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("chroma run did not answer its heartbeat within 120 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- phases -------------------------------------------------------------------------------------------
def server_phase(store: Path, corpus: Path, ingest: Callable, queries: list[str], quick: bool) -> dict[str, Any]:
    from cxr_rag.runtime import RagRuntime

    proc, port = start_chroma(store)
    try:
        rt = RagRuntime(rag_cfg(store, vector_db_host="127.0.0.1", vector_db_port=port))
        rt.open(progress=False, build_index=False)
        assert rt.store is not None and rt.retriever is not None
        t = time.perf_counter()
        stats = ingest(rt, corpus, True)
        wall = time.perf_counter() - t
        stats["wall_seconds"] = round(wall, 1)
        stats["chunks_per_s"] = round(stats["chunks_added"] / wall, 1) if stats["chunks_added"] else None
        t = time.perf_counter()
        rt.retriever.rebuild_index()
        index_s = time.perf_counter() - t
        lat = latency_suite(rt.retriever, queries, ("hybrid",), quick)
        return {
            "ingest": stats,
            "chunks": rt.store.count(),
            "hnsw": rt.store.hnsw(),
            "bm25_index_from_server_s": round(index_s, 1),
            "latency": lat,
            "chroma_server_memory_mb": proc_memory_mb(proc.pid),
        }
    finally:
        stop(proc)


def serve_phase(store: Path, quick: bool) -> dict[str, Any]:
    """In a fresh process: what the rag service holds over the store, its latency, quality and memory."""
    from cxr_rag.runtime import RagRuntime

    questions, qrels = eval_questions()
    queries = [q["question"] for q in questions]
    start = machine("start")
    cfg = rag_cfg(store)
    rt = RagRuntime(cfg)
    opened = open_in_stages(rt)
    assert rt.store is not None and rt.retriever is not None
    lat = latency_suite(rt.retriever, queries, ("hybrid", "dense", "lexical"), quick)
    qual = quality_suite(rt, questions, qrels)
    after_queries = proc_memory_mb()  # what the service holds after serving, before the benchmark's ANN check
    return {
        "source": source_revision(),
        **start,
        "chunks": rt.store.count(),
        "hnsw": rt.store.hnsw(),
        "open_and_bm25_build_s": opened["open_s"],
        "latency": lat,
        "quality": qual,
        "ann_recall": ann_recall(rt, queries[:200]),
        "memory_mb_after_open": opened["memory_mb"]["bm25_index_built"],
        "memory_mb_by_stage": opened["memory_mb"],
        "memory_mb_after_queries": after_queries,
        "memory_mb_at_end": proc_memory_mb(),  # includes the exact-search matrix of ann_recall
    }


def quality_suite(rt: Any, questions: list[dict], qrels: dict[str, set[str]]) -> dict[str, Any]:
    """One dense and one BM25 list of `candidates` chunks per question; hybrid = the service's own `rrf_fuse`."""
    from cxr_rag.retrieval import Passage, rrf_fuse

    r = rt.retriever
    n = rt.cfg.candidates
    dense, lexical, hybrid = {}, {}, {}
    t = time.perf_counter()
    vectors = rt.embedder.encode([q["question"] for q in questions], batch_size=64)  # as Retriever.dense, batched
    for q, v in zip(questions, vectors, strict=True):
        d = [
            Passage(h.id, h.text, h.metadata, score=h.similarity, dense_rank=i, similarity=h.similarity)
            for i, h in enumerate(rt.store.query(v, n), 1)
        ]
        lx = r.lexical(q["question"], n, None)
        dense[q["qid"]] = passages_of([(p.id, p.metadata) for p in d])
        lexical[q["qid"]] = passages_of([(p.id, p.metadata) for p in lx])
        hybrid[q["qid"]] = passages_of([(p.id, p.metadata) for p in rrf_fuse([d, lx], n, rt.cfg.rrf_k)])
    all_q = {"bm25": quality(lexical, qrels), "dense": quality(dense, qrels), "hybrid": quality(hybrid, qrels)}
    return {
        "questions": len(questions),
        "candidates_per_method": n,
        "rrf_k_configured": rt.cfg.rrf_k,
        "seconds": round(time.perf_counter() - t, 1),
        "all_questions": all_q,
        "fusion_tuning": tune_fusion(dense, lexical, qrels, rt.cfg.rrf_k),
    }


def stored_vectors(rt: Any) -> tuple[list[str], list[str], np.ndarray]:
    """Every stored chunk's id, source passage id and vector, read a page at a time."""
    ids: list[str] = []
    passages: list[str] = []
    vecs = []
    for page in rt.store.iter_all(page=5000, embeddings=True):
        ids += page.ids
        passages += [m.get("doc_id", i) for i, m in zip(page.ids, page.metadatas, strict=True)]
        vecs.append(np.asarray(page.embeddings, dtype=np.float32))
    return ids, passages, np.concatenate(vecs)


def exact_top(matrix: np.ndarray, qv: np.ndarray, k: int, block: int = 100) -> list[list[int]]:
    """Row indices of the k largest inner products per query, best first and equal scores by row index (brute
    force, `block` queries at a time); all rows when there are at most k."""
    k = min(k, len(matrix))
    out: list[list[int]] = []
    for start in range(0, len(qv), block):
        scores = qv[start : start + block] @ matrix.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row_scores, row_top in zip(scores, top, strict=True):
            out.append(row_top[np.lexsort((row_top, -row_scores[row_top]))].tolist())
    return out


def ann_recall(rt: Any, queries: list[str], k: int = 50, vectors: Any = None) -> dict[str, Any]:
    """Share of the exact top-k (brute-force cosine over every stored vector) that the HNSW search returns at the
    configured ef_search (Chroma 1.5 applies a new ef_search only to an index loaded afterwards: sweep values
    in fresh processes, see bench/README.md)."""
    store = rt.store
    ids, _passages, matrix = vectors if vectors is not None else stored_vectors(rt)
    qv = rt.embedder.encode(queries, batch_size=64)
    exact = [{ids[i] for i in row} for row in exact_top(matrix, qv, k)]
    del matrix
    found, ms = [], []
    for want, v in zip(exact, qv, strict=True):
        t = time.perf_counter()
        got = {h.id for h in store.query(v, k)}
        ms.append((time.perf_counter() - t) * 1000)
        found.append(len(got & want) / k)
    return {
        "k": k,
        "queries": len(queries),
        "ef_search": store.hnsw()["ef_search"],
        "recall": round(float(np.mean(found)), 4),
        "min": round(float(np.min(found)), 4),
        "query_ms": _pcts(ms),
    }


def exact_dense_quality(rt: Any, vectors: Any, questions: list[dict], qrels: dict[str, set[str]]) -> dict[str, float]:
    """recall@k and MRR of the dense method with exact search in place of HNSW: what any ef_search could reach."""
    _ids, passages, matrix = vectors
    qv = rt.embedder.encode([q["question"] for q in questions], batch_size=64)
    rows = exact_top(matrix, qv, rt.cfg.candidates)
    ranked = {q["qid"]: list(dict.fromkeys(passages[i] for i in row)) for q, row in zip(questions, rows, strict=True)}
    return quality(ranked, qrels)


def dense_quality(rt: Any, questions: list[dict], qrels: dict[str, set[str]]) -> dict[str, float]:
    """recall@k and MRR of the dense method alone (the quality suite's dense lists), at the store's ef_search."""
    vectors = rt.embedder.encode([q["question"] for q in questions], batch_size=64)
    dense = {
        q["qid"]: passages_of([(h.id, h.metadata) for h in rt.store.query(v, rt.cfg.candidates)])
        for q, v in zip(questions, vectors, strict=True)
    }
    return quality(dense, qrels)


def ann_phase(store: Path, ef: int) -> dict[str, Any]:
    """In a fresh process: the store opened with this ef_search (applied before the index loads), ANN recall@50
    and what it buys end to end: the dense method's recall@k and MRR on the 800 questions."""
    from cxr_rag.runtime import RagRuntime

    start = machine("start")
    rt = RagRuntime(rag_cfg(store, hnsw={"ef_search": ef}))
    rt.open(progress=False, build_index=False)
    questions, qrels = eval_questions()
    vectors = stored_vectors(rt)
    ann = ann_recall(rt, [q["question"] for q in questions][:200], vectors=vectors)
    dense = dense_quality(rt, questions, qrels)
    exact = exact_dense_quality(rt, vectors, questions, qrels)
    return {
        "source": source_revision(),
        "chunks": rt.store.count() if rt.store else 0,
        **ann,
        "dense_quality_800": dense,
        "dense_exact_search_quality_800": exact,
        **start,
        **machine("end"),
    }


def ef_sweep(store: Path, values: list[int], out: Path | None) -> int:
    rows = []
    for ef in values:
        cmd = [sys.executable, "-m", "bench.rag_scale", "--ann-phase", str(store), "--ef", str(ef)]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("ANN_PHASE ")), None)
        if run.returncode != 0 or line is None:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise SystemExit(f"ann phase for ef_search {ef} failed ({run.returncode})")
        rows.append(json.loads(line.removeprefix("ANN_PHASE ")))
        print(json.dumps(rows[-1]), flush=True)
    report = {"benchmark": "rag_scale ef_search sweep", "store": str(store), "source": source_revision(), "rows": rows}
    out = out or RESULTS / "rag_scale-ef_search.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=DEFAULT_N)
    ap.add_argument("--seed", type=int, default=rag_corpus.DEFAULT_SEED)
    ap.add_argument("--ingest", help="module:function replacing ingest_corpus(rt, corpus, progress) -> stats dict")
    ap.add_argument(
        "--extend-from",
        type=Path,
        help="a store of a smaller N (same seed) copied as the start: its chunks are the first of this corpus's",
    )
    ap.add_argument("--quick", action="store_true", help="fewer latency samples")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--serve-phase", type=Path, help=argparse.SUPPRESS)  # internal: the fresh process of step 4
    ap.add_argument("--ef-sweep", type=Path, help="only: ANN recall@50 of this store at --ef values, one process each")
    ap.add_argument("--ef", default="64,128,512", help="ef_search values of --ef-sweep")
    ap.add_argument("--ann-phase", type=Path, help=argparse.SUPPRESS)  # internal: one --ef-sweep value
    args = ap.parse_args(argv)
    if args.serve_phase:
        report = serve_phase(args.serve_phase, args.quick)
        print("SERVE_PHASE " + json.dumps(report), flush=True)
        return 0
    if args.ann_phase:
        print("ANN_PHASE " + json.dumps(ann_phase(args.ann_phase, int(args.ef))), flush=True)
        return 0
    if args.ef_sweep:
        return ef_sweep(args.ef_sweep, [int(x) for x in args.ef.split(",")], args.out)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "rag_scale",
        "passages": args.passages,
        "seed": args.seed,
        "host": {
            "cpu_count": os.cpu_count(),
            "shared": "2 cores shared with other sessions' work; see the load averages",
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            **machine("start"),
        },
        "source": source_revision(),
        "budgets_ms": BUDGET_MS,
    }
    t = time.perf_counter()
    corpus = corpus_file(args.passages, args.seed)
    report["corpus"] = {
        **json.loads(corpus.with_suffix(".manifest.json").read_text()),
        "ready_s": round(time.perf_counter() - t, 1),
    }
    store = WORK / f"chroma-{args.passages}-seed{args.seed}"
    if args.extend_from and not store.exists():
        shutil.copytree(args.extend_from, store)
        report["extended_from"] = str(args.extend_from)
    queries = [q["question"] for q in eval_questions()[0]]
    report["chroma_server"] = server_phase(store, corpus, load_ingest(args.ingest), queries, args.quick)
    cmd = [sys.executable, "-m", "bench.rag_scale", "--serve-phase", str(store), *(["--quick"] if args.quick else [])]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("SERVE_PHASE ")), None)
    if run.returncode != 0 or line is None:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"serve phase failed ({run.returncode})")
    report["embedded"] = json.loads(line.removeprefix("SERVE_PHASE "))
    emb = report["embedded"]["latency"]["hybrid_c1"]
    srv = report["chroma_server"]["latency"]["hybrid_c1"]
    report["summary"] = {
        "chunks": report["embedded"]["chunks"],
        "ingest_chunks_per_s": report["chroma_server"]["ingest"]["chunks_per_s"],
        "hybrid_c1_p50_ms": {"budget": BUDGET_MS["hybrid_c1_p50"], "embedded": emb["p50_ms"], "server": srv["p50_ms"]},
        "hybrid_c1_p99_ms": {"budget": BUDGET_MS["hybrid_c1_p99"], "embedded": emb["p99_ms"], "server": srv["p99_ms"]},
        "hybrid_c8_p50_ms": {
            "embedded": report["embedded"]["latency"]["hybrid_c8"]["p50_ms"],
            "server": report["chroma_server"]["latency"]["hybrid_c8"]["p50_ms"],
        },
        "recall@5_all_800": {m: v["recall@5"] for m, v in report["embedded"]["quality"]["all_questions"].items()},
        "mrr_all_800": {m: v["mrr"] for m, v in report["embedded"]["quality"]["all_questions"].items()},
        "service_process_memory_mb": {
            "after_open": report["embedded"]["memory_mb_after_open"],
            "by_stage": report["embedded"]["memory_mb_by_stage"],
            "after_queries": report["embedded"]["memory_mb_after_queries"],
            "at_end_incl_ann_check": report["embedded"]["memory_mb_at_end"],
        },
        "chroma_server_memory_mb": report["chroma_server"]["chroma_server_memory_mb"],
    }
    report["host"].update(machine("end"))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    name = "rag_scale" + ("" if args.passages == DEFAULT_N else f"-{args.passages}")
    name += f"-{args.ingest.rpartition(':')[2]}" if args.ingest else ""
    report["ingest_function"] = args.ingest or "bench.rag_scale:ingest_corpus"
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
