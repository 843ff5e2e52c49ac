"""The Linux scheduling policy of a service process's threads (`server_config.cpu_scheduling`).

Why: one request crosses the event loop, a decode thread and a model thread, and those threads wake one another
many times per request. Under the default policy each wake-up may preempt whichever thread is running, so the
threads of one process keep evicting one another's caches mid-work. SCHED_BATCH keeps each thread's fair share
of the CPU but drops wake-up preemption: a woken thread starts when a core is idle, or when the running thread
blocks or has used its slice (docs/serving-runtime.md, "CPU scheduling").
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CHOICES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}  # and "inherit": leave the threads' policy as started
MAX_PASSES = 5  # over the thread list, while threads started meanwhile (by threads not yet switched) keep appearing


def _thread_ids() -> Iterable[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only (later threads inherit it)
        return [0]


def apply_cpu_scheduling(choice: str) -> str:
    """Put every thread of this process under `choice` ('batch' or 'normal'; 'inherit' leaves the policy the
    process was started with, e.g. by systemd's CPUSchedulingPolicy or `chrt`); threads started later inherit it
    from the thread that starts them, child processes from their parent. Returns what is now in effect, for the
    start-up log. Where the platform has no such policy or refuses it, the threads keep their policy and the
    returned text says so."""
    if choice == "inherit":
        return f"inherit: threads keep the policy the process was started with ({_policy_name()})"
    name = CHOICES[choice]
    policy = getattr(os, name, None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return f"{choice} is not available on this platform: threads keep their policy"
    seen: set[int] = set()
    done, refused, settled = 0, "", False
    for _ in range(MAX_PASSES):
        new = [tid for tid in _thread_ids() if tid not in seen]
        if not new:
            settled = True
            break
        for tid in new:
            seen.add(tid)
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
                done += 1
            except ProcessLookupError:  # the thread ended meanwhile
                continue
            except OSError as exc:
                refused = refused or f"{exc.strerror or exc}"
    said = f"{choice} ({name}) on {done} threads"
    if refused:
        said += f"; refused on others ({refused}): those keep their policy"
    if not settled:
        said += f"; threads were still starting after {MAX_PASSES} passes: any started since may keep their policy"
    return said


def _policy_name() -> str:
    """The calling thread's policy, by its os module name (SCHED_OTHER, SCHED_BATCH, ...)."""
    try:
        policy = os.sched_getscheduler(0)
    except (AttributeError, OSError):
        return "unknown"
    names = [
        n
        for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
        if getattr(os, n, None) == policy
    ]
    return names[0] if names else str(policy)
