"""`models.rag`: the RAG service's own config schema, validated through `Settings.model_section`.

The deployment guide's keys (`enabled`, `model_name`, `vector_db_path`, `documents_path`, and
`vector_db_host`/`vector_db_port` from `VECTOR_DB_HOST`/`VECTOR_DB_PORT`) plus the knobs of
the store, chunking, retrieval and the LLM client. Short environment variables for the LLM
(`CXR_LLM_BASE_URL`, `CXR_LLM_MODEL`, `CXR_LLM_API_KEY`, `CXR_LLM_MODE`) are applied by
`rag_config()`; every key is also reachable as `CXR_MODELS__RAG__<KEY>` /
`CXR_MODELS__RAG__LLM__<KEY>`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings

DEFAULT_LLM = "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RUNTIME_CACHE = Path("var/cache/model-runtimes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LlmConfig(_Strict):
    """The generator: vLLM's OpenAI-compatible API, or extractive answers without any LLM."""

    mode: Literal["extractive", "openai"] = Field(
        "extractive", description="'openai': call base_url; 'extractive': answer from retrieved sentences, no LLM"
    )
    base_url: str | None = Field(None, description="e.g. http://vllm:8000/v1 (CXR_LLM_BASE_URL)")
    model: str | None = Field(None, description="served model name; default: models.rag.model_name (CXR_LLM_MODEL)")
    api_key: str | None = Field(None, description="bearer token for the endpoint (CXR_LLM_API_KEY)")
    max_tokens: int = Field(512, ge=1, le=32768, description="answer length limit; a request may ask for another")
    temperature: float = Field(0.2, ge=0, le=2, description="sampling temperature; a request may ask for another")
    timeout_s: float = Field(
        120, gt=0, description="budget of one whole call: queueing, every attempt and backoff, the whole stream"
    )
    connect_timeout_s: float = Field(5, gt=0, description="time to open a connection to the endpoint")
    max_retries: int = Field(
        2, ge=0, le=10, description="retries on connection errors, 429 and 5xx, each only if its backoff ends in time"
    )
    backoff_initial_s: float = Field(0.5, ge=0, description="first retry delay (exponential, with jitter)")
    backoff_max_s: float = Field(8, ge=0, description="longest retry delay")
    max_concurrency: int = Field(8, ge=1, description="requests in flight to the LLM at once")
    think_open_in_prompt: bool | None = Field(
        None,
        description="the chat template opens <think> itself (DeepSeek-R1 on vLLM); None: guess from the model name",
    )
    system_prompt: str | None = Field(
        None,
        description="replaces the built-in system prompt (answer only from the numbered passages, cite them as [n])",
    )
    extractive_sentences: int = Field(3, ge=1, le=20, description="sentences in an extractive answer")

    @model_validator(mode="after")
    def _needs_url(self) -> LlmConfig:
        if self.mode == "openai" and not self.base_url:
            raise ValueError("llm.mode 'openai' needs llm.base_url (or CXR_LLM_BASE_URL)")
        return self


class HnswConfig(_Strict):
    """Chroma's HNSW index of the collection: graph degree and build effort are fixed when the collection is
    created; the search beam is applied on every open."""

    m: int = Field(16, ge=4, le=128, description="graph degree (Chroma max_neighbors); fixed at creation")
    ef_construction: int = Field(200, ge=8, le=2048, description="build beam; fixed at creation")
    ef_search: int = Field(
        1024,
        ge=8,
        le=4096,
        description=(
            "query beam: larger finds more of the exact nearest neighbours, slower; set on every open, but "
            "Chroma uses a changed value only for an index it loads afterwards: restart a `chroma run` server"
        ),
    )


class EmbeddingRuntimeConfig(_Strict):
    """What computes embeddings on the CPU: torch, or an OpenVINO / ONNX Runtime export of the model that
    must agree with torch at load (else torch serves, with the reason in the log and `cxr-rag stats`)."""

    backend: Literal["torch", "openvino", "onnxruntime"] = Field(
        "openvino", description="openvino (default), onnxruntime, or torch; on a GPU device torch serves"
    )
    precision: Literal["float32", "bfloat16", "int8"] = Field(
        "bfloat16",
        description="bfloat16 (openvino, on CPUs with native BF16), float32, or int8 (openvino: NNCF; "
        "onnxruntime: dynamic quantization)",
    )
    cache_dir: Path | None = Field(
        None,
        description="exports and torch's vectors of the check texts, kept by the model files' digest, backend, "
        "precision, check texts and library versions (default var/cache/model-runtimes under data_path)",
    )
    min_cosine: float = Field(
        0.99, gt=0, le=1, description="least cosine against torch on every held check text for the export to serve"
    )

    @model_validator(mode="after")
    def _supported(self) -> EmbeddingRuntimeConfig:
        if self.backend == "torch" and self.precision != "float32":
            raise ValueError("embedding_runtime: backend torch runs float32 only")
        if self.backend == "onnxruntime" and self.precision == "bfloat16":
            raise ValueError("embedding_runtime: ONNX Runtime's CPU provider has no bfloat16 kernels: use openvino")
        return self


