import asyncio
import concurrent.futures
import subprocess
import sys
import threading
import time

import pytest

from cxr_serving.batcher import BatchObserver, DynamicBatcher
from cxr_serving.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from cxr_serving.urgency import Priority, Urgency
from tests.support.concurrency import PeakGauge


class Recorder:
    """`hold`: every forward waits for it (10 s at most) after it has started, before its delay."""

    def __init__(self, delay: float = 0.0, fail_on: object = None, hold: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.hold = hold
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.batches.append(list(items))
        if self.hold is not None:
            self.hold.wait(10)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("boom")
        return [i * 10 for i in items]


async def test_concurrent_requests_coalesce_into_one_batch():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=50)
    results = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert rec.batches == [list(range(8))]
    await b.close()


async def test_batch_never_exceeds_max_size():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=3, max_batch_delay_ms=20)
    results = await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert all(len(x) <= 3 for x in rec.batches)
    assert sum(len(x) for x in rec.batches) == 10
    await b.close()


async def test_lone_request_waits_at_most_max_delay():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=64, max_batch_delay_ms=30)
    t0 = time.perf_counter()
    assert await b.submit(1) == 10
    elapsed = time.perf_counter() - t0
    assert 0.025 <= elapsed < 0.5
    await b.close()


async def test_zero_delay_runs_immediately():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=64, max_batch_delay_ms=0)
    waits = []
    for i in range(5):  # the quickest of 5: a lone pause of a loaded host does not count, a delay would in each
        t0 = time.perf_counter()
        await b.submit(i)
        waits.append(time.perf_counter() - t0)
    assert min(waits) < 0.02, waits
    await b.close()


async def test_full_queue_sheds_with_overloaded():
    rec = Recorder(delay=0.3)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0, max_queue_size=2)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(rec.started.wait, 2)  # worker busy with item 0
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    with pytest.raises(OverloadedError) as err:
        await b.submit(3)
    assert time.perf_counter() - t0 < 0.05  # shed at once, not after waiting
    assert err.value.reason == "QUEUE_FULL"
    assert await first == 0 and [await q for q in queued] == [10, 20]
    await b.close()


async def test_error_reaches_every_caller_of_the_batch():
    rec = Recorder(fail_on=2)
    b = DynamicBatcher("m", rec, max_batch_size=4, max_batch_delay_ms=50)
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert await b.submit(7) == 70  # worker survives
    await b.close()


async def test_per_item_exception_fails_only_that_caller():
    def run(items):
        return [ValueError("bad item") if i == 1 else i for i in items]

    b = DynamicBatcher("m", run, max_batch_size=4, max_batch_delay_ms=30)
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    assert results[0] == 0 and results[2] == 2 and isinstance(results[1], ValueError)
    await b.close()


async def test_cancelled_caller_is_dropped_and_does_not_poison_batch():
    rec = Recorder(delay=0.2)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0)
    blocker = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(rec.started.wait, 2)
    doomed = asyncio.ensure_future(b.submit(1))
    survivor = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0.01)
    doomed.cancel()
    assert await blocker == 0
    assert await survivor == 20
    assert doomed.cancelled()
    assert [1] not in rec.batches  # never ran
    await b.close()


async def test_close_fails_waiting_callers():
    rec = Recorder(delay=0.2)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0)
    running = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(rec.started.wait, 2)
    waiting = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    await b.close()
    with pytest.raises(Exception, match=r"unloaded|stopped"):
        await waiting
    running.cancel()


class Overlap(Recorder):
    """Records how many batches ran at the same time."""

    def __init__(self, delay: float, meet: int = 1, hold: threading.Event | None = None) -> None:
        super().__init__(delay, hold=hold)
        self.gauge = PeakGauge(meet)

    @property
    def peak(self) -> int:
        return self.gauge.peak

    def __call__(self, items):
        with self.gauge.running():
            return super().__call__(items)


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_at_most_max_concurrent_batches_run_at_once(instances):
    rec = Overlap(delay=0.1, meet=instances)
    b = DynamicBatcher("m", rec, max_batch_size=2, max_batch_delay_ms=0, max_concurrent_batches=instances)
    results = await asyncio.gather(*(b.submit(i) for i in range(12)))
    assert results == [i * 10 for i in range(12)]
    assert rec.peak == instances
    await b.close()


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


