"""`make run`: start every catalog service that is installed (and the local gateway) on this machine.

The services are those of the service catalog (cxr_serving/services.json plus the config's
`service_catalog` files). Each runs as its own process (`python -m cxr_serving <name> --config ...`);
this script waits until each reports SERVING on gRPC health, prints where
everything listens, and stops them all (SIGTERM, graceful drain) on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr_serving.errors import ConfigError
from cxr_serving.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def wait_serving(name: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.time() + timeout
    last = time.time()
    while time.time() < deadline:
        if proc.poll() is not None:
            print(f"  {name}: exited with {proc.returncode} (see its log above)")
            return False
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
        except grpc.RpcError:
            pass
        if time.time() - last > 10:
            print(f"  {name}: still loading ...", flush=True)
            last = time.time()
        time.sleep(0.3)
    print(f"  {name}: not SERVING after {timeout:.0f}s")
    return False


def service_commands(settings: Settings, config: str, only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """The command of each installed catalog service (or of `only`); raises ConfigError for an unknown name."""
    catalog = settings.catalog()
    out = []
    for name in only or catalog:
        if not catalog[name].installed():
            print(f"- {name}: not built yet, skipped")
            continue
        out.append((name, [sys.executable, "-m", "cxr_serving", name, "--config", config]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="config/local.json")
    ap.add_argument("--only", nargs="*", help="start only these catalog services")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for each service")
    args = ap.parse_args()
    settings = load_settings(args.config)
    env = {**os.environ, "CXR_CONFIG_PATH": str(Path(args.config).resolve()), "HF_HUB_OFFLINE": "1"}
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        commands = service_commands(settings, args.config, args.only)
    except ConfigError as exc:
        ap.error(str(exc))
    for name, cmd in commands:
        print(f"- starting {name} ...", flush=True)
        procs.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env)))
    ok = True
    for name, proc in procs:
        ep = settings.endpoint(name)
        ok &= wait_serving(name, ep.port, proc, args.timeout)
        if ok:
            print(f"  {name}: gRPC {ep.host}:{ep.port}  metrics http://{ep.host}:{ep.metrics_port}/metrics", flush=True)
    gateway = None
    if ok and importlib.util.find_spec("cxr_gateway") is not None:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "cxr_gateway", "--kong", "gateway/kong.yml", "--config", args.config],
            cwd=ROOT,
            env=env,
        )
        procs.append(("gateway", gateway))
    if not procs:
        print("nothing to run yet")
        return 1
    print(
        "\nall started; Ctrl-C stops everything" if ok else "\nsome services failed; Ctrl-C stops the rest", flush=True
    )
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop and any(p.poll() is None for _, p in procs):
        time.sleep(0.5)
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for name, p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in 60s; killing")
            p.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
