"""Ingestion throughput: torch against the embedder's OpenVINO / ONNX Runtime exports, side by side in one
run, and the RSS of the real rag service process over the ingested store.

    make bench-rag_ingest                       # 1,000 PubMedQA passages, five embedder runtimes
    BENCH_ARGS=--quick make bench-rag_ingest    # 300 passages, torch vs openvino/bfloat16
    BENCH_ARGS="--scale-compare 20000" make bench-rag_ingest   # before/after on the scale corpus

For every runtime: its load (export reused from the cache, agreement check), embedding alone
(`--rounds` interleaved rounds over the same chunks, so a change of host load hits every runtime
alike; chunks/s and the ratio to torch of the same round), then `Ingestor.ingest` into a fresh
embedded Chroma (chunking, the existence check, embedding, upserts: end-to-end chunks/s), and
the cosine of its vectors against torch's on every chunk. Then the service's memory: `python -m
cxr_rag` started on the fast runtime's store, VmRSS / VmHWM of its process after READY and after
hybrid searches (`service_memory`, which the scale bench calls on its large store).
`--scale-compare N`: only openvino/bfloat16, end to end (chunking, existence check, embedding, Chroma
upserts, the live BM25 index) over the first N passages of bench.rag_corpus's scale corpus into fresh
embedded stores, as before (latency-compiled export, windows of 128 chunks, each sorted by length on its
own) and as now (the ingest role's throughput-compiled export, windows of `Ingestor`'s default size):
wall chunks/s, and chunks per CPU-second of this process (user + system time, so less sensitive to the
other sessions' load), with the load average around each.
The host has 2 cores shared with other sessions: the load average is recorded around each
measurement, and only ratios within one round are comparable. Writes bench/results/rag_ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import API_KEY, PUBMEDQA, REPO, RESULTS, ServerProcess, free_port

VARIANTS = [
    ("torch", "float32"),
    ("onnxruntime", "float32"),
    ("openvino", "float32"),
    ("openvino", "bfloat16"),
    ("openvino", "int8"),
]
QUICK_VARIANTS = [("torch", "float32"), ("openvino", "bfloat16")]
QUESTIONS = [
    "Does pleural effusion on the admission chest radiograph predict mortality?",
    "Is cardiomegaly on chest x-ray a reliable sign of heart failure?",
    "How accurate is portable chest radiography for pneumothorax?",
    "Do pulmonary nodules found incidentally need follow-up imaging?",
]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of one process, in MiB, from /proc/<pid>/status."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[f"{key.lower()}_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


def service_memory(store: Path, collection: str = "medical_literature", searches: int = 40) -> dict[str, Any]:
    """The rag service (`python -m cxr_rag`, extractive, no ingest at start) on the embedded store `store`:
    VmRSS/VmHWM of its process once READY (the BM25 index built over every chunk) and after `searches`
    hybrid searches; what item 8 of issue 25 reads at 1M chunks."""
    return asyncio.run(_service_memory(store, collection, searches))


async def _service_memory(store: Path, collection: str, searches: int) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cxr_protos.rag.v1 import rag_service_pb2 as pb
    from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-rag-rss-"))
    cfg = {
        "models": {
            "rag": {
                "vector_db_path": str(store),
                "collection": collection,
                "documents_path": None,
                "llm": {"mode": "extractive"},
            }
        },
        "services": {"rag": {"host": "127.0.0.1", "port": port, "metrics_port": 0}},
        "monitoring": {"log_json": False},
    }
    (work / "cfg.json").write_text(json.dumps(cfg))
    svc = ServerProcess(
        [sys.executable, "-m", "cxr_rag", "--config", str(work / "cfg.json")],
        env={"CXR_API_KEY": API_KEY},
        name="rag",
    ).start()
    meta = (("x-api-key", API_KEY),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def serving() -> bool:
                st = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return bool(st.status == health_pb2.HealthCheckResponse.SERVING)

            ready_s = await svc.wait_ready(serving, timeout=3600)
            assert svc.proc is not None
            at_ready = proc_memory(svc.proc.pid)
            stub = pb_grpc.RagServiceStub(ch)
            latencies = []
            deadline = time.monotonic() + 300
            for i in range(searches):
                if time.monotonic() > deadline:
                    break
                t = time.perf_counter()
                req = pb.SearchLiteratureRequest(
                    query=QUESTIONS[i % len(QUESTIONS)], top_k=5, mode=pb.RETRIEVAL_MODE_HYBRID
                )
                await stub.SearchLiterature(req, metadata=meta, timeout=60)
                latencies.append(time.perf_counter() - t)
            after = proc_memory(svc.proc.pid)
        return {
            "pid_measured": "the service process itself (python -m cxr_rag), /proc/<pid>/status",
            "ready_s": ready_s,
            "at_ready": at_ready,
            "after_searches": after,
            "searches": len(latencies),
            "search_p50_ms": round(float(np.median(latencies)) * 1000, 1) if latencies else None,
        }
    finally:
        svc.stop()
        shutil.rmtree(work, ignore_errors=True)


def chunks_of(docs: int) -> tuple[list[Any], list[Any]]:
    from cxr_rag.embeddings import default_model_path, load_tokenizer
    from cxr_rag.ingest import Ingestor, read_documents

    documents = list(read_documents(PUBMEDQA / "corpus.jsonl", docs))
    ing = Ingestor(None, None, load_tokenizer(default_model_path()), 200, 40)  # type: ignore[arg-type]
    return documents, ing.chunk(documents)[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 passages, torch vs openvino/bfloat16, 2 rounds")
    ap.add_argument("--docs", type=int, help="PubMedQA passages ingested (default 1,000; quick 300)")
    ap.add_argument("--rounds", type=int, help="interleaved embedding-only rounds (default 3; quick 2)")
    ap.add_argument("--batch-size", type=int, default=32, help="chunks per forward pass")
    ap.add_argument("--no-service", action="store_true", help="skip the service RSS measurement")
    ap.add_argument(
        "--overlap-only",
        action="store_true",
        help="only openvino/bfloat16 end to end, writes in turn (write_queue 0) vs overlapped with embedding",
    )
    ap.add_argument(
        "--scale-compare",
        type=int,
        metavar="N",
        help="only before vs now, end to end over the first N passages of the scale corpus (bench.rag_corpus)",
    )
    ap.add_argument("--out", type=Path, help="default bench/results/rag_ingest.json (rag_ingest-scale-<N>.json)")
    args = ap.parse_args(argv)
    if args.scale_compare:
        out = args.out or RESULTS / f"rag_ingest-scale-{args.scale_compare}.json"
        return _write(scale_compare(args.scale_compare, args.batch_size), out)
    args.out = args.out or RESULTS / "rag_ingest.json"

    from cxr_rag.config import EmbeddingRuntimeConfig, RagConfig
    from cxr_rag.embeddings import Embedder, default_model_path, load_tokenizer
    from cxr_rag.ingest import Ingestor
    from cxr_rag.store import VectorStore

    variants = [("openvino", "bfloat16")] if args.overlap_only else QUICK_VARIANTS if args.quick else VARIANTS
    n_docs = args.docs or (300 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    documents, chunks = chunks_of(n_docs)
    texts = [c.text for c in chunks]
    tok = load_tokenizer(default_model_path())
    tokens = [len(tok.encode(t).ids) for t in texts]
    cache = REPO / "var" / "cache" / "model-runtimes"
    work = Path(tempfile.mkdtemp(prefix="bench-rag-ingest-"))
    report: dict[str, Any] = {
        "benchmark": "rag_ingest",
        "quick": args.quick,
        "corpus": f"first {n_docs} passages of ../shared/data/pubmedqa/corpus.jsonl",
        "chunks": len(chunks),
        "chunk_tokens_mean": round(float(np.mean(tokens)), 1),
        "chunk_tokens_max": int(max(tokens)),
        "batch_size": args.batch_size,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "note": "2 cores shared with other sessions' tests and benchmarks: absolute rates move with their "
            "load; compare the runtimes within one round",
        },
        "load_average_start": load(),
        "variants": {},
    }
    embedders: dict[str, Embedder] = {}
    try:
        for backend, precision in variants:
            name = f"{backend}/{precision}"
            t = time.perf_counter()
            runtime = EmbeddingRuntimeConfig(backend=backend, precision=precision, cache_dir=cache)  # type: ignore[arg-type]
            emb = Embedder(default_model_path(), "cpu", runtime)
            report["variants"][name] = {
                "serving": f"{emb.backend}/{emb.precision}",
                "load_s": round(time.perf_counter() - t, 1),
                "exported_now": emb.exported,
                "check": emb.runtime_note,
            }
            print(f"{name}: loaded ({emb.backend}/{emb.precision}) {emb.runtime_note}", flush=True)
            if name != "torch/float32" and emb.backend == "torch":
                continue  # it failed its check (or cannot run here): torch serves, measured once already
            embedders[name] = emb
            emb.encode(texts[:64], args.batch_size)  # warm-up

        if args.overlap_only:
            report["write_overlap"] = write_overlap(embedders, documents, tok, work, rounds, args.batch_size)
            embedders.clear()
            return _write(report, args.out)

        # embedding alone, interleaved rounds over the same chunks
        sample = texts[: min(len(texts), 512)]
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            row: dict[str, Any] = {"load_average_before": load()}
            for name, emb in embedders.items():
                t = time.perf_counter()
                emb.encode(sample, args.batch_size)
                row[name] = round(len(sample) / (time.perf_counter() - t), 1)
            row["ratio_to_torch"] = {n: round(row[n] / row["torch/float32"], 2) for n in embedders}
            per_round.append(row)
            print(f"round {r + 1}: {row}", flush=True)
        report["embed_only_chunks_per_s"] = {"chunks_per_round": len(sample), "rounds": per_round}

        # end to end into a fresh embedded Chroma, and agreement on every chunk
        reference = embedders["torch/float32"].encode(texts, args.batch_size)
        fast_store = None
        for name, emb in embedders.items():
            store_dir = work / name.replace("/", "-")
            cfg = RagConfig.model_validate({"vector_db_path": str(store_dir)})
            store = VectorStore.open(cfg, cfg.embedding_name, 384)
            ing = Ingestor(store, emb, tok, 200, 40, batch_size=args.batch_size)
            before = load()
            t = time.perf_counter()
            stats = ing.ingest(documents, progress=False)
            seconds = time.perf_counter() - t
            got = emb.encode(texts, args.batch_size)
            cos = (got * reference).sum(axis=1)
            report["variants"][name].update(
                {
                    "ingest_chunks_per_s": round(stats.chunks_added / seconds, 1),
                    "ingest_s": round(seconds, 1),
                    "chunks_added": stats.chunks_added,
                    "load_average_before_after": [before, load()],
                    "cosine_to_torch_on_chunks": {
                        "min": round(float(cos.min()), 5),
                        "mean": round(float(cos.mean()), 5),
                    },
                }
            )
            print(f"{name}: ingest {report['variants'][name]['ingest_chunks_per_s']} chunks/s", flush=True)
            if name == "openvino/bfloat16":
                fast_store = store_dir
        torch_rate = report["variants"]["torch/float32"]["ingest_chunks_per_s"]
        report["ingest_ratio_to_torch"] = {
            n: round(v["ingest_chunks_per_s"] / torch_rate, 2)
            for n, v in report["variants"].items()
            if "ingest_chunks_per_s" in v
        }
        embedders.clear()
        if not args.no_service and fast_store is not None:
            print("service memory ...", flush=True)
            report["service_memory"] = {"chunks": len(chunks), **service_memory(fast_store)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _write(report, args.out)


def _write(report: dict[str, Any], out: Path) -> int:
    report["load_average_end"] = load()
    report["target"] = "issue 25: >= 400 chunks/s end to end on this 2-core CPU"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("ingest_ratio_to_torch", "write_overlap", "ratio_now_to_before", "load_average_end")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    print(f"written to {out}")
    return 0


def write_overlap(
    embedders: dict[str, Any], documents: list[Any], tok: Any, work: Path, rounds: int, batch_size: int
) -> dict[str, Any]:
    """`Ingestor.ingest` end to end into fresh embedded stores with the fast embedder: writes in turn with the
    embedding (`write_queue` 0, as before) against the writer thread (the default), alternating which goes
    first in each round; chunks/s and the ratio within each round."""
    from cxr_rag.config import RagConfig
    from cxr_rag.ingest import Ingestor
    from cxr_rag.lexical import LexicalIndex
    from cxr_rag.store import VectorStore

    name, emb = next(iter(embedders.items()))
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        row: dict[str, Any] = {"load_average_before": load()}
        for depth in (0, 2) if r % 2 == 0 else (2, 0):
            cfg = RagConfig.model_validate({"vector_db_path": str(work / f"overlap-{r}-{depth}")})
            store = VectorStore.open(cfg, cfg.embedding_name, 384)
            index = LexicalIndex()  # the live BM25 index takes every batch, as in the service's IngestDocuments
            ing = Ingestor(store, emb, tok, 200, 40, batch_size=batch_size, index=index, write_queue=depth)
            t = time.perf_counter()
            stats = ing.ingest(documents, progress=False)
            row["in_turn" if depth == 0 else "overlapped"] = round(stats.chunks_added / (time.perf_counter() - t), 1)
        row["ratio"] = round(row["overlapped"] / row["in_turn"], 2)
        out.append(row)
        print(f"overlap round {r + 1}: {row}", flush=True)
    ratios = [x["ratio"] for x in out]
    return {"embedder": name, "chunks": stats.chunks_added, "rounds": out, "ratio_median": float(np.median(ratios))}


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def scale_compare(passages: int, batch_size: int) -> dict[str, Any]:
    """Before and now, end to end into fresh embedded stores with the live BM25 index, on the scale corpus."""
    from bench import rag_corpus
    from cxr_rag.config import EmbeddingRuntimeConfig, RagConfig
    from cxr_rag.embeddings import Embedder, default_model_path, load_tokenizer
    from cxr_rag.ingest import WRITE_BATCH, Ingestor, read_documents
    from cxr_rag.lexical import LexicalIndex
    from cxr_rag.store import VectorStore

    corpus = rag_corpus.OUT_DIR / f"corpus-{passages}-seed{rag_corpus.DEFAULT_SEED}.jsonl"
    if not corpus.is_file():
        rag_corpus.main(["-n", str(passages)])
    documents = list(read_documents(corpus))
    tok = load_tokenizer(default_model_path())
    cache = REPO / "var" / "cache" / "model-runtimes"
    runtime = EmbeddingRuntimeConfig(backend="openvino", precision="bfloat16", cache_dir=cache)
    latency = Embedder(default_model_path(), "cpu", runtime)
    throughput = latency.sibling(throughput=True)
    assert throughput is not None, latency.runtime_note
    ways = {  # name: (embedder, write_batch)
        "before": (latency, 128),
        "now": (throughput, WRITE_BATCH),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-rag-scale-compare-"))
    report: dict[str, Any] = {
        "benchmark": "rag_ingest --scale-compare",
        "corpus": str(corpus.relative_to(REPO)),
        "passages": len(documents),
        "batch_size": batch_size,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": _cpu_model(),
            "note": "2 cores shared with other sessions' tests and benchmarks (see the load averages): wall "
            "chunks/s moves with their load; chunks per CPU-second of this process moves much less",
        },
        "load_average_start": load(),
        "ways": {},
    }
    try:
        for name, (emb, write_batch) in ways.items():
            emb.encode([d.text for d in documents[:64]], batch_size)  # warm-up
            cfg = RagConfig.model_validate({"vector_db_path": str(work / name)})
            store = VectorStore.open(cfg, cfg.embedding_name, emb.dimension)
            ing = Ingestor(
                store, emb, tok, 200, 40, batch_size=batch_size, write_batch=write_batch, index=LexicalIndex()
            )
            before, c0, t = load(), _cpu_seconds(), time.perf_counter()
            stats = ing.ingest(documents, progress=False)
            wall, cpu = time.perf_counter() - t, _cpu_seconds() - c0
            report["ways"][name] = {
                "embedder": emb.status(),
                "write_batch": write_batch,
                "chunks_added": stats.chunks_added,
                "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1),
                "chunks_per_s": round(stats.chunks_added / wall, 1),
                "chunks_per_cpu_s": round(stats.chunks_added / cpu, 1),
                "chunks_per_s_if_two_free_cores": round(2 * stats.chunks_added / cpu, 1),
                "load_average_before_after": [before, load()],
            }
            print(f"{name}: {report['ways'][name]}", flush=True)
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, n = report["ways"]["before"], report["ways"]["now"]
    report["ratio_now_to_before"] = {
        "chunks_per_s": round(n["chunks_per_s"] / b["chunks_per_s"], 2),
        "chunks_per_cpu_s": round(n["chunks_per_cpu_s"] / b["chunks_per_cpu_s"], 2),
    }
    return report


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