async def test_while_every_instance_is_busy_the_queue_fills_the_next_batch():
    hold = threading.Event()
    rec = Overlap(delay=0, hold=hold)  # both forwards are held until the rest has queued
    b = DynamicBatcher("m", rec, max_batch_size=4, max_batch_delay_ms=0, max_concurrent_batches=2)
    first = [asyncio.ensure_future(b.submit(0))]
    await asyncio.to_thread(rec.started.wait, 2)  # 0 runs alone on one instance
    first.append(asyncio.ensure_future(b.submit(1)))
    await _until(lambda: rec.peak == 2)  # 1 runs alone on the other
    assert rec.peak == 2
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 6)]
    await _until(lambda: b.queue_depth == 4)
    assert b.queue_depth == 4
    hold.set()
    assert await asyncio.gather(*first, *rest) == [i * 10 for i in range(6)]
    assert sorted(map(sorted, rec.batches)) == [[0], [1], [2, 3, 4, 5]]
    await b.close()


async def test_close_gives_up_on_running_batches_after_the_grace():
    hold = threading.Event()
    rec = Overlap(delay=0, hold=hold)  # both forwards run until the end of the test (10 s at most)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0, max_concurrent_batches=2)
    calls = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
    try:
        await _until(lambda: rec.peak == 2)
        assert rec.peak == 2
        t0 = time.perf_counter()
        assert await b.close(grace_s=0.05) is False  # both forwards still run
        assert time.perf_counter() - t0 < 5  # the grace, not the held forwards
        for c in calls:
            with pytest.raises(ModelNotReadyError, match="stopped"):
                await c
    finally:
        hold.set()


@pytest.mark.parametrize("announced", [False, True])
async def test_close_answers_the_callers_the_collector_already_took_off_the_queue(announced):
    """The collector holds 3 callers while it waits (for the delay, or for a request still decoding):
    close() must answer them, not drop them with the cancelled collector."""
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=5000, announced_arrivals=announced)
    decoding = b.expect() if announced else None  # keeps an announced batch waiting
    calls = [asyncio.ensure_future(b.submit(i, b.expect() if announced else None)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert b.queue_depth == 0  # all three are in the collector's batch
    t0 = time.perf_counter()
    await b.close()
    done, _ = await asyncio.wait(calls, timeout=1.0)
    assert len(done) == 3, "callers held by the collector were stranded by close()"
    assert time.perf_counter() - t0 < 1.0
    for c in calls:
        with pytest.raises(ModelNotReadyError):
            c.result()
    assert rec.batches == []
    if decoding is not None:
        decoding.done()


async def test_close_waits_for_the_running_forward_and_its_caller_gets_the_result():
    release = threading.Event()
    started = threading.Event()

    def forward(items):
        started.set()
        release.wait(10)
        return [i * 10 for i in items]

    b = DynamicBatcher("m", forward, max_batch_size=4, max_batch_delay_ms=0)
    call = asyncio.ensure_future(b.submit(4))
    await asyncio.to_thread(started.wait, 2)
    closing = asyncio.ensure_future(b.close())  # no grace: as long as the forward takes
    await asyncio.sleep(0.3)
    assert not closing.done(), "close() returned while a forward was still running on the model"
    assert not call.done()
    release.set()
    assert await asyncio.wait_for(closing, 5) is True
    assert await call == 40  # the batch that had started finished and answered


async def test_a_batch_that_reaches_a_shut_down_pool_is_model_not_ready_not_internal():
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.shutdown()
    b = DynamicBatcher("m", Recorder(), max_batch_size=1, max_batch_delay_ms=0, executor=pool)
    with pytest.raises(ModelNotReadyError, match="shutting down"):
        await asyncio.wait_for(b.submit(1), 2)
    await b.close()


def test_max_concurrent_batches_must_be_positive():
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        DynamicBatcher("m", Recorder(), max_concurrent_batches=0)


async def test_announced_lone_request_does_not_wait_for_requests_that_do_not_exist():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=5000, announced_arrivals=True)
    arrival = b.expect()
    t0 = time.perf_counter()
    assert await b.submit(7, arrival) == 70
    assert time.perf_counter() - t0 < 2.5  # not the 5 s delay
    await b.close()


async def test_a_batch_waits_for_announced_requests_still_decoding():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=400, announced_arrivals=True)
    first, second = b.expect(), b.expect()

    async def late() -> int:
        await asyncio.sleep(0.1)  # "decoding"
        return await b.submit(2, second)

    assert await asyncio.gather(b.submit(1, first), late()) == [10, 20]
    assert rec.batches == [[1, 2]]
    await b.close()


