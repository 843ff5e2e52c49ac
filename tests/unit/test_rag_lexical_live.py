"""The live BM25 index (cxr_rag.lexical): additions, deletions, replacements and background merges
score exactly as bm25s built from scratch over the chunks that remain; an addition tokenizes only
its own chunks; searches read whole snapshots while writers change the index."""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import threading
import tracemalloc
import weakref

import bm25s
import numpy as np
import pytest

from cxr_rag import lexical
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


def _vocabulary_bytes(index: LexicalIndex) -> int:
    return sys.getsizeof(index._vocab) + sum(sys.getsizeof(w) for w in index._vocab)


def test_the_index_holds_at_most_400_bytes_per_chunk_besides_its_vocabulary():
    """Postings, lengths, id hashes and record offsets are numpy arrays; text and metadata are on disk.
    The old index (a StoredChunk, its text, metadata dict and an id dict entry per chunk, float32 term
    counts) held 1,386 bytes per chunk here; measured with tracemalloc on the whole shared corpus, the
    chunks made inside the measurement and dropped by the caller."""
    LexicalIndex(iter(corpus(10)))  # bm25s's and the regex module's first-use caches are not the index's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = LexicalIndex(iter(corpus(4000)))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before - _vocabulary_bytes(index)
    finally:
        tracemalloc.stop()
    n = len(index)
    assert n > 3000
    assert held / n <= 400, f"{held / n:.0f} bytes per chunk"


def test_a_build_from_a_stream_keeps_no_chunk_objects_and_reads_a_batch_at_a_time():
    """What the service builds at start from the store's pages: at most BUILD_BATCH chunks are alive at
    once while it builds, none after (the old index kept every chunk object)."""
    base = corpus(3000)
    alive = 0
    most = 0

    def gone() -> None:
        nonlocal alive
        alive -= 1

    def stream():
        nonlocal alive, most
        for rep in range(7):
            for c in base:
                chunk = StoredChunk(f"{c.id}/{rep}", c.text, {**c.metadata, "rep": str(rep)})
                weakref.finalize(chunk, gone)
                alive += 1
                most = max(most, alive)
                yield chunk

    index = LexicalIndex(stream())
    gc.collect()
    assert alive == 0 and len(index) == 21000
    assert most <= lexical.BUILD_BATCH + 1 < 21000, most
    hit = index.search(base[5].text, 7, {"rep": "6"})[0]
    assert (hit.chunk.id, hit.chunk.text, hit.chunk.metadata) == (
        f"{base[5].id}/6",
        base[5].text,
        {**base[5].metadata, "rep": "6"},
    )


def test_every_chunk_reads_back_exactly_and_results_match_bm25s_on_the_shared_questions():
    """The whole shared corpus built from a stream: every chunk (id, text with its non-ASCII characters,
    metadata) reads back as given, and the top 10 of 100 questions score as bm25s from scratch."""
    chunks = corpus(4000)
    index = LexicalIndex(iter(chunks))
    got = index.chunks([c.id for c in reversed(chunks)])
    assert list(got) == [c.id for c in reversed(chunks)]
    assert all(got[c.id] == c for c in chunks)
    assert any(not c.text.isascii() for c in chunks)
    ref = bm25s.BM25()
    ref.index(tokenize([c.text for c in chunks]), show_progress=False)
    for q in questions(100):
        terms = [t for t in tokenize([q])[0] if t in ref.vocab_dict]
        scores = ref.get_scores(terms) if terms else np.zeros(len(chunks))
        want = sorted(((float(s), c.id) for s, c in zip(scores, chunks, strict=True) if s > 0), reverse=True)[:10]
        hits = index.search(q, 10)
        assert [h.score for h in hits] == pytest.approx([s for s, _ in want], rel=1e-5), q
        assert {h.chunk.id for h in hits} >= {i for s, i in want if s > want[-1][0] * (1 + 1e-5)}, q


def test_an_id_given_twice_in_a_stream_counts_once_and_the_last_wins():
    chunks = corpus(50)
    again = StoredChunk(chunks[3].id, "quokka xylograph", {"v": "2"})
    index = LexicalIndex(iter([*chunks, again]))
    assert len(index) == 50
    assert [h.chunk for h in index.search("quokka", 5)] == [again]
    assert index.chunks([again.id]) == {again.id: again}
    assert index.search(chunks[3].text, 50, {"pmid": chunks[3].metadata["pmid"], "section": "x"}) == []


def test_deleted_and_replaced_chunks_stay_gone_after_merges():
    chunks = corpus(400)
    index = LexicalIndex(chunks[:100], max_segments=2)
    for s in range(100, 400, 50):
        index.add(chunks[s : s + 50])
    gone = [c.id for c in chunks[::7]]
    index.remove(gone)
    index.add([StoredChunk(chunks[1].id, "quokka", {"v": "new"})])
    for s in range(0, 3):
        index.add([StoredChunk(f"extra-{s}", "tracheostomy quokka", {})])
    index.wait_merges()
    assert index.merges >= 1 and len(index) == 400 - len(gone) + 3
    assert index.chunks(gone) == {}
    assert all(h.chunk.id not in set(gone) for c in chunks[::7][:20] for h in index.search(c.text, 20))
    assert index.chunks([chunks[1].id])[chunks[1].id].metadata == {"v": "new"}
    assert {h.chunk.id for h in index.search("quokka", 10)} == {chunks[1].id, "extra-0", "extra-1", "extra-2"}


def _open_files_under(directory) -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(
        1
        for fd in fds
        if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    )


def test_each_segment_keeps_one_records_file_and_a_merged_segment_lets_go_of_its_own(tmp_path):
    """Records live in unlinked files under `records_dir`, one per segment: merges do not leak files."""
    chunks = corpus(300)
    index = LexicalIndex(chunks[:100], max_segments=2, records_dir=tmp_path)
    for s in range(100, 300, 20):
        index.add(chunks[s : s + 20])
    index.wait_merges()
    gc.collect()
    assert index.merges >= 1 and list(tmp_path.iterdir()) == []
    assert _open_files_under(tmp_path) == index.segments <= 2
    assert index.chunks([chunks[150].id]) == {chunks[150].id: chunks[150]}


def test_a_word_repeated_more_than_255_times_keeps_its_exact_count_through_merges():
    """Term counts are uint8 unless a segment needs more: a chunk saying one word 300 times and one saying
    it twice, in separate segments then merged, score as bm25s scores them."""
    chunks = corpus(60)
    loud = StoredChunk("loud", "quokka " * 300, {})
    quiet = StoredChunk("quiet", "quokka quokka tracheostomy", {})
    index = LexicalIndex(chunks[:30], max_segments=2)
    index.add([quiet])
    index.add([loud])
    index.add(chunks[30:])
    index.wait_merges()
    assert index.merges >= 1
    want = fresh_scores([*chunks, quiet, loud], "quokka")
    got = {h.chunk.id: h.score for h in index.search("quokka", 5)}
    assert got == pytest.approx(want, rel=1e-5) and set(got) == {"loud", "quiet"}
    assert got["loud"] > got["quiet"]
