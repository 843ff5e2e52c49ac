"""Memory of the rag service at scale (issue 25 item 8): where VmRSS goes, component by component.

    python -m bench.rag_memory --passages 200000                   # build the store once, then measure
    python -m bench.rag_memory --passages 200000 --compare-ref main  # the same store measured with main's code too
    python -m bench.rag_memory --embedders-only --compare-ref main   # RagRuntime.open over an empty store, warm cache

The store is built with STAND-IN vectors (`ingest_random_vectors`: the service's chunking, chunk ids,
texts and metadata, written through the service's `VectorStore.upsert` into real Chroma, but each
vector is a unit Gaussian vector seeded by its chunk id instead of a MiniLM embedding), because this
2-core host embeds ~50 chunks/s and a million would take days. Vector values do not change what Chroma's
HNSW or the BM25 index hold in memory; they change the dense results, so no quality is reported here.

The measurement runs in a fresh process (`--measure-phase`): the service's own `RagRuntime.open` (both
embedder instances, the embedded Chroma store, the BM25 index built from the store), one dense query
(Chroma loads its HNSW index on the first query), then BM25 and hybrid latency over the shared PubMedQA
questions. VmRSS/VmHWM from /proc are read after each stage, so the growth of each stage is that
component's share. `--compare-ref REF` runs the same phase with `services/rag/src` of a git ref (e.g.
the code before the memory work), same store, in turn, so the two are side by side in one JSON.
`--embedders-only` measures what does not grow with the store (the empty-store opening: the two embedder
roles, the libraries, an empty Chroma) from a warm export cache, this code and the ref's alternating.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from bench import rag_corpus, rag_scale
from cxr_rag.chunking import content_hash

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "data" / "rag_memory"
RESULTS = ROOT / "bench" / "results"
DIM = 384


def stand_in_vectors(ids: list[str], dim: int = DIM) -> np.ndarray:
    """A unit Gaussian vector per chunk, seeded by the chunk id (the same id always gets the same vector)."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    for r, cid in enumerate(ids):
        seed = int.from_bytes(hashlib.blake2b(cid.encode(), digest_size=8).digest(), "little")
        out[r] = np.random.default_rng(seed).standard_normal(dim, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def ingest_random_vectors(rt: Any, corpus: Path, progress: bool) -> dict[str, Any]:
    """The service's chunks of `corpus` (ids, texts, metadata) into its store with STAND-IN vectors; resumable
    (chunks already stored are skipped). Same signature as `bench.rag_scale`'s `--ingest` functions."""
    from tqdm import tqdm

    from cxr_rag.ingest import read_documents

    store = rt.store
    ing = rt.ingestor(live_index=False)
    ing.write_batch = store.max_batch_size
    started = time.perf_counter()
    docs = added = skipped = 0
    bar = tqdm(desc="ingest (stand-in vectors)", unit="chunk", disable=not progress, mininterval=10)
    for n_docs, _, chunks in ing.windows(read_documents(corpus)):
        docs += n_docs
        present = store.existing_metadata([c.id for c in chunks])
        new = [c for c in chunks if c.id not in present]
        if new:
            store.upsert(new, stand_in_vectors([c.id for c in new], store.dimension))
        added += len(new)
        skipped += len(chunks) - len(new)
        bar.update(len(chunks))
    bar.close()
    return {
        "documents": docs,
        "chunks_added": added,
        "chunks_skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
        "path": "bench.rag_memory:ingest_random_vectors (STAND-IN vectors: unit Gaussian seeded by chunk id)",
    }


def build(passages: int, seed: int, store: Path) -> dict[str, Any]:
    from cxr_rag.runtime import RagRuntime

    corpus = rag_scale.corpus_file(passages, seed)
    rt = RagRuntime(rag_scale.rag_cfg(store))
    rt.open(progress=False, build_index=False)
    stats = ingest_random_vectors(rt, corpus, progress=True)
    assert rt.store is not None
    return {**stats, "chunks": rt.store.count()}


# -- the measuring process ----------------------------------------------------------------------------
def measure_phase(store: Path, queries_n: int) -> dict[str, Any]:
    """In a fresh process: VmRSS/VmHWM after each stage of opening what the rag service holds, then latency."""
    from cxr_rag.retrieval import Mode
    from cxr_rag.runtime import RagRuntime

    rt = RagRuntime(rag_scale.rag_cfg(store))
    opened = rag_scale.open_in_stages(rt)
    assert rt.store is not None and rt.retriever is not None and rt.retriever.index is not None
    index = rt.retriever.index
    stages = opened["memory_mb"]
    questions, _ = rag_scale.eval_questions()
    queries = [q["question"] for q in questions][:queries_n]
    lexical = rag_scale.latency(rt.retriever, queries, Mode.LEXICAL, 1, len(queries), 120.0)
    hybrid = rag_scale.latency(rt.retriever, queries, Mode.HYBRID, 1, len(queries), 120.0)
    stages["after_queries"] = rag_scale.proc_memory_mb()
    top = {q: [h.chunk.id for h in index.search(q, 10)] for q in queries[:100]}
    return {
        "chunks": len(index),
        "store_count": rt.store.count(),
        "bm25_build_s": opened["bm25_build_s"],
        "open_total_s": opened["open_s"],
        "memory_mb": stages,
        "lexical_c1": lexical,
        "hybrid_c1": hybrid,
        "bm25_top10_sha256": hashlib.sha256(json.dumps(top, sort_keys=True).encode()).hexdigest(),
    }


def query_ab_phase(store: Path, old_lexical: Path, queries_n: int) -> dict[str, Any]:
    """In one process over the store: the service's retriever with this code's BM25 index and with the ref's
    (`old_lexical`, loaded from its file), swapped query by query in alternating order, so both see the same
    embedder, Chroma and host load; also whether the passages (id, text, metadata) are identical."""
    import importlib.util

    from cxr_rag.lexical import LexicalIndex
    from cxr_rag.retrieval import Mode
    from cxr_rag.runtime import RagRuntime

    spec = importlib.util.spec_from_file_location("old_lexical", old_lexical)
    assert spec is not None and spec.loader is not None
    old_mod = importlib.util.module_from_spec(spec)
    sys.modules["old_lexical"] = old_mod  # its dataclasses look their module up
    spec.loader.exec_module(old_mod)
    rt = RagRuntime(rag_scale.rag_cfg(store))
    rt.open(progress=False, build_index=False)
    assert rt.store is not None and rt.retriever is not None
    r = rt.retriever
    indexes = {"new": LexicalIndex(rt.store.iter_chunks()), "ref": old_mod.LexicalIndex(rt.store.all_chunks())}
    gc.collect()
    gc.freeze()  # neither index's objects are walked by the collector while the other is timed
    queries = [q["question"] for q in rag_scale.eval_questions()[0]][:queries_n]
    r._index = indexes["new"]
    r.search("warm up the embedding model", 5, Mode.HYBRID)
    ms: dict[str, list[float]] = {}
    got: dict[str, list[Any]] = {}
    for i, q in enumerate(queries):
        for name in ("ref", "new") if i % 2 else ("new", "ref"):
            r._index = indexes[name]
            for mode in (Mode.LEXICAL, Mode.HYBRID):
                t = time.perf_counter()
                out = r.search(q, 5, mode)
                ms.setdefault(f"{name}_{mode.value}", []).append((time.perf_counter() - t) * 1000)
                for part, v in out.timings_ms.items():
                    ms.setdefault(f"{name}_{mode.value}_{part}", []).append(v)
                got.setdefault(f"{name}_{mode.value}", []).append([(p.id, p.text, p.metadata) for p in out.passages])
    same = {
        m: sum(a == b for a, b in zip(got[f"ref_{m}"], got[f"new_{m}"], strict=True)) for m in ("lexical", "hybrid")
    }
    return {
        "chunks": rt.store.count(),
        "queries": len(queries),
        "latency_ms": {k: rag_scale._pcts(v) for k, v in sorted(ms.items())},
        "identical_passages": same,
    }


def baseline_phase() -> dict[str, Any]:
    """In a fresh process: the same opening over an empty store, i.e. what holds memory whatever the chunk count
    (Python, the libraries, both embedder instances, an empty Chroma)."""
    from cxr_rag.runtime import RagRuntime

    with tempfile.TemporaryDirectory() as tmp:
        rt = RagRuntime(rag_scale.rag_cfg(Path(tmp) / "chroma"))
        opened = rag_scale.open_in_stages(rt)
        assert rt.embedder is not None and rt.ingest_embedder is not None
        heavy = [m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules]
        return {**opened, "imported": heavy, "embedders": [rt.embedder.status(), rt.ingest_embedder.status()]}


def corpus_chunks(corpus: Path, limit: int) -> Iterator[Any]:
    """The corpus passages as the chunks a store holds for a one-window passage (id, text, the metadata
    `chunk_document` writes), read lazily: the BM25-only measurement needs no store and no tokenizer pass."""
    from cxr_rag.ingest import read_documents
    from cxr_rag.store import StoredChunk

    for doc in itertools.islice(read_documents(corpus), limit):
        meta = {
            **doc.metadata,
            "doc_id": doc.key,
            "title": doc.title,
            "source": doc.source,
            "chunk": "0",
            "chunks": "1",
        }
        yield StoredChunk(content_hash(doc.key, doc.text), doc.text, meta)


def lexical_phase(corpus: Path, n: int, queries_n: int) -> dict[str, Any]:
    """In a fresh process: the BM25 index alone over `n` corpus passages, as the code on PYTHONPATH builds it
    at start (the old code took a list of every chunk, the new one a stream), its VmRSS/VmHWM and query time."""
    import inspect

    from cxr_rag.lexical import LexicalIndex

    stages: dict[str, Any] = {"imports": rag_scale.proc_memory_mb()}
    streams = "Iterable" in str(inspect.signature(LexicalIndex.__init__).parameters["chunks"].annotation)
    chunks = corpus_chunks(corpus, n) if streams else list(corpus_chunks(corpus, n))
    t = time.perf_counter()
    index = LexicalIndex(chunks)
    build_s = time.perf_counter() - t
    del chunks
    gc.collect()
    stages["bm25_index_built"] = rag_scale.proc_memory_mb()
    questions, _ = rag_scale.eval_questions()
    queries = [q["question"] for q in questions][:queries_n]
    ms = []
    for q in queries:
        t = time.perf_counter()
        index.search(q, 50)
        ms.append((time.perf_counter() - t) * 1000)
    top = {q: [h.chunk.id for h in index.search(q, 10)] for q in queries[:100]}
    return {
        "chunks": len(index),
        "input": "stream" if streams else "list of every chunk",
        "build_s": round(build_s, 1),
        "memory_mb": stages,
        "index_growth_mb": round(stages["bm25_index_built"]["VmRSS"] - stages["imports"]["VmRSS"], 1),
        "bm25_search_top50_ms": rag_scale._pcts(ms),
        "bm25_top10_sha256": hashlib.sha256(json.dumps(top, sort_keys=True).encode()).hexdigest(),
    }


def export_ref(ref: str, dest: Path) -> Path:
    """`services/rag/src` of a git ref, unpacked under `dest` (the code to compare with)."""
    archive = dest / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", ref, "services/rag/src"], cwd=ROOT, check=True, stdout=f)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "services" / "rag" / "src"


def run_phase(args: list[str], src: Path | None) -> dict[str, Any]:
    """`python -m bench.rag_memory <args>` in a fresh process, with `src` first on PYTHONPATH when given."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "bench.rag_memory", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("PHASE ")), None)
    if run.returncode != 0 or line is None:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"phase {args} failed ({run.returncode})")
    return dict(json.loads(line.removeprefix("PHASE ")))


def lexical_only(args: argparse.Namespace) -> int:
    """The BM25 index alone at N passages, this code and (`--compare-ref`) the ref's, in turn, fresh processes."""
    corpus = rag_scale.corpus_file(args.passages, args.seed)
    report: dict[str, Any] = {
        "benchmark": "rag_memory --lexical-only",
        "passages": args.passages,
        "chunks": "one per corpus passage (id, text and metadata as chunk_document writes them), no store",
        "host": {
            "cpu_count": os.cpu_count(),
            "shared": "2 cores shared with other sessions",
            **rag_scale.machine("start"),
        },
    }
    phase = ["--lexical-phase", str(corpus), "--passages", str(args.passages), "--queries", str(args.queries)]
    report["new"] = run_phase(phase, None)
    if args.compare_ref:
        with tempfile.TemporaryDirectory() as tmp:
            report[f"ref_{args.compare_ref}"] = run_phase(phase, export_ref(args.compare_ref, Path(tmp)))
    report["host"].update(rag_scale.machine("end"))
    out = args.out or RESULTS / f"rag_memory-lexical-{args.passages}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


def embedders_only(args: argparse.Namespace) -> int:
    """The empty-store opening (both embedder roles from a warm export cache, libraries, empty Chroma), this code
    and (`--compare-ref`) the ref's, in fresh processes alternating; one unmeasured start of each first, so a
    cold cache is exported (and, with this code, torch's check vectors stored) before anything is measured."""
    report: dict[str, Any] = {
        "benchmark": "rag_memory --embedders-only",
        "what": "VmRSS/VmHWM of RagRuntime.open over an empty store, export cache warm (var/cache/model-runtimes)",
        "host": {
            "cpu_count": os.cpu_count(),
            "shared": "2 cores shared with other sessions",
            **rag_scale.machine("start"),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        codes: dict[str, Path | None] = {"new": None}
        if args.compare_ref:
            codes[f"ref_{args.compare_ref}"] = export_ref(args.compare_ref, Path(tmp))
        report["warm_up"] = {name: run_phase(["--baseline-phase"], src)["open_s"] for name, src in codes.items()}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        for _ in range(args.rounds):
            for name, src in codes.items():
                runs[name].append(run_phase(["--baseline-phase"], src))
    report.update(runs)
    stage = "embedders_and_store_open"
    report["summary_mib"] = {
        name: {
            "VmRSS_median": float(np.median([r["memory_mb"][stage]["VmRSS"] for r in rs])),
            "VmHWM_median": float(np.median([r["memory_mb"][stage]["VmHWM"] for r in rs])),
            "open_s_median": float(np.median([r["open_s"] for r in rs])),
            "imported": rs[0]["imported"],
            "embedder": rs[0]["embedders"][0]["backend"] + "/" + rs[0]["embedders"][0]["precision"],
        }
        for name, rs in runs.items()
    }
    report["host"].update(rag_scale.machine("end"))
    out = args.out or RESULTS / "rag_memory-embedders.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary_mib"], indent=2))
    print(f"written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=rag_corpus.DEFAULT_SEED)
    ap.add_argument("--store", type=Path, help="default var/data/rag_memory/chroma-<N>-seed<S>")
    ap.add_argument("--build-only", action="store_true", help="build (or resume) the stand-in store and stop")
    ap.add_argument("--no-build", action="store_true", help="measure the store as it is (built by an earlier run)")
    ap.add_argument("--compare-ref", help="also measure with services/rag/src of this git ref (e.g. main)")
    ap.add_argument("--queries", type=int, default=300, help="PubMedQA questions per latency cell")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lexical-only", action="store_true", help="only the BM25 index over the corpus, no store")
    ap.add_argument("--embedders-only", action="store_true", help="only the empty-store opening, warm export cache")
    ap.add_argument("--rounds", type=int, default=3, help="--embedders-only: measured starts of each code")
    ap.add_argument("--measure-phase", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lexical-phase", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-phase", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--query-ab-phase", nargs=2, type=Path, help=argparse.SUPPRESS)  # store, the ref's lexical.py
    args = ap.parse_args(argv)
    if args.measure_phase:
        print("PHASE " + json.dumps(measure_phase(args.measure_phase, args.queries)), flush=True)
        return 0
    if args.query_ab_phase:
        store_path, old_file = args.query_ab_phase
        print("PHASE " + json.dumps(query_ab_phase(store_path, old_file, args.queries)), flush=True)
        return 0
    if args.baseline_phase:
        print("PHASE " + json.dumps(baseline_phase()), flush=True)
        return 0
    if args.lexical_phase:
        print("PHASE " + json.dumps(lexical_phase(args.lexical_phase, args.passages, args.queries)), flush=True)
        return 0
    if args.lexical_only:
        return lexical_only(args)
    if args.embedders_only:
        return embedders_only(args)
    store = args.store or WORK / f"chroma-{args.passages}-seed{args.seed}"
    report: dict[str, Any] = {
        "benchmark": "rag_memory",
        "passages": args.passages,
        "vectors": "STAND-IN: unit Gaussian per chunk seeded by its id (bench.rag_memory:ingest_random_vectors)",
        "host": {
            "cpu_count": os.cpu_count(),
            "shared": "2 cores shared with other sessions' work; see the load averages",
            "platform": platform.platform(),
            **rag_scale.machine("start"),
        },
    }
    report["build"] = {"skipped": str(store)} if args.no_build else build(args.passages, args.seed, store)
    if args.build_only:
        print(json.dumps(report["build"]))
        return 0
    report["baseline_empty_store"] = run_phase(["--baseline-phase"], None)
    phase = ["--measure-phase", str(store), "--queries", str(args.queries)]
    report["new"] = run_phase(phase, None)
    if args.compare_ref:
        with tempfile.TemporaryDirectory() as tmp:
            src = export_ref(args.compare_ref, Path(tmp))
            report[f"ref_{args.compare_ref}"] = run_phase(phase, src)
            ab = ["--query-ab-phase", str(store), str(src / "cxr_rag" / "lexical.py"), "--queries", str(args.queries)]
            report[f"query_latency_new_vs_ref_{args.compare_ref}_one_process"] = run_phase(ab, None)
    report["host"].update(rag_scale.machine("end"))
    out = args.out or RESULTS / f"rag_memory-{args.passages}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v.get("memory_mb") for k, v in report.items() if isinstance(v, dict)}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
