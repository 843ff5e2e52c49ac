"""The live BM25 index against a bm25s rebuild: what one ingestion batch costs, and query latency.

    make bench-rag_lexical                  # N = 3,358 (the corpus), 50,000 and 200,000 chunks
    BENCH_ARGS=--quick make bench-rag_lexical   # N = 3,358 only

Chunks: PubMedQA passages (../shared/data/pubmedqa/corpus.jsonl), repeated under new ids up to N
(same vocabulary statistics; tokenizing is the cost that scales). For each N:
- bm25s_rebuild_s: what every IngestDocuments cost before: a bm25s index over all N chunks;
- live_build_s: the live index built over all N chunks (once, at start);
- live_add_s / live_remove_s: the live index taking one write batch (256 chunks) / deleting it;
- live_merge_s: the background merge of 8 such segments into the rest (off the query path);
- query p50/p99 (ms) of 200 searches (4 PubMedQA questions in turn), bm25s vs the live index with
  9 segments and deletions (tokenizing the query included in both).
Writes bench/results/rag_lexical.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_SHARED_DIR", ROOT.parent / "shared")) / "data" / "pubmedqa"
BATCH = 256
SEARCHES = 200


def chunks(n: int) -> list:
    from cxr_rag.store import StoredChunk

    base = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    return [StoredChunk(f"{i}-{base[i % len(base)]['id']}", base[i % len(base)]["text"], {}) for i in range(n)]


def percentiles(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(xs, 50)) * 1000, 3),
        "p99_ms": round(float(np.percentile(xs, 99)) * 1000, 3),
    }


def measure(n: int, questions: list[str]) -> dict:
    import bm25s

    from cxr_rag.lexical import LexicalIndex, tokenize

    corpus = chunks(n + 8 * BATCH)
    base, extra = corpus[:n], corpus[n:]
    t = time.perf_counter()
    ref = bm25s.BM25()
    ref.index(tokenize([c.text for c in base]), show_progress=False)
    rebuild = time.perf_counter() - t

    index = LexicalIndex(base, max_segments=16)
    t = time.perf_counter()
    index.add(extra[:BATCH])
    add = time.perf_counter() - t
    t = time.perf_counter()
    index.remove([c.id for c in extra[:BATCH]])
    remove = time.perf_counter() - t
    for s in range(0, len(extra), BATCH):
        index.add(extra[s : s + BATCH])
    index.remove([c.id for c in base[: n // 100]])
    segments = index.segments

    def bm25s_search(q: str) -> None:
        terms = [w for w in tokenize([q])[0] if w in ref.vocab_dict]
        if terms:
            scores = ref.get_scores(terms)
            np.argpartition(-scores, 50)[:50]

    lat_ref, lat_live = [], []
    for i in range(SEARCHES):
        q = questions[i % len(questions)]
        t = time.perf_counter()
        bm25s_search(q)
        lat_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search(q, 50)
        lat_live.append(time.perf_counter() - t)
    index.max_segments = 1
    t = time.perf_counter()
    index._maybe_merge()
    index.wait_merges(600)
    merge = time.perf_counter() - t
    return {
        "chunks": n,
        "bm25s_rebuild_s": round(rebuild, 3),
        "live_build_s": round(index.build_seconds, 3),
        "live_add_s": round(add, 4),
        "live_remove_s": round(remove, 4),
        "live_merge_all_s": round(merge, 3),
        "segments_during_queries": segments,
        "query_bm25s": percentiles(lat_ref),
        "query_live": percentiles(lat_live),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rag_lexical.json")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([3358] if args.quick else [3358, 50_000, 200_000])
    questions = [
        json.loads(line)["question"] for line in (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    ]
    rows = []
    for n in sizes:
        rows.append(measure(n, questions))
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "benchmark": "rag_lexical",
        "write_batch": BATCH,
        "searches": SEARCHES,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "sizes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
