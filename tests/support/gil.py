"""Whether a C call releases the GIL, told by a Python loop in this thread while another thread makes the call:
holding the GIL, each call stops the loop for its whole length."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def assert_runs_without_the_gil(call: Callable[[], None], calls: int = 3) -> float:
    """Time `call` alone (best of two), then run it `calls` times in a thread while this thread loops with 1 ms
    sleeps; at most one loop gap of half a call or more is allowed (a host that deschedules this thread once).
    Returns the call's own time, which the caller may bound from below so that the gaps can tell."""
    alone = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        call()
        alone = min(alone, time.perf_counter() - started)
    done = threading.Event()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                call()
        except BaseException as exc:  # reported below, in the test's thread
            failed.append(exc)
        finally:
            done.set()

    gaps: list[float] = []
    thread = threading.Thread(target=work)
    last = time.perf_counter()
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        time.sleep(0.001)
    thread.join()
    if failed:
        raise failed[0]
    long_gaps = [g for g in gaps if g >= 0.5 * alone]
    assert alone > 0.02, f"the call took {alone:.4f} s: too short for the gaps to tell"
    assert len(gaps) > 20 and len(long_gaps) <= 1, (len(gaps), long_gaps, alone)
    return alone
