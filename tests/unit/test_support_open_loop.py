"""The tests' open-loop generator: after a stall of its own process it catches up in a burst by default, and with
`catch_up=False` drops the overdue sends instead (the overload test's recovery phase relies on this)."""

from __future__ import annotations

import time

from tests.support.load import open_loop


def _stalling_call(sent: list[float]):
    async def call() -> None:
        sent.append(time.perf_counter())
        if len(sent) == 1:
            time.sleep(0.3)  # blocks the event loop, as a long garbage collection of this process would

    return call


async def test_a_stalled_generator_bursts_with_catch_up_and_skips_without_it() -> None:
    bursty: list[float] = []
    out = await open_loop(_stalling_call(bursty), 50, 0.6)
    assert out.total == 30 and out.skipped == 0
    after_stall = [t for t in bursty if t - bursty[0] >= 0.3]
    assert sum(1 for t in after_stall if t - after_stall[0] < 0.01) >= 10  # the ~14 overdue sends at once

    spaced: list[float] = []
    out = await open_loop(_stalling_call(spaced), 50, 0.6, catch_up=False)
    assert out.skipped >= 10 and out.total + out.skipped == 30
    # no burst: at most the send that was waiting through the stall and the next one on schedule fall together
    assert max(sum(1 for u in spaced if 0 <= u - t < 0.01) for t in spaced) <= 2
