"""RAG building blocks without a store: chunking, BM25 tokens, fusion, <think> splitting,
citations, budgets, config."""

from __future__ import annotations

import pytest

from cxr_rag.chunking import Document, chunk_document, token_windows
from cxr_rag.config import RagConfig, rag_config
from cxr_rag.embeddings import default_model_path, load_tokenizer
from cxr_rag.lexical import s_stem, tokenize
from cxr_rag.llm import ThinkSplitter, normalise_base_url, split_reasoning
from cxr_rag.pipeline import build_messages, fit_budget, parse_citations, split_sentences
from cxr_rag.retrieval import Passage, rrf_fuse
from cxr_serving.errors import ConfigError
from tests.support.servers import make_settings


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def test_token_windows_overlap_and_exact_slices(tok):
    text = " ".join(f"word{i}" for i in range(300))
    windows = token_windows(text, tok, chunk_tokens=50, overlap=10)
    assert len(windows) > 5
    for w in windows:
        assert w in text  # exact slices of the source, no detokenisation artefacts
        assert len(tok.encode(w, add_special_tokens=False).ids) <= 50
    # consecutive windows share text (the overlap)
    a, b = windows[0].split(), windows[1].split()
    assert set(a) & set(b)
    assert windows[-1].endswith("word299")


def test_short_text_is_one_chunk_and_ids_are_stable(tok):
    doc = Document(key="d1", text="Short passage.", title="T", source="S", metadata={"section": "RESULTS"})
    c1 = chunk_document(doc, tok, 200, 40)
    c2 = chunk_document(doc, tok, 200, 40)
    assert len(c1) == 1 and c1[0].id == c2[0].id
    assert c1[0].metadata == {
        "section": "RESULTS",
        "doc_id": "d1",
        "title": "T",
        "source": "S",
        "chunk": "0",
        "chunks": "1",
    }
    other = chunk_document(Document(key="d2", text="Short passage."), tok, 200, 40)
    assert other[0].id != c1[0].id  # same text in another document is another chunk


def test_s_stemmer_and_tokens():
    assert s_stem("patients") == "patient"
    assert s_stem("studies") == "study"
    assert s_stem("virus") == "virus"
    assert tokenize(["The Patients' studies of the lungs"]) == [["patient", "study", "lung"]]


def test_rrf_fusion_rewards_agreement():
    a = [Passage("x", "", {}, dense_rank=1), Passage("y", "", {}, dense_rank=2)]
    b = [Passage("y", "", {}, lexical_rank=1), Passage("z", "", {}, lexical_rank=2)]
    fused = rrf_fuse([a, b], k=3, rrf_k=60)
    assert [p.id for p in fused] == ["y", "x", "z"]
    assert fused[0].dense_rank == 2 and fused[0].lexical_rank == 1
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)


@pytest.mark.parametrize("think_open", [False, True])
def test_think_splitter_handles_tags_split_across_chunks(think_open):
    text = ("<think>" if not think_open else "") + "step one, step two</think>\n\nThe answer [1]."
    for size in (1, 2, 3, 5, 7, 100):
        sp = ThinkSplitter(think_open)
        parts = []
        for i in range(0, len(text), size):
            parts += sp.feed(text[i : i + size])
        parts += sp.finish()
        reasoning = "".join(d.text for d in parts if d.kind == "reasoning")
        answer = "".join(d.text for d in parts if d.kind == "answer")
        assert reasoning == "step one, step two", size
        assert answer == "The answer [1].", size


def test_split_reasoning_without_think():
    assert split_reasoning("plain answer [2]") == ("", "plain answer [2]")
    assert split_reasoning("  <thinker> is a word", False) == ("", "<thinker> is a word")
    # a template-opened think block that is never closed: the text is the answer
    assert split_reasoning("no tags at all", True) == ("", "no tags at all")