async def test_a_withdrawn_announcement_releases_the_waiting_batch():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=2000, announced_arrivals=True)
    first, doomed = b.expect(), b.expect()

    async def fails_to_decode() -> None:
        with doomed:  # leaving the block withdraws it, as a decode error would
            await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    result, _ = await asyncio.gather(b.submit(1, first), fails_to_decode())
    assert result == 10 and rec.batches == [[1]]
    assert time.perf_counter() - t0 < 1.0  # released when the announcement went, not after 2 s
    await b.close()


async def test_announcements_are_withdrawn_when_submit_fails():
    rec = Recorder(delay=0.3)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0, max_queue_size=2, announced_arrivals=True)
    running = asyncio.ensure_future(b.submit(0))
    await asyncio.to_thread(rec.started.wait, 2)
    arrival = b.expect()  # announced while the queue still had room ...
    fillers = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # ... then filled by unannounced callers
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await b.submit(3, arrival)
    assert b._upcoming == 0
    assert await asyncio.gather(running, *fillers) == [0, 10, 20]
    await b.close()


async def test_a_closed_batcher_refuses_announcements():
    b = DynamicBatcher("m", Recorder(), announced_arrivals=True)
    await b.close()
    with pytest.raises(Exception, match="shutting down"):
        b.expect()
    assert b._upcoming == 0


async def test_admission_counts_requests_still_decoding_and_sheds_before_the_decode():
    rec = Recorder(delay=0.2)
    b = DynamicBatcher("m", rec, max_batch_size=1, max_batch_delay_ms=0, max_queue_size=3, announced_arrivals=True)
    running = asyncio.ensure_future(b.submit(0, b.expect()))
    await asyncio.to_thread(rec.started.wait, 2)  # 0 runs; the queue is empty again
    queued = asyncio.ensure_future(b.submit(1, b.expect()))
    await asyncio.sleep(0)
    decoding = [b.expect(), b.expect()]  # two more on their way: 1 queued + 2 announced = 3
    with pytest.raises(OverloadedError, match="3 requests waiting"):
        b.expect()
    decoding[0].done()  # one failed to decode: room for one more
    late = b.expect()
    assert await asyncio.gather(running, queued, b.submit(2, decoding[1]), b.submit(3, late)) == [0, 10, 20, 30]
    await b.close()


# -- priority and deadlines (issue 26 item 5) ------------------------------------------------------


