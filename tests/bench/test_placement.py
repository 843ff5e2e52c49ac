"""bench/_placement.py: `split` pins a real process tree (children and threads) and reads it back, and refuses
to run without two CPUs to split."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench._common import process_tree
from bench._placement import PlacementError, parse_cpus, pin_tree, plan, read_back
from tests.support.paths import REPO

ALLOWED = frozenset(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning to a subset needs 2 allowed CPUs")

# A parent with an extra thread that starts a child with an extra thread, then prints the child's pid.
TREE = """
import subprocess, sys, threading, time
child = subprocess.Popen([sys.executable, "-c",
    "import threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); time.sleep(60)"])
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(child.pid, flush=True)
child.wait()
"""


def affinity_of_every_thread(pids: list[int]) -> dict[int, frozenset[int]]:
    return {
        int(t.name): frozenset(os.sched_getaffinity(int(t.name)))
        for pid in pids
        for t in Path(f"/proc/{pid}/task").iterdir()
    }


@needs_two_cpus
def test_pin_tree_pins_every_process_and_thread_of_a_real_child_tree() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while len(affinity_of_every_thread([child])) < 2 and time.monotonic() < deadline:  # the child's thread
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        assert child in tree and len(tree) == 2
        assert set(affinity_of_every_thread(tree).values()) == {ALLOWED}  # started on every allowed CPU
        for cpu in sorted(ALLOWED)[-1], min(ALLOWED):  # one CPU, then another: each time every thread moves
            target = frozenset({cpu})
            pin_tree(proc.pid, target)
            by_thread = affinity_of_every_thread(tree)
            assert len(by_thread) >= 4 and set(by_thread.values()) == {target}  # 2 processes x 2 threads at least
            back = read_back(proc.pid, target)
            assert back["held"] and back["pids"] == {str(p): [cpu] for p in tree}
            assert back["threads"] == back["threads_on_set"] == len(by_thread)
        assert not read_back(proc.pid, ALLOWED)["held"]  # the read-back sees a tree off its expected set
    finally:
        for pid in reversed(process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait(timeout=10)


def test_split_refuses_a_single_cpu() -> None:
    with pytest.raises(PlacementError, match=r"split needs at least 2 CPUs .* CPU\(s\) \[3\] only"):
        plan("split", allowed=frozenset({3}))
    assert plan("shared", allowed=frozenset({3})).model_cpus == frozenset({3})  # shared runs anywhere


def test_the_bench_refuses_split_on_one_cpu_before_starting_anything() -> None:
    cpu = min(ALLOWED)
    cmd = [sys.executable, "-m", "bench.dicom_node", "--placement", "split", "--quick"]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--placement split needs at least 2 CPUs" in proc.stderr and f"[{cpu}] only" in proc.stderr


def test_split_halves_the_allowed_cpus_or_takes_the_lists() -> None:
    two, four, three = frozenset({0, 1}), frozenset(range(4)), frozenset({2, 5, 7})
    assert (plan("split", two).model_cpus, plan("split", two).node_cpus) == ({0}, {1})
    assert (plan("split", four).model_cpus, plan("split", four).node_cpus) == ({0, 1}, {2, 3})
    assert (plan("split", three).model_cpus, plan("split", three).node_cpus) == ({2, 5}, {7})  # models: larger half
    assert plan("split", four, node_cpus=frozenset({3})).model_cpus == {0, 1, 2}
    assert plan("split", four, model_cpus=frozenset({1})).node_cpus == {0, 2, 3}
    given = plan("split", four, model_cpus=frozenset({0}), node_cpus=frozenset({3}))
    assert given.as_json() == {"mode": "split", "allowed_cpus": [0, 1, 2, 3], "model_cpus": [0], "node_cpus": [3]}
    shared = plan("shared", four)
    assert shared.model_cpus == shared.node_cpus == four


@pytest.mark.parametrize(
    ("mode", "models", "node", "error"),
    [
        ("split", {0, 1}, {1, 2}, r"share CPU\(s\) \[1\]"),
        ("split", {0, 9}, None, r"--model-cpus \[0, 9\] not within"),
        ("split", {0, 1, 2, 3}, None, "--node-cpus is empty"),
        ("shared", {0}, None, "need --placement split"),
        ("spread", None, None, "unknown placement"),
    ],
)
def test_a_placement_that_cannot_be_applied_is_refused(mode, models, node, error) -> None:
    with pytest.raises(PlacementError, match=error):
        plan(mode, frozenset(range(4)), model_cpus=models and frozenset(models), node_cpus=node and frozenset(node))


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    assert parse_cpus("0") == {0} and parse_cpus("0,2") == {0, 2} and parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "1-b"):
        with pytest.raises(PlacementError):
            parse_cpus(bad)
