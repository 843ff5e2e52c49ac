"""A service process says at start whether the C image kernels serve it; without them (here: their import
blocked, as on a host that installed without a C compiler) it warns and still answers, through the fallbacks."""

from __future__ import annotations

import json
import os

import pytest

from cxr_serving import pixel_kernels
from tests.integration.test_service_cpu_scheduling import classify_once
from tests.support.processes import (
    clean_env,
    first_log_match,
    first_model_name,
    python_module,
    reaped,
    stopped_by_sigterm,
    toy_service_config,
)
from tests.support.servers import TEST_KEY, free_port

BLOCK = "import sys; sys.modules['cxr_serving._pixels'] = None  # its import now raises ImportError\n"


@pytest.mark.parametrize("built", [True, False])
def test_the_service_logs_which_image_path_serves(tmp_path, built, sample_png):
    if built and pixel_kernels.missing():
        pytest.skip("this build has no C kernels")
    port = free_port()
    cfg = toy_service_config(tmp_path / "config.json", port, {}, TEST_KEY)
    env = clean_env()
    if not built:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path / "site"), env.get("PYTHONPATH", "")) if p)
    proc = python_module("tests.support.toy_service", "--config", str(cfg), env=env)
    with reaped(proc):
        m, seen = first_log_match(proc, r"C image kernels")
        assert m is not None, seen
        line = json.loads(m.string)
        if built:
            assert (line["level"], line["msg"]) == (
                "INFO",
                "C image kernels: built (PNG row filters, one-pass resize + normalise)",
            )
        else:
            assert line["level"] == "WARNING"
            assert (
                "not built (cxr_serving._pixels): PNG row filters, one-pass resize + normalise fall back" in line["msg"]
            )
        assert first_model_name(port, (("x-api-key", TEST_KEY),)) == "toy"
        classify_once(port, sample_png)  # the fallbacks answer
        assert stopped_by_sigterm(proc) == 0
