"""`server_config.frontend_processes` > 1: N frontend processes take the gRPC calls on the service's port
and decode and preprocess, and this process keeps the models, so that one executor per node batches
every frontend's requests together. Design, wire and failure handling: docs/serving-runtime.md.

This (the parent) process: the `ModelRepository` and its batchers behind a `FrontendHub`; model admin
and health on a private unix socket; /metrics on the metrics port, with the frontends' series merged in;
a supervisor that restarts a frontend that dies. SIGTERM drains the frontends first, then the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cxr_serving.errors import ConfigError
from cxr_serving.frontend_hub import FrontendHub
from cxr_serving.frontend_metrics import merged_registry
from cxr_serving.frontend_wire import Arena
from cxr_serving.heap import freeze_startup_heap, serve_this_process
from cxr_serving.instances import recv, send
from cxr_serving.metrics import FRONTEND_PROCESSES, FRONTEND_RESTARTS
from cxr_serving.server import CxrServer, ServiceBinding
from cxr_serving.settings import Settings

log = logging.getLogger(__name__)
Build = Callable[[Settings], ServiceBinding]  # must be picklable: a module-level function or a partial
SUPERVISE_POLL_S = 0.2
RESTART_BACKOFF_S = 1.0  # a frontend that dies within this of its start waits this long before the next


def frontend_count(settings: Settings, *, serves_models: bool = True) -> int:
    """`server_config.frontend_processes`, or its default: 1 on CPU, half the cores on a GPU node. A service
    without a model repository (rag, the DICOM node) has nothing to execute for frontends: always 1, and an
    explicit N > 1 is refused (ConfigError) rather than ignored."""
    sc = settings.server_config
    if not serves_models:
        if (sc.frontend_processes or 1) > 1:
            raise ConfigError(
                f"server_config.frontend_processes: {sc.frontend_processes} needs a service with models "
                "(classification, segmentation); this one serves from one process: set it to 1 or leave it unset"
            )
        return 1
    if sc.frontend_processes is not None:
        return sc.frontend_processes
    gpu = sc.device.startswith("cuda")
    if sc.device == "auto":
        try:
            import torch

            gpu = bool(torch.cuda.is_available())
        except ImportError:
            gpu = False
    return max(1, len(os.sched_getaffinity(0)) // 2) if gpu else 1  # the cores this process may run on


def reserve_port(host: str, port: int) -> tuple[socket.socket | None, int]:
    """Port 0 means "any free port", but every frontend must listen on the same one: bind a socket with
    SO_REUSEPORT (never listening, so it takes no connections) to hold the port the kernel chose."""
    if port != 0:
        return None, port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, int(sock.getsockname()[1])


@dataclass
class _Frontend:
    index: int
    process: subprocess.Popen[bytes]
    token: str
    started: float


class FrontendSupervisor:
    """Starts `count` frontend processes and starts again any that exits while the node serves."""

    def __init__(
        self,
        settings: Settings,
        build: Build,
        hub: FrontendHub,
        count: int,
        host: str,
        port: int,
        paths: dict[str, str],
    ) -> None:
        self.settings, self.build, self.hub = settings, build, hub
        self.count, self.host, self.port, self.paths = count, host, port, paths
        self.frontends: dict[int, _Frontend] = {}
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pids(self) -> list[int]:
        return [f.process.pid for f in self.frontends.values()]

    def _spawn(self, index: int) -> _Frontend:
        arena = Arena.create()
        token = secrets.token_hex(8)
        self.hub.arenas[token] = arena
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "cxr_serving.frontends", str(theirs.fileno()), str(arena.fd)],
                pass_fds=[theirs.fileno(), arena.fd],
            )
            conn = multiprocessing.connection.Connection(ours.detach())
        arena.close_fd()  # the frontend has its own descriptor now; the mapping here stays
        with conn:
            send(conn, (list(sys.path), self.settings, self.build, self.host, self.port, index, token, self.paths))
        log.info("frontend %d started (pid %d)", index, process.pid)
        return _Frontend(index, process, token, time.monotonic())

    def start(self) -> None:
        for i in range(self.count):
            self.frontends[i] = self._spawn(i)
        FRONTEND_PROCESSES.set(len(self.frontends))
        self._task = asyncio.ensure_future(self._supervise())

    async def _supervise(self) -> None:
        while not self.stopping:
            await asyncio.sleep(SUPERVISE_POLL_S)
            for index, fe in list(self.frontends.items()):
                code = fe.process.poll()
                if code is None or self.stopping:
                    continue
                self.hub.arenas.pop(fe.token, None)
                log.error("frontend %d (pid %d) exited with %s; starting it again", index, fe.process.pid, code)
                FRONTEND_RESTARTS.inc()
                if time.monotonic() - fe.started < RESTART_BACKOFF_S:
                    await asyncio.sleep(RESTART_BACKOFF_S)
                if not self.stopping:
                    self.frontends[index] = self._spawn(index)
            FRONTEND_PROCESSES.set(sum(f.process.poll() is None for f in self.frontends.values()))

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM every frontend (each drains its calls, which still reach the models) and wait."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
        for fe in self.frontends.values():
            with contextlib.suppress(ProcessLookupError):
                fe.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for fe in self.frontends.values():
            while fe.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if fe.process.poll() is None:
                log.warning("frontend %d did not stop in %.0fs; killing it", fe.index, timeout_s)
                fe.process.kill()
                fe.process.wait(5)
        FRONTEND_PROCESSES.set(0)


async def serve_with_frontends(
    settings: Settings, binding: ServiceBinding, build: Build, count: int, *, host: str, port: int, metrics_port: int
) -> None:
    """Run the executor with `count` frontends on host:port until SIGTERM/SIGINT, then drain."""
    if binding.repository is None:
        raise ValueError(f"service {binding.name} has no models to execute: frontend_processes must be 1")
    workdir = tempfile.mkdtemp(prefix="cxr-frontends-")
    paths = {"hub": os.path.join(workdir, "hub.sock"), "admin": os.path.join(workdir, "admin.sock")}
    hub = FrontendHub(binding.repository)
    # the executor's own server: model admin and health on a unix socket in a 0700 directory, reached only by
    # its frontends (which enforce TLS and the allow-list); the API key is checked again here
    sec = settings.security
    private = settings.model_copy(
        update={
            "security": sec.model_copy(
                update={"allowed_ips": [], "trusted_proxies": [], "tls": sec.tls.model_copy(update={"enabled": False})}
            ),
            "server_config": settings.server_config.model_copy(update={"shutdown_delay_s": 0.0}),
        }
    )
    server = CxrServer(
        private,
        binding,
        host=host,
        metrics_port=metrics_port,
        address=f"unix:{paths['admin']}",
        metrics_registry=merged_registry(hub.metrics_text),
    )
    binding.repository.on_ready_change = lambda _ready: server.refresh_health()
    holder, port = reserve_port(host, port)
    supervisor = FrontendSupervisor(settings, build, hub, count, host, port, paths)
    stopped = asyncio.Event()

    async def stop() -> None:
        sc = settings.server_config
        await supervisor.stop(sc.shutdown_delay_s + sc.shutdown_grace_s + 10)
        await hub.close()
        await server.stop(grace=0)
        stopped.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: server.background(stop()))
    try:
        await hub.start(paths["hub"])
        await server.start()
        supervisor.start()
        log.info("%s: %d frontend processes on %s:%d (pids %s)", binding.name, count, host, port, supervisor.pids)
        await stopped.wait()
    finally:
        if not supervisor.stopping:
            await supervisor.stop(5)
        if holder is not None:
            holder.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the frontend process ------------------------------------------------------------------------------


class AdminForwarder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Sends the model-admin RPCs (ModelAdminRpcs: ListModels, LoadModel, ...) to the executor's private
    server as raw bytes, with the caller's metadata and deadline: model admin has one path, in one process."""

    def __init__(self, target: str) -> None:
        from cxr_serving.model_admin import ModelAdminRpcs

        self._methods = frozenset(n for n in vars(ModelAdminRpcs) if n[:1].isupper())
        self._channel = grpc.aio.insecure_channel(target)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method: str = details.method  # type: ignore[attr-defined]
        handler = await continuation(details)
        if handler is None or method.rsplit("/", 1)[-1] not in self._methods or not handler.unary_unary:
            return handler
        call = self._channel.unary_unary(method, None, None)

        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            md = [
                (k, v)
                for k, v in context.invocation_metadata() or ()
                if not k.startswith((":", "grpc-")) and k not in ("user-agent", "content-type", "te")
            ]
            try:
                return await call(request, metadata=md, timeout=context.time_remaining())  # type: ignore[no-any-return]
            except grpc.aio.AioRpcError as exc:
                pairs: Any = exc.trailing_metadata() or ()  # aio.Metadata: (key, value) pairs
                trailers: tuple[tuple[str, str | bytes], ...] = tuple((k, v) for k, v in pairs)
                await context.abort(exc.code(), exc.details() or "", trailing_metadata=trailers)
                raise  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(forward)

    async def close(self) -> None:
        await self._channel.close(None)


