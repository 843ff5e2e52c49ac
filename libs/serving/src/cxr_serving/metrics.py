"""Prometheus metrics with the deployment guide's names, registered once per process, so dashboards
built on the guide keep working.

The guide's names: cxr_inference_total{model}, cxr_inference_duration_seconds{model},
cxr_model_loaded{model}, cxr_gpu_memory_used_bytes. Added: request latency and count by
method and status code, batch size histogram, queue depth, shed requests, requests queued by priority,
requests whose deadline passed in the queue, instance restarts.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cxr_serving.batcher import BatchObserver
from cxr_serving.urgency import Priority

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

INFERENCE_TOTAL = Counter("cxr_inference_total", "Images (or questions) run through a model", ["model"])
INFERENCE_DURATION = Histogram(
    "cxr_inference_duration_seconds", "Forward-pass time of one batch", ["model"], buckets=_LATENCY_BUCKETS
)
MODEL_LOADED = Gauge("cxr_model_loaded", "1 when the model is loaded and ready", ["model"])
GPU_MEMORY = Gauge("cxr_gpu_memory_used_bytes", "GPU memory allocated by this process (0 without a GPU)")
BATCH_SIZE = Histogram(
    "cxr_batch_size", "Requests per forward pass", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
QUEUE_DEPTH = Gauge("cxr_queue_depth", "Requests waiting for a batch", ["model"])
SHED_TOTAL = Counter("cxr_requests_shed_total", "Requests refused with RESOURCE_EXHAUSTED", ["model"])
QUEUED_BY_PRIORITY = Counter(
    "cxr_requests_queued_total",
    "Requests queued for a model's batches, by priority (stat, routine)",
    ["model", "priority"],
)
EXPIRED_IN_QUEUE = Counter(
    "cxr_requests_expired_in_queue_total",
    "Requests whose deadline passed while they waited for a batch: answered DEADLINE_EXCEEDED, never run",
    ["model"],
)
BATCH_ERRORS = Counter("cxr_batch_errors_total", "Forward passes that raised", ["model"])
MODEL_INSTANCE_RESTARTS = Counter(
    "cxr_model_instance_restarts_total", "Model instance processes that died and were restarted", ["model"]
)
FRONTEND_RESTARTS = Counter(
    "cxr_frontend_restarts_total", "Frontend processes that died and were restarted (frontend_processes > 1)"
)
FRONTEND_PROCESSES = Gauge("cxr_frontend_processes", "Frontend processes running (frontend_processes > 1)")
RUNTIME_EXPORTS = Counter(
    "cxr_model_runtime_exports_total",
    "Networks exported (and quantized) into the model-runtime cache; a load that reuses the cache adds none",
    ["model", "backend", "precision"],
)
RUNTIME_CHECK = Gauge(
    "cxr_model_runtime_check",
    "The load-time accuracy check of an optimised runtime against float32 torch (metric: max_abs_delta_p, "
    "min_call_agreement, min_class_dice, mean_dice)",
    ["model", "backend", "precision", "metric"],
)
RUNTIME_FALLBACK = Gauge(
    "cxr_model_runtime_fallback", "1 when the configured runtime could not serve and torch does", ["model"]
)
REQUESTS_TOTAL = Counter("cxr_grpc_requests_total", "gRPC requests by method and status", ["method", "code"])
REQUEST_DURATION = Histogram(
    "cxr_grpc_request_duration_seconds",
    "gRPC request latency by method and status",
    ["method", "code"],
    buckets=_LATENCY_BUCKETS,
)
# versions side by side (versions.py): which version answered, and how a shadowed candidate disagrees
VERSION_REQUESTS = Counter(
    "cxr_model_version_requests_total",
    "Requests answered by each loaded version, by how the version was chosen (pinned, canary, serving)",
    ["model", "version", "route"],
)
VERSION_DURATION = Histogram(
    "cxr_model_version_request_duration_seconds",
    "Batch wait plus forward of one request, by the version that answered it",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
SHADOW_REQUESTS = Counter(
    "cxr_shadow_requests_total", "Requests run on a shadow candidate and compared", ["model", "version"]
)
SHADOW_DROPPED = Counter(
    "cxr_shadow_dropped_total", "Shadow runs dropped because the candidate was busy or failed", ["model", "version"]
)
SHADOW_DELTA = Histogram(
    "cxr_shadow_probability_delta",
    "|serving - candidate| probability of one finding on one shadowed request",
    ["model", "version", "finding"],
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
)
SHADOW_FLIPS = Counter(
    "cxr_shadow_flips_total",
    "Shadowed requests whose decision on a finding differs between serving and candidate "
    "(flip rate: this over cxr_shadow_requests_total)",
    ["model", "version", "finding"],
)
MODEL_MEMORY = Gauge(
    "cxr_model_memory_bytes",
    "Parameter and buffer bytes of each loaded version, by device type",
    ["model", "version", "device"],
)


def _gpu_memory_bytes() -> float:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to report 0
    if torch is None or not torch.cuda.is_available():
        return 0.0
    return float(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))


GPU_MEMORY.set_function(_gpu_memory_bytes)

_pixel_kernels_gauge: Gauge | None = None


def publish_pixel_kernels() -> None:
    """Register `cxr_pixel_kernels_built` (once per process), in the services that decode images only."""
    global _pixel_kernels_gauge
    if _pixel_kernels_gauge is not None:
        return
    _pixel_kernels_gauge = Gauge(
        "cxr_pixel_kernels_built",
        "1 when the C image kernels (cxr_serving._pixels) serve; 0: PNG decoding and preprocessing take the "
        "OpenCV / torch fallbacks",
    )
    _pixel_kernels_gauge.set_function(_pixel_kernels_built)


def _pixel_kernels_built() -> float:
    from cxr_serving import pixel_kernels  # at scrape time: importing the decoders is not this module's job

    return 0.0 if pixel_kernels.missing() else 1.0


class MetricsObserver(BatchObserver):
    """Feeds batcher events into the metrics above."""

    def on_queue_depth(self, model: str, depth: int) -> None:
        QUEUE_DEPTH.labels(model).set(depth)

    def on_batch(self, model: str, size: int, seconds: float, ok: bool) -> None:
        BATCH_SIZE.labels(model).observe(size)
        INFERENCE_DURATION.labels(model).observe(seconds)
        if ok:
            INFERENCE_TOTAL.labels(model).inc(size)
        else:
            BATCH_ERRORS.labels(model).inc()

    def on_shed(self, model: str) -> None:
        SHED_TOTAL.labels(model).inc()

    def on_submit(self, model: str, priority: Priority) -> None:
        QUEUED_BY_PRIORITY.labels(model, priority.value).inc()

    def on_expired(self, model: str) -> None:
        EXPIRED_IN_QUEUE.labels(model).inc()


class MetricsServer:
    """The /metrics HTTP endpoint on its own port (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
