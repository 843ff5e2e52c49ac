"""Backends: one gRPC channel per Kong service target, with Kong-style upstream health checks.

- targets come from the `upstreams` entity named by `service.host` (else `service.host:port`);
- active checks call `grpc.health.v1.Health/Check` every `healthy.interval` seconds while a target
  is healthy and every `unhealthy.interval` while it is not; `healthy.successes` consecutive
  SERVING answers make it healthy, `unhealthy.tcp_failures` / `timeouts` / `http_failures`
  (connection refused / deadline / any other answer) make it unhealthy;
- passive checks count connection failures and timeouts of proxied calls;
- with no healthy target a call fails fast with `BackendUnavailable` (→ 503 / UNAVAILABLE),
  and an active check brings the target back when the service returns;
- `protocol: grpcs` dials TLS (roots from `CXR_GATEWAY_BACKEND_CA_FILE` when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_gateway.kong_model import Healthchecks, KongConfig, Service
from cxr_gateway.transcoding import STATUS_DETAILS_KEY

log = logging.getLogger("cxr.gateway.upstreams")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]


class BackendUnavailable(Exception):
    """No healthy target, or the target refused the connection."""


def trailers(err: grpc.aio.AioRpcError) -> grpc.aio.Metadata | None:
    """The error's trailing metadata as grpc.aio returns it (grpc-stubs types it as the sync RpcError's tuple)."""
    return cast("grpc.aio.Metadata | None", err.trailing_metadata())


def is_connect_failure(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE raised by the channel itself (no server answered): no status-details trailer."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailing = trailers(err) or ()
    return not any(k == STATUS_DETAILS_KEY for k, _ in trailing)


@dataclass
class TargetState:
    address: str
    channel: grpc.aio.Channel
    healthy: bool = True
    successes: int = 0
    tcp_failures: int = 0
    timeouts: int = 0
    http_failures: int = 0
    last_error: str = ""

    def reset_counters(self) -> None:
        self.successes = self.tcp_failures = self.timeouts = self.http_failures = 0


@dataclass
class Backend:
    service: Service
    targets: list[TargetState]
    checks: Healthchecks | None
    upstream_name: str | None
    _rr: itertools.cycle[int] = field(init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._rr = itertools.cycle(range(len(self.targets)))

    @property
    def name(self) -> str:
        return self.service.name

    def describe(self) -> str:
        return ", ".join(t.address for t in self.targets)

    def pick(self) -> TargetState:
        for _ in range(len(self.targets)):
            t = self.targets[next(self._rr)]
            if t.healthy:
                return t
        reasons = "; ".join(f"{t.address}: {t.last_error or 'unhealthy'}" for t in self.targets)
        raise BackendUnavailable(f"backend '{self.name}' is unavailable: no healthy target ({reasons})")

    # ---- passive checks
    def record_success(self, t: TargetState) -> None:
        t.tcp_failures = t.timeouts = t.http_failures = 0

    def record_failure(self, t: TargetState, kind: str, error: str) -> None:
        t.last_error = error
        if self.checks is None:
            return
        u = self.checks.passive.unhealthy
        threshold = {"tcp": u.tcp_failures, "timeout": u.timeouts, "http": u.http_failures}[kind]
        self._count(t, kind, threshold)

    def _count(self, t: TargetState, kind: str, threshold: int) -> None:
        attr = {"tcp": "tcp_failures", "timeout": "timeouts", "http": "http_failures"}[kind]
        setattr(t, attr, getattr(t, attr) + 1)
        t.successes = 0
        if threshold and getattr(t, attr) >= threshold and t.healthy:
            t.healthy = False
            log.warning("target %s of %s marked unhealthy (%s)", t.address, self.name, t.last_error)

    # ---- active checks
    def start(self) -> None:
        if self.checks is None:
            return
        a = self.checks.active
        if a.healthy.interval or a.unhealthy.interval:
            self._task = asyncio.create_task(self._active_loop(), name=f"healthcheck-{self.name}")

    async def _active_loop(self) -> None:
        assert self.checks is not None
        a = self.checks.active
        while True:
            intervals = [a.healthy.interval if t.healthy else a.unhealthy.interval for t in self.targets]
            active = [i for i in intervals if i > 0]
            await asyncio.sleep(min(active) if active else 1.0)
            for t, interval in zip(self.targets, intervals, strict=True):
                if interval > 0:
                    await self.probe(t)

    async def probe(self, t: TargetState) -> bool:
        assert self.checks is not None
        a = self.checks.active
        stub = health_pb2_grpc.HealthStub(t.channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=a.timeout or None)
        except grpc.aio.AioRpcError as err:
            kind = "timeout" if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "tcp"
            if kind == "tcp" and not is_connect_failure(err):
                kind = "http"
            threshold = {"tcp": a.unhealthy.tcp_failures, "timeout": a.unhealthy.timeouts}.get(
                kind, a.unhealthy.http_failures
            )
            t.last_error = f"health check: {err.code().name} {err.details()}"
            self._count(t, kind, threshold)
            return False
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            t.last_error = f"health check: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
            self._count(t, "http", a.unhealthy.http_failures)
            return False
        t.tcp_failures = t.timeouts = t.http_failures = 0
        t.successes += 1
        if not t.healthy and a.healthy.successes and t.successes >= a.healthy.successes:
            t.healthy = True
            t.last_error = ""
            t.reset_counters()
            log.info("target %s of %s is healthy again", t.address, self.name)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in self.targets:
            await t.channel.close(grace=None)


def _credentials() -> grpc.ChannelCredentials:
    ca = os.environ.get("CXR_GATEWAY_BACKEND_CA_FILE")
    return grpc.ssl_channel_credentials(Path(ca).read_bytes() if ca else None)


def _channel(address: str, tls: bool) -> grpc.aio.Channel:
    if tls:
        return grpc.aio.secure_channel(address, _credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def build_backends(config: KongConfig) -> dict[str, Backend]:
    out: dict[str, Backend] = {}
    for svc in config.services:
        if not svc.enabled or svc.protocol in ("http", "https"):  # plain-HTTP services: cxr_gateway.http_proxy
            continue
        tls = svc.protocol == "grpcs"
        up = config.upstream(svc.host)
        if up is not None:
            addresses = [t.target for t in up.targets if t.weight > 0]
            checks: Healthchecks | None = up.healthchecks
        else:
            addresses = [f"{svc.host}:{svc.port}"]
            checks = None
        if not addresses:
            raise ValueError(f"service {svc.name}: upstream {svc.host} has no targets")
        targets = [TargetState(a, _channel(a, tls)) for a in addresses]
        out[svc.name] = Backend(svc, targets, checks, up.name if up else None)
    return out
