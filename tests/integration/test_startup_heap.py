"""A service process takes its start-up heap (imports, settings, the server) out of the cyclic garbage collector's
view before it loads models, so that a full collection while serving does not walk the whole process
(bench/README.md, "Classification's serving path"); what is made later, models included, stays collectable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.frontends import child_pids
from tests.support.paths import REPO
from tests.support.servers import TEST_KEY, free_port
from tests.support.service_process import service_process

pytestmark = pytest.mark.slow

# run_service with the toy binding; on_start (after start-up, before models load) reports the collector's view
SCRIPT = """
import dataclasses, gc, json, sys
from pathlib import Path
from cxr_serving.cli import run_service
from tests.support.toy_service import build_toy

def build(settings):
    async def on_start():
        made_now = ["made after start-up", []]  # a list: always tracked by the collector
        seen = any(o is made_now for o in gc.get_objects())
        Path(sys.argv[1]).write_text(json.dumps({"frozen": gc.get_freeze_count(), "later_in_view": seen}))
    return dataclasses.replace(build_toy(settings), on_start=on_start)

raise SystemExit(run_service("classification", build, []))
"""


def test_service_freezes_its_startup_heap_and_keeps_later_objects_collectable(tmp_path):
    port = free_port()
    report = tmp_path / "gc.json"
    env = {
        **os.environ,
        "CXR_API_KEY": TEST_KEY,
        "CXR_SERVICES__CLASSIFICATION__PORT": str(port),
        "CXR_SERVICES__CLASSIFICATION__HOST": "127.0.0.1",
        "CXR_SERVICES__CLASSIFICATION__METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(report)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not report.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert report.exists(), proc.stdout.read() if proc.poll() is not None else "no report in 60 s"
        seen = json.loads(report.read_text())
        assert seen["frozen"] > 20_000, seen  # grpc, numpy, pydantic, the platform: ~60k objects for the toy
        assert seen["later_in_view"], seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_frontend_processes_freeze_their_startup_heap_too(tmp_path):
    """With two frontends, the executor and each frontend process report a frozen start-up heap, and objects made
    after start-up stay in the collector's view in all three."""
    env = {"CXR_SERVER_CONFIG__FRONTEND_PROCESSES": "2"}
    seen, root = _gc_reports_of_three_processes(tmp_path, env)
    assert len(set(seen) - {root}) == 2, seen
    for pid, report in seen.items():
        assert report["frozen"] > 20_000, (pid, report)
        assert report["later_in_view"], (pid, report)


def test_model_instance_processes_freeze_their_startup_heap_before_the_weights_load(tmp_path):
    """With `model_instance_mode: process`, each instance process freezes what it imported and built before it
    loads the model's weights (reported from the model's load, in the instance), as the server process does."""
    env = {"CXR_SERVER_CONFIG__MODEL_INSTANCE_MODE": "process", "CXR_SERVER_CONFIG__MODEL_INSTANCES": "2"}
    seen, root = _gc_reports_of_three_processes(tmp_path, env)
    instances = set(seen) - {root}
    assert len(instances) == 2, seen
    for pid in instances:
        assert seen[pid]["frozen"] > 20_000, (pid, seen[pid])  # numpy, grpc, the platform: ~50k for the toy
        assert seen[pid]["later_in_view"], (pid, seen[pid])


def _gc_reports_of_three_processes(tmp_path, env):
    """Start the toy service with `env`; the collector reports of its process and two children, by pid, and its pid."""
    reports = tmp_path / "gc"
    reports.mkdir()
    with service_process(tmp_path, env={**env, "TOY_GC_REPORT_DIR": str(reports)}) as sp:
        sp.wait_health()
        deadline = time.time() + 60
        while len(list(reports.glob("gc-*.json"))) < 3 and time.time() < deadline:
            time.sleep(0.1)
        seen = {int(p.stem.removeprefix("gc-")): json.loads(p.read_text()) for p in reports.glob("gc-*.json")}
        children = set(child_pids(sp.proc.pid))
    assert sp.proc.pid in seen and set(seen) - {sp.proc.pid} <= children, (seen, children)
    return seen, sp.proc.pid
