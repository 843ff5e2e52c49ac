"""HttpClient mode: the store against a real `chroma run` server process on loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_rag.chunking import Chunk
from cxr_rag.embeddings import default_model_path, get_embedder, load_tokenizer
from cxr_rag.ingest import Ingestor, read_documents
from cxr_rag.retrieval import Mode, Retriever
from cxr_rag.store import StoreMismatchError, VectorStore
from cxr_serving.errors import DependencyUnavailableError
from tests.support.rag import rag_cfg, subset_corpus, wait_http
from tests.support.servers import free_port

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _chroma_cli() -> str:
    exe = Path(sys.executable).with_name("chroma")
    return str(exe) if exe.exists() else (shutil.which("chroma") or "chroma")


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("chroma-server")
    proc = subprocess.Popen(
        [_chroma_cli(), "run", "--path", str(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"ANONYMIZED_TELEMETRY": "False", "PATH": "/usr/bin:/bin"},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=60, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_http_store_ingest_search_backup(chroma_server, tmp_path):
    cfg = rag_cfg(tmp_path / "unused", vector_db_host="127.0.0.1", vector_db_port=chroma_server)
    emb = get_embedder(default_model_path())
    store = VectorStore.open(cfg, MODEL, emb.dimension)
    assert store.mode == "http" and store.location == f"http://127.0.0.1:{chroma_server}"
    ing = Ingestor(store, emb, load_tokenizer(default_model_path()), 200, 40)
    docs = list(read_documents(subset_corpus(), limit=30))
    first = ing.ingest(docs, progress=False)
    again = ing.ingest(docs, progress=False)
    assert first.chunks_added >= 30 and again.chunks_added == 0 and store.count() == first.chunks_added
    r = Retriever(store, emb, candidates=10)
    r.rebuild_index()
    hit = r.search(docs[3].text[:200], 1, Mode.HYBRID).passages[0]
    assert hit.metadata["doc_id"] == docs[3].key
    # the metadata check works through the server too
    with pytest.raises(StoreMismatchError):
        VectorStore.open(cfg, "another-model", emb.dimension)
    # logical backup from the server, restored into an embedded store
    store.backup(tmp_path / "snap")
    local = VectorStore.open(rag_cfg(tmp_path / "local"), MODEL, emb.dimension)
    assert local.restore(tmp_path / "snap")["count_after"] == store.count()


@pytest.mark.slow
def test_http_upsert_respects_the_servers_max_batch_size(chroma_server, tmp_path):
    cfg = rag_cfg(tmp_path / "unused", vector_db_host="127.0.0.1", vector_db_port=chroma_server, collection="batches")
    store = VectorStore.open(cfg, MODEL, 384)
    limit = store.max_batch_size
    assert limit == store._client.get_max_batch_size() > 0  # what the server announces
    n = limit + 3
    vecs = np.random.default_rng(2).normal(size=(n, 384)).astype(np.float32)
    store.upsert([Chunk(f"b{i}", f"text {i}", {"doc_id": f"d{i}"}) for i in range(n)], vecs)
    assert store.count() == n


def test_unreachable_server_is_a_clear_error(tmp_path):
    port = free_port()
    cfg = rag_cfg(tmp_path, vector_db_host="127.0.0.1", vector_db_port=port)
    with pytest.raises(DependencyUnavailableError, match=rf"Chroma server at http://127.0.0.1:{port} is unreachable"):
        VectorStore.open(cfg, MODEL, 384)


def _start_chroma(port: int, data: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [_chroma_cli(), "run", "--path", str(data), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"ANONYMIZED_TELEMETRY": "False", "PATH": "/usr/bin:/bin"},
    )
    wait_http(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=60, proc=proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def test_rag_service_reports_chroma_down_and_recovers(tmp_path):
    """gRPC SearchLiterature in HttpClient mode: OK; Chroma stopped -> UNAVAILABLE/DEADLINE_EXCEEDED
    quickly with a clear message (never hangs); Chroma back on the same port and path -> OK again."""
    import time

    import grpc

    from cxr_protos.rag.v1 import rag_service_pb2 as pb
    from cxr_protos.rag.v1 import rag_service_pb2_grpc as pb_grpc
    from cxr_rag.config import rag_config
    from cxr_rag.service import build_binding
    from tests.support.servers import auth, make_settings, running_server

    port, data = free_port(), tmp_path / "chroma"
    proc = _start_chroma(port, data)
    try:
        section = {
            "vector_db_path": str(tmp_path / "unused"),
            "vector_db_host": "127.0.0.1",
            "vector_db_port": port,
            "documents_path": str(subset_corpus(20)),
        }
        settings = make_settings(models={"rag": section})
        binding = build_binding(settings, rag_config(settings, environ={}))
        request = pb.SearchLiteratureRequest(query="Is intubation impaired in the helicopter?", top_k=2)
        async with (
            running_server(settings, binding) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = pb_grpc.RagServiceStub(ch)
            assert (await stub.SearchLiterature(request, metadata=auth(), timeout=20)).passages

            _stop(proc)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SearchLiterature(request, metadata=auth(), timeout=20)
            took = time.monotonic() - t0
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert f"Chroma server at http://127.0.0.1:{port} is unreachable" in (err.value.details() or "")
            assert took < 10, took  # the service answers, the client deadline is not what ends the call

            proc = _start_chroma(port, data)
            deadline, last = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                try:
                    reply = await stub.SearchLiterature(request, metadata=auth(), timeout=20)
                    break
                except grpc.aio.AioRpcError as exc:
                    last = exc
                    await asyncio.sleep(0.5)
            else:
                pytest.fail(f"no recovery after Chroma came back: {last}")
            assert reply.passages
    finally:
        _stop(proc)
