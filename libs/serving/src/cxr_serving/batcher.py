"""Dynamic batcher: coalesce concurrent requests into one forward pass (LitServe/Triton style).

One forward over a batch costs far less per image than one forward per request, so callers
`await batcher.submit(item)` and a collector runs `run_batch(items)` on whatever arrived within
`max_batch_delay_ms`. How it collects, orders by priority, sheds, drops expired requests, cancels and
closes: docs/serving-runtime.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cxr_serving.errors import DeadlineExceededError, ModelNotReadyError, OverloadedError
from cxr_serving.handoff import PoolClosedError, WarmThreadPool, start_on
from cxr_serving.urgency import ROUTINE, Priority, Urgency

In = TypeVar("In")
Out = TypeVar("Out")

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.005  # how often a draining close looks whether its queue has run out


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float
    urgency: Urgency = ROUTINE


class _Lanes(Generic[In, Out]):
    """The waiting requests, one first-in-first-out lane per priority; STAT is always taken first."""

    ORDER = (Priority.STAT, Priority.ROUTINE)

    def __init__(self) -> None:
        self._lanes: dict[Priority, deque[_Pending[In, Out]]] = {p: deque() for p in self.ORDER}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def count(self, priority: Priority) -> int:
        return len(self._lanes[priority])

    def append(self, pending: _Pending[In, Out]) -> None:
        self._lanes[pending.urgency.priority].append(pending)

    def pop(self) -> _Pending[In, Out] | None:
        for priority in self.ORDER:
            if self._lanes[priority]:
                return self._lanes[priority].popleft()
        return None


class _Once:
    """Calls `fn` the first time it is called, and never again: a batch gives its slot back once."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def on_queue_depth(self, model: str, depth: int) -> None: ...

    def on_batch(self, model: str, size: int, seconds: float, ok: bool) -> None: ...

    def on_shed(self, model: str) -> None: ...

    def on_submit(self, model: str, priority: Priority) -> None: ...

    def on_expired(self, model: str) -> None: ...


