"""The scale corpus generator (bench/rag_corpus.py) and the quality metrics of bench/rag_scale.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.rag_corpus import DISTRACTOR_SOURCE, eval_gold_ids, load_sources, normalise, sentences, write_corpus
from bench.rag_scale import exact_dense_quality, exact_top, passages_of, quality, split_questions, weighted_rrf
from cxr_rag.retrieval import Passage, rrf_fuse

N = 3700  # the 2,696 gold passages and about a thousand distractors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rag-corpus") / "corpus.jsonl"
    write_corpus(N, 11, out, progress=False)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_fixed_by_its_seed(corpus: Path, tmp_path: Path) -> None:
    write_corpus(N, 11, tmp_path / "again.jsonl", progress=False)
    write_corpus(N, 12, tmp_path / "other.jsonl", progress=False)
    assert (tmp_path / "again.jsonl").read_bytes() == corpus.read_bytes()
    assert (tmp_path / "other.jsonl").read_bytes() != corpus.read_bytes()
    manifest = json.loads(corpus.with_suffix(".manifest.json").read_text())
    assert manifest["seed"] == 11 and manifest["passages"] == N
    assert "## Method" in (corpus.parent / "README.md").read_text()


def test_a_smaller_corpus_is_a_prefix_of_a_larger_one(corpus: Path, tmp_path: Path) -> None:
    """What lets a store built for N be copied and extended to a larger N (ingestion skips stored chunks)."""
    write_corpus(N - 500, 11, tmp_path / "small.jsonl", progress=False)
    small = (tmp_path / "small.jsonl").read_text(encoding="utf-8").splitlines()
    assert small == corpus.read_text(encoding="utf-8").splitlines()[: N - 500]


def test_n_passages_with_every_gold_passage_exactly_once(corpus: Path) -> None:
    recs = _records(corpus)
    gold = eval_gold_ids()
    ids = [r["id"] for r in recs]
    assert len(recs) == N and len(set(ids)) == N
    assert sorted(i for i in ids if i in gold) == sorted(gold)
    distractors = [r for r in recs if r["id"] not in gold]
    assert len(distractors) == N - len(gold) and all(r["source"] == DISTRACTOR_SOURCE for r in distractors)
    with pytest.raises(SystemExit, match="smaller than"):
        write_corpus(len(gold) - 1, 11, corpus.with_name("small.jsonl"), progress=False)


def test_no_gold_sentence_in_any_distractor(corpus: Path) -> None:
    src = load_sources()
    gold_sents = src.gold_sentences
    material = {normalise(s) for m in src.material for s in m}
    raw = [r["text"] for r in _records(corpus) if r.get("source") == DISTRACTOR_SOURCE]
    pieces = {normalise(s) for t in raw for s in sentences(t)}
    texts = [normalise(t) for t in raw]
    assert not pieces & gold_sents
    assert len(pieces & material) > 0.9 * len(pieces)  # recombined from the material, not invented
    blob = "\n".join(texts)
    long_gold = [s for s in gold_sents if len(s) >= 40 and s not in material]
    assert len(long_gold) > 5000
    assert [s for s in long_gold if s in blob] == []


def test_quality_on_a_known_case() -> None:
    qrels = {"1": {"a"}, "2": {"b", "c"}, "3": {"z"}}
    rankings = {"1": ["a", "x"], "2": ["x", "y", "c", "b"], "3": ["x", "y"]}
    got = quality(rankings, qrels, ks=(1, 3))
    assert got == {"recall@1": round(1 / 3, 4), "recall@3": round(2 / 3, 4), "mrr": round((1 + 1 / 3) / 3, 4)}


def test_chunks_map_to_passages_once_in_rank_order() -> None:
    ranking = [("c1", {"doc_id": "p1"}), ("c2", {"doc_id": "p2"}), ("c3", {"doc_id": "p1"}), ("c4", {})]
    assert passages_of(ranking) == ["p1", "p2", "c4"]


def test_weighted_rrf_with_equal_weights_ranks_as_the_service_fusion() -> None:
    dense = ["a", "b", "c", "d"]
    lexical = ["c", "e", "a", "f"]
    service = rrf_fuse(
        [
            [Passage(p, "", {}, dense_rank=r) for r, p in enumerate(dense, 1)],
            [Passage(p, "", {}, lexical_rank=r) for r, p in enumerate(lexical, 1)],
        ],
        10,
        60,
    )
    assert weighted_rrf([dense, lexical], [1, 1], 60) == [p.id for p in service]
    assert weighted_rrf([dense, lexical], [1, 0], 60)[:4] == dense


def test_tune_and_test_halves_are_disjoint_and_cover_all() -> None:
    qids = [str(i) for i in range(100, 140)]
    tune, test = split_questions(qids)
    assert not set(tune) & set(test) and sorted(tune + test) == sorted(qids) and len(tune) == len(test) == 20


def test_exact_top_is_the_brute_force_order_across_query_blocks() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    want = np.argsort(-(queries @ matrix.T), axis=1)[:, :10].tolist()
    assert exact_top(matrix, queries, 10, block=3) == want


def test_exact_top_takes_every_row_of_a_small_store_and_orders_ties_by_row() -> None:
    matrix = np.array([[0.5, 0.0], [1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    assert exact_top(matrix, queries, 3) == [[1, 0, 2]]
    assert exact_top(matrix, queries, 50) == [[1, 0, 2]]


def test_exact_dense_quality_ranks_passages_of_the_nearest_chunks() -> None:
    class Embedder:
        def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
            return np.array([[1.0, 0.0]], dtype=np.float32)[: len(texts)]

    class Cfg:
        candidates = 3

    class Runtime:
        embedder = Embedder()
        cfg = Cfg()

    # two chunks of passage a, then c: c is the second passage (MRR 0.5) only if a's chunks count once
    matrix = np.array([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0]], dtype=np.float32)
    vectors = (["a#0", "a#1", "c#0"], ["a", "a", "c"], matrix)
    got = exact_dense_quality(Runtime(), vectors, [{"qid": "1", "question": "x"}], {"1": {"c"}})
    assert got["recall@1"] == 0.0 and got["mrr"] == 0.5
