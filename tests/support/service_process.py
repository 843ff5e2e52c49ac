"""Run a service as a real process (its own `python -m ...` entry point) for fault tests:
signals, RSS, captured JSON logs. Every wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.paths import REPO
from tests.support.servers import TEST_KEY, free_port

TOY_MODULE = "tests.support.toy_service"


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "", timeout: float = 1.0) -> int:
        with grpc.insecure_channel(self.target) as ch:
            return int(
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )

    def wait_health(self, status: int = health_pb2.HealthCheckResponse.SERVING, timeout: float = 60.0) -> float:
        """Wait until health reports `status`; returns seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if self.health() == status:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"health did not reach {status} in {timeout}s:\n{self.logs()[-3000:]}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)


def service_env(port: int, service: str = "classification", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    prefix = f"CXR_SERVICES__{service.upper()}__"
    env = {
        **os.environ,
        "CXR_API_KEY": TEST_KEY,
        "CXR_ADMIN_API_KEY": TEST_KEY,  # also an admin key: these tests are not about roles
        f"{prefix}PORT": str(port),
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CXR_CONFIG_PATH", None)
    env.update(extra or {})
    return env


@contextmanager
def service_process(
    log_dir: Path,
    module: str = TOY_MODULE,
    service: str = "classification",
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    wait_serving: bool = True,
    port: int | None = None,
) -> Iterator[ServiceProcess]:
    """Start `python -m module` on a free port with auth on (TEST_KEY); kill it on exit."""
    port = port or free_port()
    log_path = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=service_env(port, service, env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sp = ServiceProcess(proc, port, log_path)
    try:
        if wait_serving:
            sp.wait_health(timeout=120)
        yield sp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