class RagConfig(_Strict):
    """`models.rag`: the document store, chunking, hybrid retrieval and the LLM client of the RAG service."""

    enabled: bool = Field(True, description="false is refused at start: the rag service has nothing else to serve")
    model_name: str = Field(DEFAULT_LLM, description="the LLM served by vLLM (the deployment guide's key)")
    vector_db_path: Path = Field(Path("var/data/chroma_db"), description="embedded ChromaDB directory")
    vector_db_host: str | None = Field(None, description="Chroma server host: HttpClient mode (VECTOR_DB_HOST)")
    vector_db_port: int = Field(8000, ge=1, le=65535, description="Chroma server port (VECTOR_DB_PORT)")
    vector_db_ssl: bool = Field(False, description="https to the Chroma server")
    vector_db_auth_token: str | None = Field(None, description="Chroma server token (Authorization: Bearer)")
    hnsw: HnswConfig = Field(default_factory=HnswConfig, description="the vector index")  # type: ignore[arg-type]
    documents_path: Path | None = Field(None, description="ingested at start until one ingestion of it has completed")
    ingest_on_start: bool = Field(
        True, description="ingest documents_path at start (false: only IngestDocuments / cxr-rag ingest)"
    )
    collection: str = Field("medical_literature", min_length=3, max_length=512, description="Chroma collection name")
    embedding_model_path: Path | None = Field(
        None, description="sentence-transformers dir; default: the bundled MiniLM"
    )
    embedding_model_name: str | None = Field(None, description="recorded in the collection; default from the path")
    embedding_batch_size: int = Field(32, ge=1, le=4096, description="chunks embedded per batch while ingesting")
    ingest_window: int = Field(
        1024,
        ge=1,
        le=65536,
        description="chunks read, embedded in one call (sorted by length as one, so its batches pad little) and "
        "written at a time while ingesting; an interrupted ingestion redoes at most about three windows",
    )
    embedding_device: str = Field(
        "auto", description="device of the embedding model: auto (cuda when present, else cpu), cpu, cuda, ..."
    )
    embedding_runtime: EmbeddingRuntimeConfig = Field(
        default_factory=EmbeddingRuntimeConfig,  # type: ignore[arg-type]
        description="the CPU fast path of the embedder, checked against torch at load",
    )
    chunk_tokens: int = Field(200, ge=16, le=8192, description="chunk length in embedding-tokenizer tokens")
    chunk_overlap_tokens: int = Field(40, ge=0, description="tokens shared by consecutive chunks; below chunk_tokens")
    top_k: int = Field(5, ge=1, description="passages returned when a request does not say")
    max_top_k: int = Field(50, ge=1, description="largest top_k a request may ask for")
    candidates: int = Field(50, ge=1, description="hits taken from each retriever before fusion")
    rrf_k: int = Field(60, ge=1, description="reciprocal-rank fusion constant")
    min_relevance: float = Field(
        0.4, ge=-1, le=1, description="best dense cosine similarity below this: 'nothing relevant found'"
    )
    context_token_budget: int = Field(2500, ge=64, description="tokens of passages put into the prompt")
    max_documents_per_request: int = Field(1000, ge=1, description="IngestDocuments refuses larger requests")
    llm: LlmConfig = Field(default_factory=LlmConfig, description="the answer generator")  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _check(self) -> RagConfig:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be smaller than chunk_tokens")
        if self.top_k > self.max_top_k:
            raise ValueError("top_k must not exceed max_top_k")
        return self

    @property
    def llm_model(self) -> str:
        return self.llm.model or self.model_name

    @property
    def embedding_name(self) -> str:
        if self.embedding_model_name:
            return self.embedding_model_name
        if self.embedding_model_path is None:
            return DEFAULT_EMBEDDING_MODEL
        return self.embedding_model_path.name

    @property
    def think_open_in_prompt(self) -> bool:
        if self.llm.think_open_in_prompt is not None:
            return self.llm.think_open_in_prompt
        name = self.llm_model.lower()
        return "deepseek-r1" in name or "r1-distill" in name


_SHORT_ENV = {
    "CXR_LLM_BASE_URL": "base_url",
    "CXR_LLM_MODEL": "model",
    "CXR_LLM_API_KEY": "api_key",
    "CXR_LLM_MODE": "mode",
}


def rag_config(settings: Settings, environ: Mapping[str, str] | None = None) -> RagConfig:
    """`models.rag` validated, with the short CXR_LLM_* variables applied.

    `CXR_LLM_BASE_URL` also switches `llm.mode` to 'openai' (unless `CXR_LLM_MODE` says otherwise):
    setting it is an explicit request to use that endpoint.
    """
    env = os.environ if environ is None else environ
    raw = dict(settings.models.get("rag") or {})
    llm = dict(raw.get("llm") or {})
    for var, key in _SHORT_ENV.items():
        if env.get(var):
            llm[key] = env[var]
    if env.get("CXR_LLM_BASE_URL") and not env.get("CXR_LLM_MODE"):
        llm["mode"] = "openai"
    raw["llm"] = llm
    patched = settings.model_copy(update={"models": {**settings.models, "rag": raw}})
    cfg = patched.model_section("rag", RagConfig)
    if cfg is None:  # pragma: no cover - raw is never None here
        raise ConfigError("models.rag: missing")
    # relative data paths are under the top-level data_path (CXR_DATA_PATH), as checkpoints are under models_path
    docs = cfg.documents_path
    runtime = cfg.embedding_runtime
    cache = settings.resolve_data_path(runtime.cache_dir or DEFAULT_RUNTIME_CACHE)
    return cfg.model_copy(
        update={
            "vector_db_path": settings.resolve_data_path(cfg.vector_db_path),
            "documents_path": None if docs is None else settings.resolve_data_path(docs),
            "embedding_runtime": runtime.model_copy(update={"cache_dir": cache}),
        }
    )
