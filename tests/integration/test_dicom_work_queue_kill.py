"""kill -9 of a worker process mid-work: a new process reopens the queue and finishes every item once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

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


# One node process: lock the queue, take back what an earlier process left claimed, enqueue (first process
# only), claim one item with a 600 s lease, say so, and hang "analysing" it until it is killed.
NODE = """
import sys, time
from cxr_dicom.work_queue import Priority, QueueLock, WorkQueue
QueueLock(sys.argv[1]).acquire()
q = WorkQueue(sys.argv[1], lease_s=600.0, max_attempts=3)
requeued, dead = q.reclaim_abandoned()
if sys.argv[2] == "enqueue":
    for i in range(2):
        q.enqueue("{study}." + str(i), "{study}", "1.2.3", Priority.ROUTINE, str(i))
item = q.claim("node")
print("working", item.sop_uid, item.attempts, requeued, dead, flush=True)
time.sleep(120)
""".replace("{study}", STUDY)


def test_kill_9_with_a_600s_lease_the_restart_takes_it_back_at_once_and_a_poison_image_dies_after_3(tmp_path):
    """Three node processes in turn claim the same image and are killed with SIGKILL (a poison image) while each
    holds a 600 s lease; each restart takes the item back at once (the whole test stays far below one lease),
    a live holder's lock refuses a second process naming its pid, and the 4th start dead-letters the image."""
    from cxr_dicom.work_queue import QueueLock, QueueLockedError

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    seen = []
    for run in range(3):
        node = subprocess.Popen(
            [sys.executable, "-c", NODE, str(tmp_path), "enqueue" if run == 0 else "-"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert node.stdout is not None
            line = node.stdout.readline().split()
            assert line and line[0] == "working", "the node process exited before it claimed an item"
            seen.append((line[1], int(line[2]), int(line[3]), int(line[4])))
            with pytest.raises(QueueLockedError, match=f"pid {node.pid} "):
                QueueLock(tmp_path).acquire()  # a second live process on the same queue file is refused
        finally:
            node.send_signal(signal.SIGKILL)
            node.wait(timeout=30)
        assert node.returncode == -signal.SIGKILL
    poison = f"{STUDY}.0"
    # the same image each time, one attempt more each time, taken back by each restart without waiting 600 s
    assert seen == [(poison, 1, 0, 0), (poison, 2, 1, 0), (poison, 3, 1, 0)]
    with QueueLock(tmp_path), WorkQueue(tmp_path, lease_s=600.0, max_attempts=3) as q:
        assert q.reclaim_abandoned() == (0, 1)
        [(uid, reason)] = q.dead_letters()
        assert uid == poison and "node process stopped during attempt 3" in reason
        other = q.claim("node")
        assert other is not None and other.sop_uid == f"{STUDY}.1" and other.attempts == 1
        assert q.complete(other)
        assert q.study_status(STUDY) == {QUEUED: 0, CLAIMED: 0, DONE: 1, DEAD: 1}
    assert time.monotonic() - started < 60  # far below the 600 s lease the killed processes held