async def _frontend_main(settings: Settings, build: Build, host: str, port: int, index: int, token: str,
                         paths: dict[str, str], arena: Arena) -> None:  # fmt: skip
    from cxr_serving.binding import repository_maker
    from cxr_serving.frontend_repository import RemoteRepository

    def make(batching: Any) -> RemoteRepository:
        return RemoteRepository(batching, paths["hub"], token, index, arena)

    with repository_maker(make):
        binding = build(settings)
    repo = binding.repository
    assert isinstance(repo, RemoteRepository)
    forwarder = AdminForwarder(f"unix:{paths['admin']}")
    quiet = settings.model_copy(update={"monitoring": settings.monitoring.model_copy(update={"enable_metrics": False})})
    server = CxrServer(quiet, binding, host=host, port=port, reuse_port=True, inner_interceptors=[forwarder])
    repo.on_ready_change = lambda _ready: server.refresh_health()
    loop = asyncio.get_running_loop()

    def lost() -> None:  # the executor is gone: nothing can be answered any more
        log.error("frontend %d lost the model executor; exiting", index)
        server.background(server.stop(grace=0))

    repo.on_link_lost = lost
    loop.add_signal_handler(signal.SIGTERM, lambda: server.background(server.stop()))
    freeze_startup_heap()  # as the executor does (cli.run_service): collections walk what serving makes
    await server.start()
    await server.wait_for_termination()
    await forwarder.close()


def _term_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux PR_SET_PDEATHSIG), even if it never reached its
    link: a frontend is never left listening without an executor."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def main(control_fd: int, arena_fd: int) -> None:
    from cxr_serving.logging_setup import setup_logging
    from cxr_serving.optimize.event_loop import runner

    serve_this_process()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us with SIGTERM
    parent = os.getppid()
    _term_with_parent()
    if os.getppid() != parent:  # the parent died before we asked to be told
        return
    with multiprocessing.connection.Connection(control_fd) as conn:
        sys_path, settings, build, host, port, index, token, paths = recv(conn)
    sys.path[:] = sys_path
    mon = settings.monitoring
    setup_logging(f"frontend-{index}", settings.server_config.log_level, mon.log_json, mon.log_file)
    arena = Arena(arena_fd)
    run, _ = runner(settings.server_config.event_loop)
    run(_frontend_main(settings, build, host, port, index, token, paths, arena))


if __name__ == "__main__":  # a frontend process: python -m cxr_serving.frontends CONTROL_FD ARENA_FD
    from cxr_serving import frontends

    frontends.main(int(sys.argv[1]), int(sys.argv[2]))
