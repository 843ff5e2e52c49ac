"""handoff.run_on: a thread pool job awaited from the event loop with one wake-up.

These tests check the mechanism (no chained future), not the saving: inside a full test run the
saving per hand-off is within the noise."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from pathlib import Path

import pytest

from cxr_serving.batcher import DynamicBatcher
from cxr_serving.handoff import WarmThreadPool, run_on
from cxr_serving.images import DecodeLimits, DecodePool
from cxr_serving.os_thread_name import kernel_name


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="handoff-test") as p:
        yield p


async def test_result_comes_back_from_a_pool_thread(pool) -> None:
    total, thread = await run_on(pool, lambda a, b: (a + b, threading.current_thread().name), 2, 3)
    assert total == 5 and thread.startswith("handoff-test")


async def test_exception_reaches_the_caller(pool) -> None:
    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        await run_on(pool, fail)


async def test_job_whose_caller_gave_up_before_it_started_is_skipped(pool) -> None:
    release, ran = threading.Event(), []
    blocker = asyncio.ensure_future(run_on(pool, release.wait, 10))  # occupies the only thread
    queued = asyncio.ensure_future(run_on(pool, ran.append, "ran"))
    await asyncio.sleep(0.05)
    queued.cancel()
    release.set()
    assert await blocker is True
    with pytest.raises(asyncio.CancelledError):
        await queued
    await run_on(pool, lambda: None)  # the queued job has had its turn
    assert ran == []


async def test_result_of_a_cancelled_running_job_is_dropped(pool) -> None:
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "late"

    task = asyncio.ensure_future(run_on(pool, slow))
    while not started.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await run_on(pool, lambda: "next") == "next"  # settling the cancelled future raised nothing


async def test_decode_pool_and_batcher_hand_off_without_chaining_a_concurrent_future(monkeypatch) -> None:
    """`run_in_executor` chains a concurrent.futures.Future to the asyncio one (the loop then copies its
    state under the future's Condition lock); the services' pools settle their future directly."""
    chained: list[object] = []
    chain = asyncio.futures._chain_future  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()

    def probe(source: object, destination: object) -> None:
        # the patch is process-wide: servers other tests left running on their own loops also chain
        if isinstance(destination, asyncio.Future) and destination.get_loop() is loop:
            chained.append((source, destination))
        chain(source, destination)

    monkeypatch.setattr(asyncio.futures, "_chain_future", probe)
    pool = DecodePool(DecodeLimits(), workers=1)
    batcher = DynamicBatcher("m", lambda items: [i * 2 for i in items], max_batch_size=4, max_batch_delay_ms=1)
    batcher.start()
    try:
        assert await pool.run(abs, -3) == 3
        assert await batcher.submit(21) == 42
        assert chained == []
        await asyncio.get_running_loop().run_in_executor(None, abs, -1)  # the probe does see chaining
        assert len(chained) == 1
    finally:
        await batcher.close()
        pool.close()


def test_pool_threads_carry_their_names_in_the_kernel() -> None:
    """`top -H` and /proc show a pool thread by its name (the end kept where the kernel's 15 bytes cut it), so
    an operator and the benchmarks tell the decode and model threads from the event loop."""
    if not sys.platform.startswith("linux"):
        pytest.skip("kernel thread names are read from /proc")
    assert kernel_name("decode_0") == b"decode_0"
    assert kernel_name("batch-multiclass_classifier_0") == b"ss_classifier_0"
    pool = WarmThreadPool(2, thread_name_prefix="batch-multiclass_classifier")
    try:
        comm = pool.submit(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
        assert comm.result(timeout=10) == "ss_classifier_0"
    finally:
        pool.shutdown()
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() != "ss_classifier_0"


async def test_start_on_new_thread_runs_once_on_a_thread_that_ends_and_keeps_the_callers_context():
    """A thread of its own (named, in the kernel too), the caller's contextvars inside it, the result or the
    exception back on the loop, and the thread gone afterwards."""
    import contextvars

    from cxr_serving.handoff import start_on_new_thread

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    seen: dict[str, object] = {}

    def job(x: int) -> int:
        seen["tid"] = threading.get_native_id()
        seen["var"] = var.get()
        seen["comm"] = Path(f"/proc/self/task/{seen['tid']}/comm").read_text().strip()
        return x * 2

    assert await start_on_new_thread(job, 21, name="model-load") == 42
    assert seen["tid"] != threading.get_native_id() and seen["var"] == "caller's" and seen["comm"] == "model-load"
    for _ in range(500):  # the thread ends right after it settles the future
        if not Path(f"/proc/self/task/{seen['tid']}").exists():
            break
        await asyncio.sleep(0.01)
    assert not Path(f"/proc/self/task/{seen['tid']}").exists()

    def fails() -> None:
        raise ValueError("no checkpoint")

    with pytest.raises(ValueError, match="no checkpoint"):
        await start_on_new_thread(fails, name="model-load")


@pytest.mark.parametrize("how", ["pool", "new thread"])
async def test_a_job_that_raises_stopiteration_reaches_its_caller_as_runtimeerror(how):
    """A future cannot hold StopIteration (set_exception raises TypeError on the loop): without the wrap the
    caller would wait forever."""
    from cxr_serving.handoff import start_on_new_thread

    def job() -> int:
        return next(iter(()))

    if how == "pool":
        pool = WarmThreadPool(1, "t")
        try:
            awaited = run_on(pool, job)
            with pytest.raises(RuntimeError, match="StopIteration") as info:
                await asyncio.wait_for(awaited, 5)
        finally:
            pool.shutdown()
    else:
        with pytest.raises(RuntimeError, match="StopIteration") as info:
            await asyncio.wait_for(start_on_new_thread(job, name="model-load"), 5)
    assert isinstance(info.value.__cause__, StopIteration)
