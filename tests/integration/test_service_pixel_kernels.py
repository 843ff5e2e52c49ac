"""A service process says at start whether the C image kernels serve it; without them (here: their import
blocked, as on a host that installed without a C compiler) it warns and still answers, through the fallbacks."""

from __future__ import annotations

import json
import os

import pytest

from cxr_serving import pixel_kernels
from tests.support.processes import (
    classify_once,
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
        classify_once(port, sample_png, TEST_KEY)  # the fallbacks answer
        assert stopped_by_sigterm(proc) == 0


_GAUGE_PROBE = """
import asyncio, sys
from prometheus_client import REGISTRY
from cxr_serving.server import ServiceBinding
from tests.support.servers import make_settings, running_server
from tests.support.toy_service import build_toy

async def main(kind):
    settings = make_settings()
    if kind == "model service":
        binding = build_toy(settings)
    else:  # a service that decodes no images, as rag's binding: no model repository
        binding = ServiceBinding(name="classification", full_service_names=[], register=lambda server: None)
    async with running_server(settings, binding):
        print(REGISTRY.get_sample_value("cxr_pixel_kernels_built"))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize(("kind", "exported"), [("model service", True), ("no models", False)])
def test_only_a_model_service_exports_the_kernels_gauge(kind, exported):
    """In a fresh process (the gauge lives on the process's registry): a server whose binding holds models
    registers cxr_pixel_kernels_built at start; one without (rag's kind) does not."""
    import subprocess
    import sys

    from tests.support.paths import REPO

    out = subprocess.run([sys.executable, "-c", _GAUGE_PROBE, kind], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    value = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    expected = ("0.0" if pixel_kernels.missing() else "1.0") if exported else "None"
    assert value == expected, out.stdout + out.stderr[-2000:]
