"""A service process (the shared `run_service`) runs the event loop `server_config.event_loop` names,
answers on it and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.paths import REPO
from tests.support.processes import first_model_name, python_module
from tests.support.servers import TEST_KEY, free_port


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_service_process_runs_the_configured_loop(tmp_path, choice, expected):
    port = free_port()
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "server_config": {"event_loop": choice, "log_level": "INFO"},
                "security": {"api_keys": [TEST_KEY]},
                "monitoring": {"log_json": True, "enable_metrics": False},
                "services": {"classification": {"host": "127.0.0.1", "port": port, "metrics_port": 0}},
            }
        )
    )
    proc = python_module("tests.support.toy_service", "--config", str(cfg))
    try:
        seen, loop_name = [], None
        deadline = time.monotonic() + 60
        while loop_name is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"event loop: (\w+)", line)
            loop_name = m.group(1) if m else None
        assert loop_name == expected, "".join(seen)
        assert first_model_name(port, (("x-api-key", TEST_KEY),)) == "toy"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_choice_is_a_config_error(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"server_config": {"event_loop": "trio"}}))
    proc = subprocess.run([sys.executable, "-m", "tests.support.toy_service", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "event_loop" in proc.stderr
