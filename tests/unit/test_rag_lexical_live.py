"""The live BM25 index (cxr_rag.lexical): additions, deletions, replacements and background merges
score exactly as bm25s built from scratch over the chunks that remain; an addition tokenizes only
its own chunks; searches read whole snapshots while writers change the index."""

from __future__ import annotations

import json
import random
import threading

import bm25s
import numpy as np
import pytest

from cxr_rag.lexical import LexicalIndex, tokenize
from cxr_rag.store import StoredChunk
from tests.support.paths import PUBMEDQA


def corpus(n: int) -> list[StoredChunk]:
    out = []
    with (PUBMEDQA / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out.append(StoredChunk(rec["id"], rec["text"], {"pmid": rec["pmid"], "section": rec["section"]}))
            if len(out) >= n:
                return out
    return out


def questions(n: int) -> list[str]:
    lines = (PUBMEDQA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["question"] for line in lines[:n]]


def fresh_scores(chunks: list[StoredChunk], query: str) -> dict[str, float]:
    ref = bm25s.BM25()
    ref.index(tokenize([c.text for c in chunks]), show_progress=False)
    terms = [t for t in tokenize([query])[0] if t in ref.vocab_dict]
    scores = ref.get_scores(terms) if terms else np.zeros(len(chunks))
    return {c.id: float(s) for c, s in zip(chunks, scores, strict=True) if s > 0}


def test_live_changes_score_as_a_fresh_index():
    rng = random.Random(0)
    chunks = corpus(420)
    index = LexicalIndex(chunks[:300], max_segments=4)
    live = {c.id: c for c in chunks[:300]}
    for s in range(300, 420, 10):  # twelve additions: more segments than max_segments, so merges run
        index.add(chunks[s : s + 10])
        live.update((c.id, c) for c in chunks[s : s + 10])
        gone = rng.sample(sorted(live), 3)
        index.remove(gone)
        for g in gone:
            del live[g]
    replaced = [StoredChunk(i, live[i].text + " Pneumothorax was seen.", {"new": "1"}) for i in sorted(live)[:5]]
    index.add(replaced)  # re-ingest: same ids, new text
    live.update((c.id, c) for c in replaced)
    index.wait_merges()
    assert index.merges >= 1 and index.segments <= 4
    assert len(index) == len(live) == 420 - 36
    final = list(live.values())
    for q in [*questions(25), "pneumothorax"]:
        want = fresh_scores(final, q)
        got = {h.chunk.id: h.score for h in index.search(q, 10)}
        top = sorted(want.values(), reverse=True)[:10]
        assert sorted(got.values(), reverse=True) == pytest.approx(top, rel=1e-4), q
        for cid, score in got.items():
            assert score == pytest.approx(want[cid], rel=1e-4), (q, cid)
    hits = index.search("pneumothorax", 50)
    assert {h.chunk.id for h in hits} >= {c.id for c in replaced}
    assert all(h.chunk.metadata == {"new": "1"} for h in hits if h.chunk.id in {c.id for c in replaced})
    filtered = index.search("pneumothorax", 50, {"new": "1"})
    assert {h.chunk.id for h in filtered} == {c.id for c in replaced}


def test_an_addition_tokenizes_only_its_own_chunks():
    chunks = corpus(301)
    index = LexicalIndex(chunks[:300])
    assert index.tokenized == 300 and index.segments == 1
    index.add(chunks[300:])
    assert index.tokenized == 301 and index.segments == 2 and len(index) == 301
    index.remove([chunks[0].id, "no-such-id"])
    assert index.tokenized == 301 and len(index) == 300
    assert all(h.chunk.id != chunks[0].id for h in index.search(chunks[0].text[:200], 300))


def test_searches_read_whole_snapshots_while_writers_change_the_index():
    """A writer keeps adding and removing one marked chunk; each search sees it with the corpus
    statistics of the same snapshot (its score is one of the two exact values), never an error."""
    chunks = corpus(200)
    marked = StoredChunk("marked", "quokka xylograph tracheostomy", {})
    index = LexicalIndex(chunks, max_segments=2)
    with_marked = fresh_scores([*chunks, marked], "quokka")["marked"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(300):
                if stop.is_set():
                    return
                index.add([marked])
                index.remove(["marked"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen = set()
    for _ in range(300):
        hits = index.search("quokka", 5)
        assert [h.chunk.id for h in hits] in ([], ["marked"])
        if hits:
            assert hits[0].score == pytest.approx(with_marked, rel=1e-4)
        seen.add(bool(hits))
    stop.set()
    t.join(30)
    index.wait_merges()
    assert not errors and not t.is_alive()
