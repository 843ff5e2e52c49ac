"""`models.rag.hnsw` reaches Chroma: the collection is created with those HNSW settings, as read back from
Chroma's own database file, and ef_search follows the configuration on every open."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_rag.store import VectorStore
from tests.support.rag import rag_cfg

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _persisted_hnsw(store_dir: Path, collection: str) -> dict:
    """The HNSW settings of `collection` as Chroma wrote them to chroma.sqlite3 (its schema's embedding index)."""
    with sqlite3.connect(store_dir / "chroma.sqlite3") as db:
        (schema,) = db.execute("select schema_str from collections where name = ?", (collection,)).fetchone()
    index = json.loads(schema)["keys"]["#embedding"]["float_list"]["vector_index"]["config"]
    return {"space": index["space"], **index["hnsw"]}


def _reopened_elsewhere(store_dir: Path, collection: str) -> dict:
    """The collection's configuration as a fresh process's Chroma client reads it."""
    code = (
        "import chromadb, json, sys; from chromadb.config import Settings;"
        "c = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False));"
        "print(json.dumps(c.get_collection(sys.argv[2]).configuration['hnsw']))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store_dir), collection], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hnsw_settings_are_applied_to_the_collection(tmp_path: Path) -> None:
    cfg = rag_cfg(tmp_path, collection="hnsw_set", hnsw={"m": 24, "ef_construction": 150, "ef_search": 77})
    store = VectorStore.open(cfg, MODEL, 384)
    want = {"space": "cosine", "max_neighbors": 24, "ef_construction": 150, "ef_search": 77}
    assert {k: store.hnsw()[k] for k in want} == want
    assert {k: _persisted_hnsw(tmp_path, "hnsw_set")[k] for k in want} == want
    assert {k: _reopened_elsewhere(tmp_path, "hnsw_set")[k] for k in want} == want


def test_ef_search_follows_the_config_on_reopen_and_fixed_settings_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    VectorStore.open(rag_cfg(tmp_path, collection="hnsw_re", hnsw={"m": 24, "ef_search": 64}), MODEL, 384)
    with caplog.at_level(logging.WARNING, logger="cxr_rag.store"):
        again = VectorStore.open(rag_cfg(tmp_path, collection="hnsw_re", hnsw={"m": 32, "ef_search": 200}), MODEL, 384)
    assert again.hnsw()["ef_search"] == 200 and again.hnsw()["max_neighbors"] == 24
    assert _persisted_hnsw(tmp_path, "hnsw_re")["ef_search"] == 200
    assert "max_neighbors" in caplog.text and "fixed at creation" in caplog.text


def test_unknown_hnsw_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra"):
        rag_cfg(tmp_path, hnsw={"M": 16})
