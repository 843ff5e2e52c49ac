"""grpc.aio server factory: health (NOT_SERVING until ready), reflection, message size,
keepalive, interceptors, Prometheus endpoint, graceful SIGTERM drain.

A service describes itself with a `ServiceBinding` (its gRPC servicers, its model
repository, start/stop hooks); `create_server(settings, binding)` does the rest and works
on port 0 in tests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from cxr_serving.auth import (
    AdminClosedInterceptor,
    ApiKeyInterceptor,
    ApiKeyStore,
    KeyRoles,
    PeerAllowListInterceptor,
)
from cxr_serving.lifecycle import ModelRepository
from cxr_serving.metrics import MetricsServer, publish_pixel_kernels
from cxr_serving.observability import ObservabilityInterceptor
from cxr_serving.settings import Settings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_POLL_S = 2.0  # how soon a binding's own readiness change reaches gRPC health


class _HealthServicer(HealthServicer):  # type: ignore[misc]
    """grpc_health's servicer, except that Watch streams end when the server drains: a connected
    watcher (client-side health checking, a dashboard) would otherwise hold `stop(grace)` for the
    whole grace period. Watchers see NOT_SERVING first, then the stream ends."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not watch.cancelled():
                watch.result()  # re-raise what the stream raised
        finally:
            watch.cancel()
            closing.cancel()


@dataclass
class ServiceBinding:
    """What a service plugs into the shared server."""

    name: str  # "classification", ... (picks `services.<name>` in the config)
    full_service_names: Sequence[str]  # e.g. ["cxr.classification.v1.ClassificationService"]
    register: Callable[[grpc.aio.Server], None]  # adds servicers
    repository: ModelRepository | None = None  # None: ready as soon as started
    on_start: Callable[[], Awaitable[None]] | None = None  # runs before models load (e.g. open the store)
    on_stop: Callable[[], Awaitable[None]] | None = None
    readiness: Callable[[], bool] | None = None  # extra readiness condition
    extra: dict[str, Any] = field(default_factory=dict)


