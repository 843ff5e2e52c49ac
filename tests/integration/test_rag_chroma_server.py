"""HttpClient mode: the store against a real `chroma run` server process on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_unreachable_server_is_a_clear_error(tmp_path):
    port = free_port()
    cfg = rag_cfg(tmp_path, vector_db_host="127.0.0.1", vector_db_port=port)
    with pytest.raises(DependencyUnavailableError, match=rf"Chroma server at http://127.0.0.1:{port} is unreachable"):
        VectorStore.open(cfg, MODEL, 384)
