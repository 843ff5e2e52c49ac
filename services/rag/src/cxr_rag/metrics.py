"""RAG metrics on the shared registry: the deployment guide's cxr_inference_* names with model labels
`retrieval:<mode>` and `llm:<model>`, plus store size and LLM failures by reason."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from cxr_serving.metrics import INFERENCE_DURATION, INFERENCE_TOTAL, MODEL_LOADED

CHUNKS = Gauge("cxr_rag_chunks", "Chunks in the literature store (after start and each ingestion)")
LLM_ERRORS = Counter("cxr_rag_llm_errors_total", "Failed LLM calls by reason", ["reason"])
REFUSALS = Counter("cxr_rag_no_relevant_total", "Questions answered with 'nothing relevant found'")


def observe(model: str, seconds: float) -> None:
    INFERENCE_TOTAL.labels(model).inc()
    INFERENCE_DURATION.labels(model).observe(seconds)


def set_ready(ready: bool, chunks: int) -> None:
    MODEL_LOADED.labels("rag").set(1 if ready else 0)
    CHUNKS.set(chunks)
