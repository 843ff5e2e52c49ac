"""Prometheus metrics with the names of Kong's prometheus plugin (served on the status port)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_MS = (1, 2, 5, 7, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)


class GatewayMetrics:
    def __init__(self, per_consumer: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_consumer = per_consumer
        self.requests = Counter(
            "kong_http_requests_total",
            "HTTP/gRPC requests by service, route, status code and source (kong or upstream)",
            ["service", "route", "code", "source", "consumer"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kong_request_latency_ms",
            "Total latency of a request through the gateway, in ms",
            ["service", "route"],
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self.target_health = Gauge(
            "kong_upstream_target_health",
            "1 when the target is in this state",
            ["upstream", "target", "state"],
            registry=self.registry,
        )

    def request(self, service: str, route: str, code: int, source: str, consumer: str, started: float) -> None:
        self.requests.labels(service, route, str(code), source, consumer if self.per_consumer else "").inc()
        self.latency.labels(service, route).observe((time.perf_counter() - started) * 1000)

    def set_health(self, upstream: str, target: str, healthy: bool) -> None:
        self.target_health.labels(upstream, target, "healthy").set(1 if healthy else 0)
        self.target_health.labels(upstream, target, "unhealthy").set(0 if healthy else 1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
