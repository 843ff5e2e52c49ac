"""CPU-time comparisons for the perf tests: functions measured in turn in one process, so that a slow moment on a
shared host hits each of them alike; the tests assert ratios, never an absolute time."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_cpu_of_turns(
    fns: dict[str, Callable[[], object]],
    turns: int = 7,
    repeat: int = 5,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, float]:
    """Each function's least CPU time over `turns`, the functions taking turns (a slow moment hits both). The
    default clock counts every thread of this process (torch may use several); `time.thread_time` counts only the
    caller's, for single-threaded work that other tests' leftover threads must not be billed to."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(turns):
        for name, fn in fns.items():
            t = clock()
            for _ in range(repeat):
                fn()
            best[name] = min(best[name], (clock() - t) / repeat)
    return best
