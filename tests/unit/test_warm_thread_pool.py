"""cxr_serving.handoff.WarmThreadPool: after a burst has started every thread, lone jobs (concurrency 1) all
run on one thread, where a ThreadPoolExecutor hands them round its threads; and it keeps an executor's
contract (results, exceptions, a bound on threads, a backlog, refusal after shutdown)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from cxr_serving.handoff import PoolClosedError, WarmThreadPool, run_on


def burst_then_lone_jobs(pool: concurrent.futures.Executor, workers: int, lone: int) -> set[int]:
    """Start every thread with `workers` overlapping jobs, then run `lone` jobs one after another: the
    threads the lone jobs ran on."""
    barrier = threading.Barrier(workers)
    for f in [pool.submit(barrier.wait, 5) for _ in range(workers)]:
        f.result(timeout=10)
    threads = set()
    for _ in range(lone):
        threads.add(pool.submit(lambda: (time.sleep(0.002), threading.get_ident())[1]).result(timeout=10))
    return threads


def test_lone_jobs_after_a_burst_stay_on_one_thread():
    pool = WarmThreadPool(2, thread_name_prefix="t")
    try:
        assert len(burst_then_lone_jobs(pool, 2, 30)) == 1
    finally:
        pool.shutdown()


def test_results_exceptions_bound_and_backlog():
    pool = WarmThreadPool(2, thread_name_prefix="t")
    try:
        started = threading.Semaphore(0)
        release = threading.Event()

        def held(i: int) -> int:
            started.release()
            release.wait(5)
            return i

        futures = [pool.submit(held, i) for i in range(6)]  # 2 run, 4 wait in the backlog
        assert started.acquire(timeout=5) and started.acquire(timeout=5)
        assert not started.acquire(timeout=0.1)  # no third thread
        assert len({t.name for t in threading.enumerate() if t.name.startswith("t_")}) == 2
        release.set()
        assert [f.result(timeout=5) for f in futures] == list(range(6))
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=5)
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(int)
    assert not [t for t in threading.enumerate() if t.name.startswith("t_")]  # shutdown ended the threads


async def test_run_on_a_shut_down_pool_is_pool_closed():
    pool = WarmThreadPool(1)
    assert await run_on(pool, sum, [1, 2]) == 3
    pool.shutdown(wait=False)
    await asyncio.sleep(0)
    with pytest.raises(PoolClosedError):
        await run_on(pool, sum, [1, 2])
