"""Queries while a large IngestDocuments runs, through the real RAG server (gRPC on 127.0.0.1,
embedded Chroma, the bundled MiniLM, live BM25): queries are not held behind the ingestion's
embedding batches, and the BM25 index takes the new chunks without being rebuilt."""

from __future__ import annotations

import asyncio
import json
import math
import time

import grpc
import numpy as np
import pytest

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.config import rag_config
from cxr_rag.service import build_binding
from tests.support.paths import PUBMEDQA
from tests.support.servers import auth, make_settings, running_server

pytestmark = pytest.mark.slow
SEED_DOCS = 60
INGEST_DOCS = 420  # about 440 chunks: several embedding batches of embedding_batch_size * 4 chunks
IDLE_QUERIES = 30
MAX_QUERIES = 3000
GUARD_S = 600  # fails instead of hanging on a starved host
QUERIES = [
    "Is a widened mediastinum a sign of aortic injury?",
    "Does pneumothorax follow transbronchial biopsy?",
    "Is lung cancer survival different in women?",
    "Does inhaled heparin prevent ventilator-associated pneumonia?",
]


def documents(lines: list[str]) -> list[pb.Document]:
    recs = [json.loads(line) for line in lines]
    return [pb.Document(id=r["id"], text=r["text"], source=f"PMID:{r['pmid']}") for r in recs]


async def timed_search(stub: pb_grpc.RagServiceStub, i: int) -> float:
    t = time.perf_counter()
    req = pb.SearchLiteratureRequest(query=QUERIES[i % len(QUERIES)], top_k=5)
    r = await stub.SearchLiterature(req, metadata=auth())
    assert r.passages
    return time.perf_counter() - t


async def test_queries_during_a_large_ingest_are_not_held_behind_it(tmp_path):
    lines = (PUBMEDQA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    s = make_settings(models={"rag": {"vector_db_path": str(tmp_path / "db"), "documents_path": None}})
    binding = build_binding(s, rag_config(s, environ={}))
    runtime = binding.extra["runtime"]
    async with running_server(s, binding) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.RagServiceStub(ch)
        await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=documents(lines[:SEED_DOCS])), metadata=auth())
        index = runtime.retriever.index
        tokenized = index.tokenized
        idle = [await timed_search(stub, i) for i in range(IDLE_QUERIES)]

        big = documents(lines[SEED_DOCS : SEED_DOCS + INGEST_DOCS])
        started = time.perf_counter()
        ingest = asyncio.ensure_future(stub.IngestDocuments(pb.IngestDocumentsRequest(documents=big), metadata=auth()))
        during: list[float] = []
        async with asyncio.timeout(GUARD_S):
            while not ingest.done() and len(during) < MAX_QUERIES:
                during.append(await timed_search(stub, len(during)))
            resp = await ingest
        ingest_s = time.perf_counter() - started

        cfg = runtime.cfg
        batches = math.ceil(resp.chunks_added / (cfg.embedding_batch_size * 4))
        batch_s = ingest_s / batches
        p99_idle, p50_idle = float(np.percentile(idle, 99)), float(np.percentile(idle, 50))
        p99_during, p50_during = float(np.percentile(during, 99)), float(np.percentile(during, 50))
        report = (
            f"{resp.chunks_added} chunks in {ingest_s:.1f}s ({batches} batches, {batch_s:.2f}s each); "
            f"{len(during)} queries during: p50 {p50_during * 1000:.0f} ms, p99 {p99_during * 1000:.0f} ms; "
            f"idle p50 {p50_idle * 1000:.0f} ms, p99 {p99_idle * 1000:.0f} ms"
        )
        print(report)
        assert batches >= 3, report
        # held behind the ingestion, a query would wait for the batch being embedded: about one query
        # per batch, each waiting up to a whole batch. Not held: many queries per batch, each far shorter.
        assert len(during) >= 4 * batches, report
        # a slow CI host saw one query of 61 wait 0.67 s in a 0.95 s batch (and one of 76 0.32 s in 0.80 s): the tail
        # reaches most of a batch, so p99 is bounded below a whole batch and p90 below half of one
        assert p99_during < batch_s, report
        assert float(np.percentile(during, 90)) <= 0.5 * batch_s, report
        # the typical query slows only by sharing the two cores with the embedding (p50 ~3.5x idle measured); an
        # idle p99 of ~13 ms is too small a unit for the tail, which the batch-time bound above already holds
        assert p50_during <= 10 * p50_idle, report

        # the BM25 index took the new chunks as they were written: same index, only they were tokenized
        assert runtime.retriever.index is index
        assert index.tokenized - tokenized == resp.chunks_added
        found = await stub.SearchLiterature(
            pb.SearchLiteratureRequest(query=big[-1].text[:300], mode=pb.RETRIEVAL_MODE_LEXICAL, top_k=1),
            metadata=auth(),
        )
        assert found.passages[0].metadata["doc_id"] == big[-1].id
