"""`apply_cpu_scheduling` in this process, with the system call stood in for (so this process keeps its policy):
what it reports when the kernel refuses, when a thread ends meanwhile, when the platform lacks the policy, and
that 'inherit' touches nothing."""

from __future__ import annotations

import os

import pytest

from cxr_serving import cpu_scheduling
from cxr_serving.cpu_scheduling import apply_cpu_scheduling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")


@pytest.fixture
def calls(monkeypatch):
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(cpu_scheduling, "_thread_ids", lambda: [11, 12, 13])
    return made


def fail_on(monkeypatch, calls, failing: int, error: OSError) -> None:
    """The system call stood in for: it raises `error` for thread `failing` and records the others."""

    def setscheduler(tid, policy, _param):
        if tid == failing:
            raise error
        calls.append((tid, policy))

    monkeypatch.setattr(os, "sched_setscheduler", setscheduler)


def test_a_refusal_is_reported_and_the_others_still_switch(monkeypatch, calls):
    fail_on(monkeypatch, calls, 12, PermissionError(1, "Operation not permitted"))
    said = apply_cpu_scheduling("batch")
    assert calls == [(11, os.SCHED_BATCH), (13, os.SCHED_BATCH)]
    assert (
        said == "batch (SCHED_BATCH) on 2 threads; refused on others (Operation not permitted): those keep their policy"
    )


def test_a_thread_that_ended_meanwhile_is_skipped(monkeypatch, calls):
    fail_on(monkeypatch, calls, 11, ProcessLookupError(3, "No such process"))
    assert apply_cpu_scheduling("normal") == "normal (SCHED_OTHER) on 2 threads"
    assert calls == [(12, os.SCHED_OTHER), (13, os.SCHED_OTHER)]


def test_threads_started_during_the_pass_are_switched_too(monkeypatch):
    listings = iter([[1, 2], [1, 2, 3], [1, 2, 3]])
    monkeypatch.setattr(cpu_scheduling, "_thread_ids", lambda: next(listings))
    switched: list[int] = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda tid, _p, _q: switched.append(tid))
    assert apply_cpu_scheduling("batch") == "batch (SCHED_BATCH) on 3 threads"
    assert switched == [1, 2, 3]


def test_inherit_and_a_platform_without_the_policy_change_nothing(monkeypatch, calls):
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: calls.append(a))
    monkeypatch.setattr(os, "sched_getscheduler", lambda _pid: os.SCHED_BATCH)
    assert apply_cpu_scheduling("inherit") == (
        "inherit: threads keep the policy the process was started with (SCHED_BATCH)"
    )
    monkeypatch.delattr(os, "SCHED_BATCH")
    assert apply_cpu_scheduling("batch") == "batch is not available on this platform: threads keep their policy"
    assert calls == []


def test_threads_that_keep_appearing_are_reported(monkeypatch):
    counter = iter(range(10**6))
    monkeypatch.setattr(cpu_scheduling, "_thread_ids", lambda: [next(counter)])
    monkeypatch.setattr(os, "sched_setscheduler", lambda *_a: None)
    said = apply_cpu_scheduling("batch")
    assert said.startswith(f"batch (SCHED_BATCH) on {cpu_scheduling.MAX_PASSES} threads; threads were still starting")
