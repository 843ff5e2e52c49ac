"""A service process puts every thread it has, and every thread it starts later (the decode pool, gRPC's and the
model's threads), under the Linux scheduling policy `server_config.cpu_scheduling` names, and says so at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO
from tests.support.processes import (
    classify_once,
    first_log_match,
    first_model_name,
    python_module,
    reaped,
    refused_server_config,
    stopped_by_sigterm,
    toy_service_config,
)
from tests.support.servers import TEST_KEY, free_port

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
POLICY = {"batch": getattr(os, "SCHED_BATCH", -1), "normal": getattr(os, "SCHED_OTHER", -1)}


def thread_policies(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getscheduler(int(tid))
        except ProcessLookupError:
            continue
    return out


@pytest.mark.parametrize("choice", ["batch", "normal", "inherit"])
def test_every_thread_of_the_service_runs_under_the_configured_policy(tmp_path, choice, sample_png):
    """batch and normal replace the policy the process was started with; inherit keeps it."""
    port = free_port()
    cfg = toy_service_config(tmp_path / "config.json", port, {"cpu_scheduling": choice, "num_workers": 3}, TEST_KEY)
    other = "normal" if choice == "batch" else "batch"  # started under another policy: the setting decides
    expected = POLICY[other] if choice == "inherit" else POLICY[choice]
    proc = python_module(
        "tests.support.toy_service",
        "--config",
        str(cfg),
        preexec_fn=lambda: os.sched_setscheduler(0, POLICY[other], os.sched_param(0)),
    )
    with reaped(proc):
        m, seen = first_log_match(proc, r"cpu scheduling: ([^\"]+)")
        said = "inherit: threads keep the policy the process was started with (SCHED_BATCH)"
        assert m is not None and (
            m.group(1) == said if choice == "inherit" else m.group(1).startswith(f"{choice} (")
        ), seen
        before = thread_policies(proc.pid)
        assert first_model_name(port, (("x-api-key", TEST_KEY),)) == "toy"
        classify_once(port, sample_png, TEST_KEY)  # starts a decode thread and the model's batch thread
        after = thread_policies(proc.pid)
        assert len(after) > len(before), (before, after)
        assert set(after.values()) == {expected}, after
        assert stopped_by_sigterm(proc) == 0


def test_a_bad_choice_is_a_config_error(tmp_path):
    proc = refused_server_config(tmp_path / "config.json", {"cpu_scheduling": "fifo"})
    assert proc.returncode == 2 and "cpu_scheduling" in proc.stderr


def test_the_policy_says_what_it_did_in_this_process_and_its_new_threads():
    code = (
        "import os, threading\n"
        "from cxr_serving.cpu_scheduling import apply_cpu_scheduling\n"
        "t = threading.Thread(target=threading.Event().wait, daemon=True); t.start()\n"
        "print(apply_cpu_scheduling('batch'))\n"
        "later = []\n"
        "u = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0))); u.start(); u.join()\n"
        "def policy(tid):\n"
        "    try:\n"
        "        return os.sched_getscheduler(int(tid))\n"
        "    except ProcessLookupError:  # a thread that had ended (u, just joined) and was still listed\n"
        "        return None\n"
        "print(sorted({p for x in os.listdir('/proc/self/task') if (p := policy(x)) is not None}), later)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    said, policies = out.stdout.splitlines()
    assert said == "batch (SCHED_BATCH) on 2 threads", out.stdout
    assert policies == f"[{os.SCHED_BATCH}] [{os.SCHED_BATCH}]", out.stdout