class Arrival:
    """A request announced to a batcher and not yet submitted; `done()` (idempotent) withdraws it."""

    __slots__ = ("_batcher", "_open", "priority")

    def __init__(self, batcher: DynamicBatcher[Any, Any], priority: Priority) -> None:
        self._batcher = batcher
        self._open = True
        self.priority = priority

    def done(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arrived(self.priority)

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class DynamicBatcher(Generic[In, Out]):
    """Callers share forwards but never each other's failures: an exception from `run_batch` reaches
    every caller of that batch, an Exception in place of one item's result fails only that caller, a
    cancelled caller is dropped, and a full queue raises `OverloadedError` instead of growing.
    STAT requests are taken before routine ones, and a request whose deadline passed in the queue is
    answered with `DeadlineExceededError` instead of being run."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[In]], Sequence[Out | BaseException]],
        *,
        max_batch_size: int = 8,
        max_batch_delay_ms: float = 5.0,
        max_queue_size: int = 256,
        observer: BatchObserver | None = None,
        executor: concurrent.futures.Executor | None = None,
        max_concurrent_batches: int = 1,
        announced_arrivals: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_delay_ms < 0 or max_concurrent_batches < 1:
            raise ValueError(
                "max_batch_size, max_queue_size and max_concurrent_batches must be >= 1, max_batch_delay_ms >= 0"
            )
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self.announced_arrivals = announced_arrivals
        self._upcoming = 0  # announced, not yet submitted
        self._upcoming_stat = 0  # of which STAT
        self._changed: asyncio.Event | None = None  # set on every submit and withdrawn announcement
        self._observer = observer or BatchObserver()
        self._own_executor = executor is None
        self._executor = executor or WarmThreadPool(max_concurrent_batches, thread_name_prefix=f"batch-{name}")
        self._queue: _Lanes[In, Out] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[None], list[_Pending[In, Out]]] = {}  # batch task -> its callers
        self._closed = False
        self._draining = False  # closing with drain: batches form without waiting for more arrivals
        self._forming: list[_Pending[In, Out]] = []  # the batch the collector holds, not yet submitted

    @property
    def queue_depth(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def start(self) -> None:
        if self._worker is None:
            self._queue = _Lanes()
            self._changed = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def expect(self, priority: Priority = Priority.ROUTINE) -> Arrival:
        """Announce a request that will `submit` soon (call it when the request arrives).

        Admission control: announced requests count against `max_queue_size` with the queued
        ones, so an overloaded model refuses a request here, before its image is decoded,
        instead of after spending the decode on it."""
        if self._closed:
            raise ModelNotReadyError(f"model '{self.name}' is shutting down")
        stat = priority is Priority.STAT
        if self._waiting(priority) + (self._upcoming_stat if stat else self._upcoming) >= self.max_queue_size:
            self._shed()
        self._upcoming += 1
        self._upcoming_stat += stat
        return Arrival(self, priority)

    def _waiting(self, priority: Priority) -> int:
        """The queued requests a new one of `priority` counts against: a routine request counts every
        queued request, a STAT one only the STAT ones, so routine work never fills the queue for STAT."""
        if self._queue is None:
            return 0
        return self._queue.count(Priority.STAT) if priority is Priority.STAT else len(self._queue)

    def _shed(self) -> None:
        self._observer.on_shed(self.name)
        raise OverloadedError(
            f"model '{self.name}' has {self.max_queue_size} requests waiting; retry with backoff",
            metadata={"model": self.name, "max_queue_size": str(self.max_queue_size)},
        )

    def _arrived(self, priority: Priority) -> None:
        self._upcoming -= 1
        self._upcoming_stat -= priority is Priority.STAT
        if self._changed is not None:
            self._changed.set()

    async def submit(self, item: In, arrival: Arrival | None = None, urgency: Urgency = ROUTINE) -> Out:
        """Queue `item` for a batch and wait for its result; `urgency` gives its priority and deadline."""
        try:
            if self._closed:
                raise ModelNotReadyError(f"model '{self.name}' is shutting down")
            self.start()
            assert self._queue is not None and self._changed is not None
            loop = asyncio.get_running_loop()
            pending: _Pending[In, Out] = _Pending(item, loop.create_future(), time.perf_counter(), urgency)
            if self._waiting(urgency.priority) >= self.max_queue_size:
                self._shed()
            self._queue.append(pending)
            self._changed.set()
        finally:
            if arrival is not None:
                arrival.done()
        self._observer.on_submit(self.name, urgency.priority)
        self._observer.on_queue_depth(self.name, len(self._queue))
        return await pending.future  # cancellation of the caller cancels only its own future

    def _nothing_on_its_way(self) -> bool:
        return self.announced_arrivals and self._upcoming <= 0

    def _take(self) -> _Pending[In, Out] | None:
        """The most urgent waiting request still worth running; expired ones are answered on the way."""
        assert self._queue is not None
        while (p := self._queue.pop()) is not None:
            if self._expire(p, time.perf_counter()) or p.future.done():
                continue
            return p
        return None

    def _expire(self, p: _Pending[In, Out], now: float) -> bool:
        """Answer (and count) a request whose deadline has passed; a caller that the deadline already
        cancelled (gRPC does so) is counted too, as it expired in the queue all the same."""
        if not p.urgency.expired(now):
            return False
        self._observer.on_expired(self.name)
        if not p.future.done():
            p.future.set_exception(
                DeadlineExceededError(
                    f"the deadline passed while the request waited for model '{self.name}'; it was not run",
                    metadata={"model": self.name},
                )
            )
        return True

    def _stop_if_closed(self) -> None:
        """After every wake-up: a cancel that reached a wait already done is lost (3.11's wait_for), so the
        collector also stops on seeing the batcher closed."""
        if self._closed:
            raise asyncio.CancelledError

    async def _collect(self) -> list[_Pending[In, Out]]:
        assert self._queue is not None and self._changed is not None
        while (first := self._take()) is None:
            self._changed.clear()
            await self._changed.wait()
            self._stop_if_closed()
        batch = self._forming = [first]  # counted as work in flight until it is submitted (a drain waits for it)
        try:
            deadline = first.enqueued + self.max_batch_delay
            while len(batch) < self.max_batch_size:
                self._changed.clear()
                if (p := self._take()) is not None:
                    batch.append(p)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._nothing_on_its_way() or self._draining:
                    break
                try:  # woken by a submit or a withdrawn announcement, whichever comes first
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
                self._stop_if_closed()
        except BaseException:  # close() cancelled us: these callers are off the queue, so answer them here
            self._fail(batch, "was unloaded")
            self._forming = []
            raise
        return batch

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_concurrent_batches)
        while True:
            await slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                slots.release()
                raise
            now = time.perf_counter()  # drop callers that expired while the batch formed, or gave up
            live = [p for p in batch if not self._expire(p, now) and not p.future.done()]
            self._forming = []  # from here to its task, no await: the batch is in _running before anyone looks
            self._observer.on_queue_depth(self.name, len(self._queue))
            if not live:
                slots.release()
                continue
            release = _Once(slots.release)
            # submitted here, not in the task's first step: the task would start after every callback already
            # queued (the last batch's callers' replies), and the model would wait for them
            try:
                started, job = time.perf_counter(), self._start(live)
            except BaseException:  # KeyboardInterrupt or SystemExit from the pool: this collector ends here
                self._collector_ended(live)
                raise
            task = loop.create_task(self._run(live, job, release, started), name=f"batch-{self.name}")
            self._running[task] = live

            def done(t: asyncio.Task[None], release: _Once = release, job: Any = job, live: Any = live) -> None:
                self._running.pop(t, None)
                if t.cancelled() or t.exception() is not None:  # cancelled before its first step, or broken:
                    if isinstance(job, asyncio.Future):  # its callers may be unanswered and its job unawaited
                        job.cancel()
                    self._fail(live, "stopped")
                release()

            task.add_done_callback(done)

    def _start(self, live: list[_Pending[In, Out]]) -> asyncio.Future[Sequence[Out | BaseException]] | BaseException:
        """The batch submitted to the model's thread, or the error its callers get instead (the collector
        goes on either way)."""
        if self._closed:  # closed before this batch reached a thread: its pool may be shut down
            return ModelNotReadyError(f"model '{self.name}' was unloaded", metadata={"model": self.name})
        try:
            return start_on(self._executor, self._run_batch, [p.item for p in live])
        except PoolClosedError:  # a shared pool shut down under us: the model is going away, not broken
            return ModelNotReadyError(f"model '{self.name}' is shutting down", metadata={"model": self.name})
        except Exception as exc:  # the pool could not take it (no thread, no memory): these callers fail, not hang
            return exc

    def _fail(self, pending: list[_Pending[In, Out]], what: str) -> None:
        for p in pending:
            if not p.future.done():
                p.future.set_exception(ModelNotReadyError(f"model '{self.name}' {what}", metadata={"model": self.name}))

    @staticmethod
    def _fail_with(pending: list[_Pending[In, Out]], exc: BaseException) -> None:
        """Every caller still waiting gets `exc` (a batch's failure reaches all of its callers)."""
        for p in pending:
            if not p.future.done():
                p.future.set_exception(exc)

    def _collector_ended(self, live: list[_Pending[In, Out]]) -> None:
        """The collector is leaving on an interrupt: answer this batch and every queued caller, refuse later
        submits, and leave close() to wait for the batches already running as usual."""
        self._closed, self._worker = True, None
        self._fail(live, "stopped")
        self._fail_queued("stopped")

    def _fail_queued(self, what: str) -> None:
        """Every queued caller gets ModelNotReadyError(`what`), taken off the queue."""
        if self._queue is not None:
            while (p := self._queue.pop()) is not None:
                self._fail([p], what)

    def _stop_taking(self) -> asyncio.Task[None] | None:
        """Close, stop the worker (it answers the batch it was forming) and answer every queued caller."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()  # _collect answers the callers it holds
            if self._changed is not None:
                self._changed.set()  # and wakes to see it is closed, should the cancel be lost
        self._fail_queued("was unloaded")
        return worker

    async def _run(
        self,
        live: list[_Pending[In, Out]],
        job: asyncio.Future[Sequence[Out | BaseException]] | BaseException,
        release: Callable[[], None],
        started: float,
    ) -> None:
        if isinstance(job, BaseException):
            self._fail_with(live, job)
            return
        try:
            results = await job
            release()  # the next batch can start now, before this one's callers are answered
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} inputs")
        except asyncio.CancelledError:  # close() stopped waiting for this batch (its grace ran out)
            self._fail(live, "stopped")
            raise
        except BaseException as exc:  # fan the failure out to every caller of the batch
            release()
            self._observer.on_batch(self.name, len(live), time.perf_counter() - started, False)
            self._fail_with(live, exc)
            return
        self._observer.on_batch(self.name, len(live), time.perf_counter() - started, True)
        for p, result in zip(live, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    @property
    def closed(self) -> bool:
        return self._closed

    def _idle(self) -> bool:
        return not self._running and self._upcoming <= 0 and self.queue_depth == 0 and not self._forming

    async def close(self, grace_s: float | None = None, *, drain: bool = False) -> bool:
        """Stop taking work and answer every caller; wait (up to `grace_s`, None: no limit) for the
        batches already running, so that the weights their threads use can be freed after. With
        `drain`, the requests already queued or announced are run first, within the same grace: a
        version that no longer receives new traffic answers the callers it has.

        Returns False when a forward was still running as the grace ran out: its callers then got
        ModelNotReadyError, and its thread still holds the model."""
        if drain and not self._closed:
            started = time.perf_counter()
            self._draining = True  # no new traffic comes: what waits runs at once, not after the batch delay
            if self._changed is not None:
                self._changed.set()
            try:
                while not self._idle() and (grace_s is None or time.perf_counter() - started < grace_s):
                    await asyncio.sleep(_DRAIN_POLL_S)
            except BaseException:  # cancelled (shutdown): nobody is left waiting unanswered
                self._stop_taking()
                raise
            if not self._idle():
                log.warning("model %s: requests still queued after the %.1fs drain grace", self.name, grace_s)
            if grace_s is not None:
                grace_s = max(0.0, grace_s - (time.perf_counter() - started))
        worker = self._stop_taking()
        if worker is not None and not worker.done():
            await asyncio.wait([worker])  # not `await worker`: a cancel of close() itself must reach close()
        if worker is not None and not worker.cancelled() and worker.exception() is not None:
            raise worker.exception()  # type: ignore[misc]  # the collector broke: say so
        drained = True
        if self._running:
            _, late = await asyncio.wait(list(self._running), timeout=grace_s)
            if late:
                drained = False
                log.warning(
                    "model %s: %d batch(es) still running after %.1fs; not waiting", self.name, len(late), grace_s
                )
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        for live in list(self._running.values()):  # tasks cancelled before their first step never ran
            self._fail(live, "stopped")
        if self._own_executor:
            self._executor.shutdown(wait=False)
        return drained
