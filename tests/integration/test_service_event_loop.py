"""A service process (the shared `run_service`) runs the event loop `server_config.event_loop` names,
answers on it and stops cleanly on SIGTERM."""

from __future__ import annotations

import pytest

from tests.support.processes import (
    first_log_match,
    first_model_name,
    python_module,
    reaped,
    refused_server_config,
    stopped_by_sigterm,
    toy_service_config,
)
from tests.support.servers import TEST_KEY, free_port


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_service_process_runs_the_configured_loop(tmp_path, choice, expected):
    port = free_port()
    cfg = toy_service_config(tmp_path / "config.json", port, {"event_loop": choice}, TEST_KEY)
    proc = python_module("tests.support.toy_service", "--config", str(cfg))
    with reaped(proc):
        m, seen = first_log_match(proc, r"event loop: (\w+)")
        assert m is not None and m.group(1) == expected, seen
        assert first_model_name(port, (("x-api-key", TEST_KEY),)) == "toy"
        assert stopped_by_sigterm(proc) == 0


def test_a_bad_choice_is_a_config_error(tmp_path):
    proc = refused_server_config(tmp_path / "config.json", {"event_loop": "trio"})
    assert proc.returncode == 2 and "event_loop" in proc.stderr
