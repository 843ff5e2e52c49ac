"""bench/rag_memory.py: its stand-in vectors and the chunks its BM25-only measurement indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.rag_corpus import write_corpus
from bench.rag_memory import corpus_chunks, stand_in_vectors
from cxr_rag.chunking import chunk_document
from cxr_rag.embeddings import default_model_path, load_tokenizer
from cxr_rag.ingest import read_documents


def test_stand_in_vectors_are_unit_length_and_fixed_by_the_chunk_id() -> None:
    a = stand_in_vectors(["x", "y", "x"])
    assert a.shape == (3, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.array_equal(a[0], a[2]) and not np.allclose(a[0], a[1])


def test_the_bm25_only_chunks_are_those_the_service_stores_for_one_window_passages(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(2800, 3, corpus, progress=False)
    tokenizer = load_tokenizer(default_model_path())
    ours = list(corpus_chunks(corpus, 2800))
    one_window = 0
    for doc, got in zip(read_documents(corpus), ours, strict=True):
        (want, *more) = chunk_document(doc, tokenizer, 200, 40)
        if more:
            continue
        one_window += 1
        assert (got.id, got.text, got.metadata) == (want.id, want.text, want.metadata)
    assert one_window > 2500