@pytest.mark.parametrize(
    ("think_open", "text", "reasoning", "answer"),
    [
        # the model opened <think> itself and ran out of tokens inside it: reasoning only, no answer
        (False, "<think>I would cite [1] and [2", "I would cite [1] and [2", ""),
        (True, "<think>I would cite [1] and [2", "I would cite [1] and [2", ""),
        # the template opened it and the model wrote no tag at all: it did not think, all is the answer
        (True, "Passage [1] says so; see [7].", "", "Passage [1] says so; see [7]."),
    ],
)
def test_unclosed_think_streamed_or_not_gives_the_same_answer(think_open, text, reasoning, answer):
    assert split_reasoning(text, think_open) == (reasoning, answer)
    for size in (1, 4, 100):
        sp = ThinkSplitter(think_open)
        parts = [d for i in range(0, len(text), size) for d in sp.feed(text[i : i + size])] + sp.finish()
        assert "".join(d.text for d in parts if d.kind == "answer").strip() == answer, size
        if not sp.fell_back:
            assert "".join(d.text for d in parts if d.kind == "reasoning") == reasoning, size


def test_citations_map_and_drop_out_of_range():
    ps = [Passage(f"p{i}", "t", {"title": f"T{i}", "source": f"S{i}"}) for i in range(1, 4)]
    cites = parse_citations("A [2]. B [1, 3]. C [2]. D [9].", ps)
    assert [(c.number, c.passage.id) for c in cites] == [(2, "p2"), (1, "p1"), (3, "p3")]


def test_budget_and_prompt(tok):
    ps = [Passage(f"p{i}", "alpha beta gamma " * 30, {"title": "T", "source": "PMID:1"}) for i in range(10)]
    fitted = fit_budget(ps, tok, 200)
    assert 1 <= len(fitted) < 10
    n = sum(len(tok.encode(p.text, add_special_tokens=False).ids) for p in fitted)
    assert n <= 200
    assert len(fit_budget(ps, tok, 1)) == 1  # always at least one passage
    msgs = build_messages("Q?", fitted[:2])
    assert msgs[0]["role"] == "system" and "[n]" in msgs[1]["content"]
    assert "[1] (T; PMID:1)" in msgs[1]["content"] and "[2]" in msgs[1]["content"]


def test_sentences():
    assert split_sentences("First one. Second (n=3) here! Third? Ok.") == ["First one.", "Second (n=3) here!", "Third?"]


def test_config_guide_keys_and_env_short_names():
    s = make_settings(
        models={
            "rag": {
                "enabled": True,
                "model_name": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
                "vector_db_path": "/tmp/x",
                "documents_path": "/tmp/docs",
                "vector_db_host": "chroma",
                "vector_db_port": 8000,
            }
        }
    )
    cfg = rag_config(s, environ={})
    assert cfg.llm.mode == "extractive" and cfg.vector_db_host == "chroma"
    assert cfg.think_open_in_prompt  # R1 distill: the template opens <think>
    env = {"CXR_LLM_BASE_URL": "http://vllm:8000/v1", "CXR_LLM_MODEL": "my-model"}
    cfg = rag_config(s, environ=env)
    assert (cfg.llm.mode, cfg.llm.base_url, cfg.llm_model) == ("openai", "http://vllm:8000/v1", "my-model")
    assert not cfg.think_open_in_prompt
    cfg = rag_config(s, environ={**env, "CXR_LLM_MODE": "extractive"})
    assert cfg.llm.mode == "extractive"


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"chunk_tokens": 50, "chunk_overlap_tokens": 50}, "chunk_overlap_tokens"),
        ({"llm": {"mode": "openai"}}, "base_url"),
        ({"top_k": 0}, "models.rag.top_k"),
        ({"unknown_key": 1}, "models.rag.unknown_key"),
    ],
)
def test_config_errors_name_the_field(section, field):
    with pytest.raises(ConfigError, match=field):
        rag_config(make_settings(models={"rag": section}), environ={})


def test_base_url_normalised():
    assert normalise_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalise_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert RagConfig().embedding_name == "sentence-transformers/all-MiniLM-L6-v2"


def test_template_opened_think_drops_a_repeated_open_tag():
    assert split_reasoning("<think>why</think>\nanswer [1]", think_open=True) == ("why", "answer [1]")
    assert split_reasoning("why</think>answer", think_open=True) == ("why", "answer")