class Held(Recorder):
    """Every forward waits for `release()`; a test fills the queue behind the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        assert self.gate.wait(10), "never released"
        return [i * 10 for i in items]

    async def hold_first(self, b: DynamicBatcher) -> asyncio.Future:
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(self.started.wait, 2)
        return first


class Counts(BatchObserver):
    def __init__(self) -> None:
        self.expired = 0
        self.submitted: list[Priority] = []

    def on_expired(self, model: str) -> None:
        self.expired += 1

    def on_submit(self, model: str, priority: Priority) -> None:
        self.submitted.append(priority)


STAT = Urgency(Priority.STAT)


async def test_stat_items_fill_the_next_batch_before_routine_ones_and_keep_their_order():
    rec = Held()
    b = DynamicBatcher("m", rec, max_batch_size=3, max_batch_delay_ms=0)
    first = await rec.hold_first(b)
    routine = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3, 4)]
    await asyncio.sleep(0)
    stat = [asyncio.ensure_future(b.submit(i, urgency=STAT)) for i in (101, 102)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert await asyncio.gather(first, *routine, *stat) == [0, 10, 20, 30, 40, 1010, 1020]
    assert rec.batches == [[0], [101, 102, 1], [2, 3, 4]]
    await b.close()


async def test_routine_requests_filling_the_queue_never_shed_a_stat_request():
    """A routine request counts every waiting request against max_queue_size, a STAT one only STAT ones:
    so the queue holds at most 2 x max_queue_size, and STAT is shed only by STAT."""
    rec = Held()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=0, max_queue_size=2, announced_arrivals=True)
    first = await rec.hold_first(b)
    routine = [asyncio.ensure_future(b.submit(i, b.expect())) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        b.expect()  # routine: the queue is full
    with pytest.raises(OverloadedError):
        await b.submit(3)  # also without an announcement
    announced = b.expect(Priority.STAT)  # STAT: admitted though routine requests fill the queue
    stat = [asyncio.ensure_future(b.submit(101, announced, STAT)), asyncio.ensure_future(b.submit(102, urgency=STAT))]
    await asyncio.sleep(0)
    assert b.queue_depth == 4
    with pytest.raises(OverloadedError):
        b.expect(Priority.STAT)  # two STAT requests wait: STAT is full too
    with pytest.raises(OverloadedError):
        await b.submit(103, urgency=STAT)
    assert b._upcoming == b._upcoming_stat == 0
    rec.gate.set()
    assert await asyncio.gather(first, *routine, *stat) == [0, 10, 20, 1010, 1020]
    assert rec.batches == [[0], [101, 102, 1, 2]]
    await b.close()


async def test_an_item_whose_deadline_passed_in_the_queue_is_answered_and_never_run():
    rec, seen = Held(), Counts()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=0, observer=seen)
    first = await rec.hold_first(b)
    soon = Urgency.of(Priority.ROUTINE, 0.05)
    doomed = [asyncio.ensure_future(b.submit(i, urgency=soon)) for i in (1, 2)]
    doomed.append(asyncio.ensure_future(b.submit(3, urgency=Urgency.of(Priority.STAT, 0.05))))
    later = asyncio.ensure_future(b.submit(4, urgency=Urgency.of(Priority.ROUTINE, 30)))
    forever = asyncio.ensure_future(b.submit(5))
    await asyncio.sleep(0.1)  # their deadlines pass while the forward is held
    rec.gate.set()
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, DeadlineExceededError) for r in results), results
    assert results[0].reason == "DEADLINE_EXCEEDED_IN_QUEUE"
    assert await asyncio.gather(first, later, forever) == [0, 40, 50]
    assert rec.batches == [[0], [4, 5]]  # the expired items never reached the forward
    assert seen.expired == 3
    await b.close()


async def test_expired_items_take_no_place_in_a_batch():
    rec = Held()
    b = DynamicBatcher("m", rec, max_batch_size=2, max_batch_delay_ms=0)
    first = await rec.hold_first(b)
    doomed = [asyncio.ensure_future(b.submit(i, urgency=Urgency.of(Priority.STAT, 0.05))) for i in (1, 2)]
    live = [asyncio.ensure_future(b.submit(i)) for i in (3, 4)]
    await asyncio.sleep(0.1)
    rec.gate.set()
    assert await asyncio.gather(first, *live) == [0, 30, 40]
    assert rec.batches == [[0], [3, 4]]  # one full batch, not [1, 2] dropped and [3, 4] split
    assert all(isinstance(r, DeadlineExceededError) for r in await asyncio.gather(*doomed, return_exceptions=True))
    await b.close()


async def test_a_caller_cancelled_by_its_deadline_counts_as_expired_and_a_plain_cancel_does_not():
    """gRPC cancels a handler when its deadline passes, before the batch forms: that request still
    expired in the queue; one cancelled with time left (the client went away) did not."""
    rec, seen = Held(), Counts()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=0, observer=seen)
    first = await rec.hold_first(b)
    by_deadline = asyncio.ensure_future(b.submit(1, urgency=Urgency.of(Priority.ROUTINE, 0.05)))
    by_client = asyncio.ensure_future(b.submit(2, urgency=Urgency.of(Priority.ROUTINE, 30)))
    await asyncio.sleep(0.1)
    by_deadline.cancel()
    by_client.cancel()
    survivor = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0)
    rec.gate.set()
    assert await asyncio.gather(first, survivor) == [0, 30]
    assert rec.batches == [[0], [3]]
    assert seen.expired == 1
    await b.close()


async def test_an_item_that_expires_while_its_batch_forms_is_dropped_before_the_forward():
    rec = Recorder()
    b = DynamicBatcher("m", rec, max_batch_size=8, max_batch_delay_ms=150)  # the batch waits 150 ms for more
    doomed = asyncio.ensure_future(b.submit(1, urgency=Urgency.of(Priority.ROUTINE, 0.05)))
    assert await b.submit(2) == 20
    with pytest.raises(DeadlineExceededError):
        await doomed
    assert rec.batches == [[2]]
    await b.close()


async def test_submissions_are_reported_by_priority():
    seen = Counts()
    b = DynamicBatcher("m", Recorder(), max_batch_size=8, max_batch_delay_ms=0, observer=seen)
    await asyncio.gather(b.submit(1), b.submit(2, urgency=STAT), b.submit(3, urgency=Urgency(Priority.ROUTINE)))
    assert sorted(seen.submitted) == [Priority.ROUTINE, Priority.ROUTINE, Priority.STAT]
    await b.close()


async def test_the_next_batch_reaches_the_model_before_the_last_ones_callers_are_answered():
    """With one batch at a time, the model is handed the next batch as soon as it returns the last one, not after
    the event loop has run every answered caller's continuation (on a GPU node those are the replies, and the
    GPU would idle through them): batch 2 starts while batch 1's first caller still holds the loop."""
    starts: list[float] = []
    second_queued = threading.Event()

    def run(items):
        starts.append(time.perf_counter())
        if len(starts) == 1:
            second_queued.wait(10)  # batch 1 returns only once 2 and 3 wait for the next
        return [i * 10 for i in items]

    b = DynamicBatcher("m", run, max_batch_size=2, max_batch_delay_ms=0, max_concurrent_batches=1)
    answered: list[float] = []

    async def caller(i: int) -> int:
        out = await b.submit(i)
        # the caller's reply work, in the loop's thread: batch 1's callers hold the loop until batch 2 has
        # started (10 s at most), so batch 2 must be handed over before the loop runs their continuations
        deadline = time.monotonic() + 10
        while i < 2 and len(starts) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        answered.append(time.perf_counter())
        return out

    first = [asyncio.ensure_future(caller(i)) for i in range(2)]
    await _until(lambda: len(starts) == 1)  # batch 1 (callers 0 and 1) is on the model; 2 and 3 wait for the next
    second = [asyncio.ensure_future(caller(i)) for i in range(2, 4)]
    await _until(lambda: b.queue_depth == 2)
    assert b.queue_depth == 2
    second_queued.set()
    assert await asyncio.gather(*first, *second) == [0, 10, 20, 30]
    assert len(starts) == 2
    assert starts[1] < answered[0], (starts, answered)  # before the first answered caller of batch 1 was done
    await b.close()


