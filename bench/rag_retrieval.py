"""Retrieval quality and latency on PubMedQA: dense vs BM25 vs hybrid (RRF), side by side.

    make bench-rag_retrieval                 # all 800 questions over the whole corpus (3,358 passages)
    .venv/bin/python -m bench.rag_retrieval --quick   # 100 questions over the first 1,000 passages

Data: ../shared/data/pubmedqa (corpus.jsonl, questions.jsonl, qrels.tsv). The store is built
once under var/data/bench_chroma[_quick] (ingestion is idempotent: later runs reuse it).

Metrics per mode (chunks are mapped back to their corpus passage, duplicates removed):
- recall@k: share of questions with at least one relevant passage in the top k (success@k);
- passage_recall@k: mean share of a question's relevant passages found in the top k;
- mrr: mean reciprocal rank of the first relevant passage (0 beyond rank 10);
- latency p50/p99 (ms) of one search call in-process (query embedding included for dense/hybrid).
Writes bench/results/rag_retrieval.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_SHARED_DIR", ROOT.parent / "shared")) / "data" / "pubmedqa"
KS = (1, 5, 10)


def load_eval(max_passages: int | None, max_questions: int | None) -> tuple[Path, list[dict], dict[str, set[str]]]:
    lines = (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    corpus = DATA / "corpus.jsonl"
    if max_passages is not None:
        lines = lines[:max_passages]
        tmp = Path(tempfile.mkdtemp(prefix="rag-bench-")) / "corpus.jsonl"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        corpus = tmp
    present = {json.loads(ln)["id"] for ln in lines}
    qrels: dict[str, set[str]] = defaultdict(set)
    with (DATA / "qrels.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["relevance"]) > 0 and row["passage_id"] in present:
                qrels[row["qid"]].add(row["passage_id"])
    questions = [json.loads(ln) for ln in (DATA / "questions.jsonl").read_text().splitlines()]
    questions = [q for q in questions if qrels.get(q["qid"])]
    if max_questions is not None:
        questions = questions[:max_questions]
    return corpus, questions, qrels


OFF_TOPIC = [
    "What is the orbital period of Jupiter's moon Europa in days?",
    "How do I reset the password of my home wifi router?",
    "Who won the football world cup in 1998?",
    "What is the best recipe for sourdough bread?",
    "How many lines of code does the Linux kernel have?",
    "Which programming language should I learn first?",
    "What is the capital city of Australia?",
    "How fast can a cheetah run?",
    "When was the Eiffel tower built?",
    "What are the rules of chess castling?",
]


def relevance(retriever, on_topic: list[float]) -> dict:
    """Best dense cosine similarity for real questions vs off-topic ones: sets models.rag.min_relevance."""
    from cxr_rag.retrieval import Mode

    on = np.array(on_topic)
    off = np.array([float(retriever.search(q, 1, Mode.DENSE).best_similarity or 0.0) for q in OFF_TOPIC])
    return {
        "on_topic_best_similarity": {p: round(float(np.percentile(on, int(p[1:]))), 3) for p in ("p1", "p5", "p50")},
        "off_topic_best_similarity_max": round(float(off.max()), 3),
        "off_topic_best_similarity_mean": round(float(off.mean()), 3),
        "off_topic": {q: round(float(v), 3) for q, v in zip(OFF_TOPIC, off, strict=True)},
    }


def evaluate(retriever, questions, qrels, mode, best_sims: list[float], k_max: int = 10) -> dict:
    hits = {k: 0 for k in KS}
    precall = {k: 0.0 for k in KS}
    rr, lat = 0.0, []
    for q in questions:
        t = time.perf_counter()
        res = retriever.search(q["question"], k_max * 2, mode)
        lat.append((time.perf_counter() - t) * 1000)
        if res.best_similarity is not None:
            best_sims.append(res.best_similarity)
        ranked: list[str] = []
        for p in res.passages:
            pid = p.metadata.get("doc_id", p.id)
            if pid not in ranked:
                ranked.append(pid)
        ranked = ranked[:k_max]
        rel = qrels[q["qid"]]
        for k in KS:
            found = len(rel & set(ranked[:k]))
            hits[k] += found > 0
            precall[k] += found / len(rel)
        first = next((i for i, pid in enumerate(ranked, 1) if pid in rel), None)
        rr += 1 / first if first else 0.0
    n = len(questions)
    out = {f"recall@{k}": round(hits[k] / n, 4) for k in KS}
    out |= {f"passage_recall@{k}": round(precall[k] / n, 4) for k in KS}
    out |= {
        "mrr": round(rr / n, 4),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 questions over the first 1,000 passages")
    ap.add_argument("--store", type=Path, help="Chroma directory (default var/data/bench_chroma[_quick])")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rag_retrieval.json")
    args = ap.parse_args(argv)

    from cxr_rag.config import RagConfig
    from cxr_rag.ingest import read_documents
    from cxr_rag.retrieval import Mode
    from cxr_rag.runtime import RagRuntime

    max_passages, max_questions = (1000, 100) if args.quick else (None, None)
    corpus, questions, qrels = load_eval(max_passages, max_questions)
    store = args.store or ROOT / "var" / "data" / ("bench_chroma_quick" if args.quick else "bench_chroma")
    cfg = RagConfig.model_validate({"vector_db_path": str(store), "documents_path": None})
    rt = RagRuntime(cfg)
    t = time.perf_counter()
    rt.open(progress=True, build_index=False)
    stats = rt.ingest(read_documents(corpus), progress=True, rebuild=False)
    assert rt.retriever is not None and rt.store is not None
    index = rt.retriever.rebuild_index()
    setup_s = time.perf_counter() - t
    rt.retriever.search("warm up the embedding model", 5, Mode.HYBRID)

    results = {}
    best_sims: list[float] = []
    for mode in (Mode.DENSE, Mode.LEXICAL, Mode.HYBRID):
        t = time.perf_counter()
        results[mode.value] = evaluate(rt.retriever, questions, qrels, mode, best_sims if mode == Mode.DENSE else [])
        print(f"{mode.value}: {len(questions)} questions in {time.perf_counter() - t:.1f}s", flush=True)
    report = {
        "benchmark": "rag_retrieval",
        "quick": args.quick,
        "dataset": "PubMedQA (pqa-labeled), ../shared/data/pubmedqa",
        "questions": len(questions),
        "corpus_passages": stats.documents,
        "chunks": rt.store.count(),
        "embedding_model": cfg.embedding_name,
        "chunk_tokens": cfg.chunk_tokens,
        "chunk_overlap_tokens": cfg.chunk_overlap_tokens,
        "rrf_k": cfg.rrf_k,
        "candidates_per_retriever": cfg.candidates,
        "ingest": {**stats.as_dict(), "setup_seconds_incl_model_load": round(setup_s, 1)},
        "bm25_build_seconds": round(index.build_seconds, 3),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "modes": results,
        "relevance": relevance(rt.retriever, best_sims),
        "min_relevance_configured": cfg.min_relevance,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cols = ["recall@1", "recall@5", "recall@10", "passage_recall@10", "mrr", "latency_ms_p50", "latency_ms_p99"]
    print(f"\n{len(questions)} questions, {report['chunks']} chunks")
    print(f"{'mode':<8}" + "".join(f"{c:>19}" for c in cols))
    for mode, row in results.items():
        print(f"{mode:<8}" + "".join(f"{row[c]:>19}" for c in cols))
    print(f"relevance (best dense cosine similarity): {report['relevance']}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
