"""kill -9 of a worker process mid-work: a new process reopens the queue and finishes every item once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cxr_dicom.work_queue import CLAIMED, DEAD, DONE, QUEUED, WorkQueue

STUDY = "1.2.826.0.1.3680043.8.498.77"
N = 30

# The child enqueues N instances (every 5th STAT), completes 10 of them, claims an 11th, says so, and hangs
# "analysing" it until it is killed.
CHILD = f"""
import sys, time
from cxr_dicom.work_queue import Priority, WorkQueue
q = WorkQueue(sys.argv[1], lease_s=1.0, max_attempts=3)
for i in range({N}):
    q.enqueue("{STUDY}." + str(i), "{STUDY}", "1.2.3", Priority.STAT if i % 5 == 0 else Priority.ROUTINE, str(i))
print("enqueued", flush=True)
for _ in range(10):
    item = q.claim("child")
    assert q.complete(item)
    print("done", item.sop_uid, flush=True)
item = q.claim("child")
print("working", item.sop_uid, flush=True)
time.sleep(120)
"""


def test_kill_9_mid_work_loses_nothing_and_completes_each_item_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    child_done: list[str] = []
    in_work = None
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        for _ in range(N + 5):
            line = child.stdout.readline().split()
            assert line, "the child exited before it claimed its 11th item"
            if line[0] == "done":
                child_done.append(line[1])
            elif line[0] == "working":
                in_work = line[1]
                break
            assert time.monotonic() < deadline
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(child_done) == 10 and in_work is not None

    with WorkQueue(tmp_path, lease_s=1.0, max_attempts=3) as q:
        assert q.study_status(STUDY) == {QUEUED: N - 11, CLAIMED: 1, DONE: 10, DEAD: 0}
        parent_done: list[str] = []
        attempts: dict[str, int] = {}
        deadline = time.monotonic() + 30
        for _ in range(1000):
            if len(parent_done) == N - 10 or time.monotonic() > deadline:
                break
            item = q.claim("parent")
            if item is None:  # only the killed child's item is left: wait for its lease (1 s) to expire
                time.sleep(0.05)
                continue
            attempts[item.sop_uid] = item.attempts
            assert q.complete(item)
            parent_done.append(item.sop_uid)
        assert q.study_status(STUDY) == {QUEUED: 0, CLAIMED: 0, DONE: N, DEAD: 0}
    # every item finished, none twice, and the one the child was analysing was redone by the parent
    assert set(child_done).isdisjoint(parent_done)
    assert sorted(child_done + parent_done) == sorted(f"{STUDY}.{i}" for i in range(N))
    assert len(parent_done) == len(set(parent_done))
    assert in_work in parent_done and attempts[in_work] == 2
    # STAT first: the child took the 6 STAT items before any routine one
    assert child_done[:6] == [f"{STUDY}.{i}" for i in range(0, N, 5)]