async def test_close_with_its_grace_spent_answers_the_callers_of_every_submitted_batch():
    """close() whose grace runs out while two forwards block answers every caller of both batches and reports that
    it did not drain."""
    gate = threading.Event()
    ran: list[list[int]] = []

    def run(items):
        ran.append(list(items))
        gate.wait(5)
        return [i * 10 for i in items]

    b = DynamicBatcher("m", run, max_batch_size=1, max_batch_delay_ms=0, max_concurrent_batches=2)
    callers = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
    for _ in range(200):
        if ran:
            break
        await asyncio.sleep(0.005)
    drained = await b.close(grace_s=0.05)
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert drained is False
    assert all(isinstance(o, ModelNotReadyError) for o in outcomes), outcomes
    assert 1 <= len(ran) <= 2 and all(len(batch) == 1 for batch in ran)  # either batch may have started first


async def test_a_pool_that_refuses_a_batch_fails_its_callers_and_the_next_batch_runs():
    """The collector submits each batch itself: a pool that raises on submit (no thread, no memory) answers that
    batch's callers with the error, and the collector, its slot and the next batch carry on."""

    class Refusing(concurrent.futures.ThreadPoolExecutor):
        refusals = 1

        def submit(self, fn, /, *args, **kwargs):
            if self.refusals:
                self.refusals -= 1
                raise MemoryError("no memory for the job")
            return super().submit(fn, *args, **kwargs)

    pool = Refusing(max_workers=1)
    b = DynamicBatcher("m", Recorder(), max_batch_size=1, max_batch_delay_ms=0, executor=pool)
    with pytest.raises(MemoryError, match="no memory"):
        await asyncio.wait_for(b.submit(1), 5)
    assert await asyncio.wait_for(b.submit(2), 5) == 20
    assert await b.close(grace_s=5) is True
    pool.shutdown()


