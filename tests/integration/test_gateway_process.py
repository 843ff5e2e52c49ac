"""`python -m cxr_gateway` as a real process in front of the toy service process, as `make run` starts it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.support.paths import REPO
from tests.support.processes import first_model_name
from tests.support.servers import TEST_KEY, free_port

PORTS_ANY = ("--rest-port", "0", "--grpc-port", "0", "--status-port", "0")


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> tuple[re.Match[str], str]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m, "".join(seen)
    raise AssertionError(f"{pattern!r} not printed within {timeout}s:\n{''.join(seen)}")


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])  # auto: uvloop, installed with the gateway
def test_gateway_process_logs_stand_in_prints_url_and_proxies(tmp_path, event_loop):
    port = free_port()
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "security": {"api_keys": [TEST_KEY]},
                "monitoring": {"log_json": False},
                "services": {"classification": {"host": "127.0.0.1", "port": port, "metrics_port": 0}},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "DECK_"))}
    backend = subprocess.Popen(
        [sys.executable, "-m", "tests.support.toy_service", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cxr_gateway",
            "--kong",
            "gateway/kong.yml",
            "--config",
            str(cfg),
            *PORTS_ANY,
            "--event-loop",
            event_loop,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        m, out = _read_until(gateway, r"REST\s+(http://127\.0\.0\.1:\d+)", 60)
        base = m.group(1)
        assert "DEVELOPMENT STAND-IN for Kong" in out
        assert f"event loop: {'uvloop' if event_loop == 'auto' else 'asyncio'}" in out
        grpc_port = int(_read_until(gateway, r"gRPC\s+127\.0\.0\.1:(\d+)", 10)[0].group(1))
        m2, _ = _read_until(gateway, r"try:\s+curl .*", 10)
        assert f"{base}/v1/classification/models" in m2.group(0)
        deadline, status, body = time.monotonic() + 60, 0, b""
        while time.monotonic() < deadline:  # the backend process may still be starting
            req = urllib.request.Request(f"{base}/v1/classification/models", headers={"apikey": TEST_KEY})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    status, body = r.status, r.read()
                break
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
                if status != 503:
                    break
            time.sleep(0.2)
        assert status == 200, body
        assert json.loads(body)["models"][0]["name"] == "toy"
        # the gRPC proxy on the same loop
        assert first_model_name(grpc_port, (("apikey", TEST_KEY),)) == "toy"
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=20) == 0
    finally:
        for p in (gateway, backend):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