class CxrServer:
    def __init__(
        self,
        settings: Settings,
        binding: ServiceBinding,
        *,
        host: str | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
        address: str | None = None,
        reuse_port: bool = False,
        inner_interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        metrics_registry: CollectorRegistry = REGISTRY,
    ) -> None:
        """`address` (e.g. `unix:/path`) replaces host:port for gRPC; `reuse_port` lets several processes
        listen on one port; `inner_interceptors` run after auth and observability, next to the servicers."""
        self.settings = settings
        self.binding = binding
        ep = settings.endpoint(binding.name)
        self.host = host if host is not None else ep.host
        self._requested_port = ep.port if port is None else port
        self._metrics_port = ep.metrics_port if metrics_port is None else metrics_port
        self.port = 0
        self._address = address
        self._reuse_port = reuse_port
        self._inner_interceptors = list(inner_interceptors)
        self._metrics_registry = metrics_registry
        self.metrics: MetricsServer | None = None
        self.health = _HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._loader: asyncio.Task[None] | None = None
        self._readiness_watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._serving: bool | None = None  # last status published on the health service
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _build(self) -> grpc.aio.Server:
        sc, sec = self.settings.server_config, self.settings.security
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        roles: KeyRoles | None = None
        if sec.enable_authentication:
            store = ApiKeyStore(sec.api_keys, sec.api_key_file)
            admin_store = ApiKeyStore(sec.admin_api_keys, sec.admin_api_key_file)
            roles = KeyRoles(store, admin_store)
            if not store.keys() and not admin_store.keys():
                log.warning(
                    "authentication is enabled but no API key is configured: every call will be refused "
                    "(set CXR_API_KEY or security.api_key_file)"
                )
            elif not admin_store.keys():
                log.warning(
                    "no admin API key is configured: admin RPCs (load, unload, ingest) will be refused "
                    "(set CXR_ADMIN_API_KEY or security.admin_api_key_file)"
                )
        if sec.allowed_ips:
            interceptors.append(
                PeerAllowListInterceptor(sec.allowed_ips, sec.trusted_proxies, sec.unauthenticated_methods, roles)
            )
        if roles is not None:
            interceptors.append(ApiKeyInterceptor(roles.inference, sec.unauthenticated_methods, roles.admin))
        else:
            interceptors.append(AdminClosedInterceptor())
        interceptors.append(ObservabilityInterceptor(self.binding.name, key_roles=roles))
        interceptors.extend(self._inner_interceptors)
        max_bytes = int(sc.max_message_mb * 1024 * 1024)
        options = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.keepalive_time_ms", int(sc.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(sc.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", int(self._reuse_port)),
        ]
        server = grpc.aio.server(
            interceptors=interceptors, options=options, maximum_concurrent_rpcs=sc.max_concurrent_rpcs
        )
        self.binding.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            *self.binding.full_service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        return server

    def _credentials(self) -> grpc.ServerCredentials | None:
        tls = self.settings.security.tls
        if not tls.enabled:
            return None
        if tls.cert_file is None or tls.key_file is None:
            raise ValueError("security.tls.enabled needs cert_file and key_file")
        ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    async def _set_health(self, serving: bool) -> None:
        status = SERVING if serving and not self._stopping else NOT_SERVING
        if (status == SERVING) != self._serving:  # publish and log changes only
            self._serving = status == SERVING
            await self.health.set("", status)
            for name in self.binding.full_service_names:
                await self.health.set(name, status)
            log.info("health: %s", "SERVING" if self._serving else "NOT_SERVING")

    def _is_ready(self) -> bool:
        repo_ok = self.binding.repository is None or self.binding.repository.ready
        extra_ok = self.binding.readiness is None or self.binding.readiness()
        return repo_ok and extra_ok

    def refresh_health(self) -> None:
        """Re-evaluate readiness (called when a model changes state)."""
        self.background(self._set_health(self._is_ready()))

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background, keeping a reference until it finishes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._server = self._build()
        creds = self._credentials()
        address = self._address or f"{self.host}:{self._requested_port}"
        self.port = self._server.add_secure_port(address, creds) if creds else self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await self._set_health(False)
        await self._server.start()
        if self.settings.monitoring.enable_metrics:
            if self.binding.repository is not None:  # the model services decode images; rag takes text
                publish_pixel_kernels()
            self.metrics = MetricsServer(self.host, self._metrics_port, self._metrics_registry)
        log.info(
            "%s listening on %s:%d (metrics on :%s)",
            self.binding.name,
            self.host,
            self.port,
            self.metrics.port if self.metrics else "off",
        )
        self._loader = asyncio.get_running_loop().create_task(self._become_ready())

    async def _become_ready(self) -> None:
        try:
            if self.binding.on_start is not None:
                await self.binding.on_start()
            repo = self.binding.repository
            if repo is not None:
                await repo.load_all()
        except Exception:
            log.exception("%s failed to start; staying NOT_SERVING", self.binding.name)
        await self._set_health(self._is_ready())
        if not self._is_ready():
            log.error(
                "%s is NOT_SERVING: a required model or dependency is not ready (see errors above)", self.binding.name
            )
        if self.binding.readiness is not None and not self._stopping:
            self._readiness_watch = asyncio.get_running_loop().create_task(self._watch_readiness())

    async def _watch_readiness(self) -> None:
        """A binding's own readiness (e.g. the DICOM node's workers) changes without telling the server: poll it."""
        while not self._stopping:
            await asyncio.sleep(READINESS_POLL_S)
            await self._set_health(self._is_ready())

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        if self._loader is not None:
            await asyncio.wait_for(asyncio.shield(self._loader), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING, stop accepting, drain in-flight calls for `grace` seconds, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.server_config.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        delay = self.settings.server_config.shutdown_delay_s
        log.info("health: NOT_SERVING (shutting down); still accepting calls for %.1fs so load balancers notice", delay)
        if delay > 0:
            await asyncio.sleep(delay)
        log.info("draining in-flight calls for up to %.1fs", grace)
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self._readiness_watch is not None:
            self._readiness_watch.cancel()
        self.health.closing.set()  # end Watch streams: they would hold the drain for the whole grace
        if self._server is not None:
            await self._server.stop(grace)
        if self.binding.repository is not None:
            await self.binding.repository.close()
        if self.binding.on_stop is not None:
            await self.binding.on_stop()
        if self.metrics is not None:
            self.metrics.close()
        self._stopped.set()
        log.info("%s stopped", self.binding.name)

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def create_server(
    settings: Settings,
    binding: ServiceBinding,
    *,
    host: str | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
) -> CxrServer:
    server = CxrServer(settings, binding, host=host, port=port, metrics_port=metrics_port)
    if binding.repository is not None:
        binding.repository.on_ready_change = lambda _ready: server.refresh_health()
    return server


async def serve(server: CxrServer) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        server.background(server.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    await server.wait_for_termination()