_INTERRUPTED_POOL = """
import asyncio, concurrent.futures
from cxr_serving.batcher import DynamicBatcher
from cxr_serving.errors import ModelNotReadyError

class Interrupted(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn, /, *args, **kwargs):
        raise KeyboardInterrupt

async def answer(caller):
    try:
        await asyncio.wait_for(caller, 5)
        return "answered"
    except ModelNotReadyError as exc:
        return f"refused: {exc}"
    except TimeoutError:
        return "stranded"

loop = asyncio.new_event_loop()
b = DynamicBatcher("m", lambda items: items, max_batch_size=1, max_batch_delay_ms=0, executor=Interrupted(1))
first, queued = loop.create_task(b.submit(1)), loop.create_task(b.submit(2))
try:
    loop.run_until_complete(asyncio.sleep(5))
    print("no interrupt")
except KeyboardInterrupt:
    print("first", loop.run_until_complete(answer(first)))
    print("queued", loop.run_until_complete(answer(queued)))
    print("later", loop.run_until_complete(answer(loop.create_task(b.submit(3)))))
    print("close", loop.run_until_complete(asyncio.wait_for(b.close(grace_s=5), 10)))
"""


def test_an_interrupt_raised_by_the_pool_answers_every_caller_and_stops_the_batcher():
    """KeyboardInterrupt from the pool's submit leaves the collector (asyncio re-raises it out of the loop), but
    first the batch's caller and the queued one are answered, later submits are refused and close() still
    returns: a loop run again waits on nothing forever. In a child process: an interrupt raised inside
    pytest's own loop upsets its interpreter state."""
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_POOL], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == [
        "first refused: model 'm' stopped",
        "queued refused: model 'm' stopped",
        "later refused: model 'm' is shutting down",
        "close True",
    ], out.stdout + out.stderr[-2000:]


async def test_a_drain_runs_the_batch_the_collector_is_still_forming():
    """close(drain=True) while the collector holds a partial batch (it waits out a long batch delay) runs that
    batch and returns at once: the forming batch counts as work still to drain."""
    b = DynamicBatcher("m", Recorder(), max_batch_size=8, max_batch_delay_ms=10_000)
    caller = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.05)  # the collector holds [3] and waits for more
    started = time.perf_counter()
    drained = await asyncio.wait_for(b.close(grace_s=10.0, drain=True), 20)
    assert time.perf_counter() - started < 5.0
    assert drained is True
    assert await asyncio.wait_for(caller, 1) == 30  # drained: run, not refused


async def test_close_without_drain_answers_the_forming_batch_and_stops_the_collector():
    """A close without drain refuses the batch the collector holds (ModelNotReadyError) and returns at once."""
    b = DynamicBatcher("m", Recorder(), max_batch_size=8, max_batch_delay_ms=10_000)
    caller = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    assert await asyncio.wait_for(b.close(grace_s=10.0), 20) is True
    assert time.perf_counter() - started < 5.0
    with pytest.raises(ModelNotReadyError, match="was unloaded"):
        await asyncio.wait_for(caller, 1)


async def test_a_model_thread_that_cannot_start_fails_its_batch_and_the_next_one_gets_a_thread(monkeypatch):
    """The runtime's own pool (WarmThreadPool) when the OS refuses a thread: that batch's callers get the error
    (not "shutting down"), the failed thread takes no place in the pool, and the next batch runs."""
    refusals = [RuntimeError("can't start new thread")]
    real_start = threading.Thread.start

    def start(self):
        if refusals and self.name.startswith("batch-m"):
            raise refusals.pop()
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    b = DynamicBatcher("m", Recorder(), max_batch_size=1, max_batch_delay_ms=0)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await asyncio.wait_for(b.submit(1), 5)
    assert await asyncio.wait_for(b.submit(2), 5) == 20
    assert await b.close(grace_s=5) is True


async def test_close_stops_a_collector_whose_cancel_the_wait_lost():
    """A submit wakes the collector's wait in the same turn as close() cancels it; on 3.11 wait_for then drops the
    cancel, and the collector must stop on seeing the batcher closed: close() returns at once and both callers
    are refused, instead of close() waiting forever on a collector that waits for work."""
    b = DynamicBatcher("m", Recorder(), max_batch_size=8, max_batch_delay_ms=2_000)
    first = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.05)  # the collector holds [3] and waits in wait_for
    second = asyncio.ensure_future(b.submit(4))
    await asyncio.sleep(0)  # the submit has set the event the collector waits on
    closing = asyncio.ensure_future(b.close(grace_s=1))
    done, _ = await asyncio.wait([closing], timeout=5)
    assert closing in done, "close() did not return"
    assert closing.result() is True
    for caller in (first, second):
        with pytest.raises(ModelNotReadyError):
            await asyncio.wait_for(caller, 1)
