"""Run a blocking call on a thread pool and await it from the event loop, with one wake-up.

`loop.run_in_executor` chains a concurrent.futures.Future to an asyncio future: when the job ends,
the loop thread runs the chaining callbacks, which take the concurrent future's Condition lock,
copy its state and check it again. Every request crosses to a thread pool two or three times
(decode, forward, for segmentation the mask encoding), and on a GPU node the event loop is what one
service process runs out of first, so every wake-up saved is loop time given back to requests.

`run_on` has the job itself settle the asyncio future, with a single `call_soon_threadsafe`. The
pool still owns its threads. A job whose caller gave up before it started is skipped, as
`run_in_executor` does. `WarmThreadPool` is the runtime's pool (decode, forwards): a job goes to the
thread that went idle last, so requests at concurrency 1 stay on one thread after a burst.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cxr_serving.os_thread_name import name_os_thread

T = TypeVar("T")


class PoolClosedError(RuntimeError):
    """The pool was shut down before the job could start: its owner is stopping."""


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if ok:
        future.set_result(value)
    elif isinstance(value, StopIteration):  # a future refuses it (TypeError), which would leave the caller waiting
        error = RuntimeError(f"the job raised StopIteration: {value!r}")
        error.__cause__ = value
        future.set_exception(error)
    else:
        future.set_exception(value)


def _run_and_settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Callable[..., Any], *args: Any
) -> None:
    """On the job's thread: `fn(*args)`, then its result or exception handed to `future` on the loop."""
    outcome: tuple[bool, Any]
    try:
        outcome = (True, fn(*args))
    except BaseException as exc:  # handed to the caller, as run_in_executor does (`_settle` wraps StopIteration)
        outcome = (False, exc)
    try:
        loop.call_soon_threadsafe(_settle, future, *outcome)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


async def run_on(pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `pool`; its result (or exception) once it is done."""
    return await start_on(pool, fn, *args)


def start_on(pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Submit `fn(*args)` to `pool` now, from the loop's thread, and return the future it settles: the job
    is on its way before the caller's next await (`run_on` is this, awaited). Cancelling the future skips a
    job that has not started."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def job() -> None:
        if future.cancelled():  # read from this thread: at worst the job runs and its result is dropped
            return
        _run_and_settle(loop, future, fn, *args)

    try:
        pool.submit(job)
    except RuntimeError as exc:
        if "new futures after" in str(exc):  # "... after shutdown", "... after interpreter shutdown"
            raise PoolClosedError(str(exc)) from exc
        raise  # the pool is open but could not take the job ("can't start new thread")
    return future


def start_on_new_thread(fn: Callable[..., T], *args: Any, name: str) -> asyncio.Future[T]:
    """`fn(*args)` on a thread started for it alone, which ends with it; the future it settles. For work that
    runs torch's parallel operators once (a model's load and warm-up): a thread that ran them keeps an OpenMP
    team for life, and a process with more teams than cores makes every team's workers sleep between
    operators, which slows each forward of the threads that serve (docs/serving-runtime.md, "One OpenMP
    team per forward thread")."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # as asyncio.to_thread: the caller's log and trace context go along

    def named() -> T:
        name_os_thread(name)  # inside the settled call: whatever it raises still reaches the caller
        return context.run(fn, *args)

    # not a daemon: interpreter exit waits for a load to finish
    threading.Thread(target=_run_and_settle, args=(loop, future, named), name=name).start()
    return future


class _Job:
    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the future, as ThreadPoolExecutor does
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class WarmThreadPool(concurrent.futures.Executor):
    """Up to `max_workers` threads; a job goes to the thread that went idle last.

    A ThreadPoolExecutor's idle threads take turns on its queue, so once a burst has started all of them,
    requests at concurrency 1 hop from thread to thread. Here a lone job always lands on the thread that
    ran the one before (its stack, caches and allocator state still warm), and threads start only as
    concurrency needs them. Threads are daemons: `shutdown` ends them; the process's owner calls it."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "pool") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Job | None]] = []  # a stack: the last idle thread's inbox on top
        self._backlog: collections.deque[_Job] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        job = _Job(future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                self._idle.pop().put(job)
            elif len(self._threads) < self._max:
                inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
                inbox.put(job)
                t = threading.Thread(
                    target=self._work, args=(inbox,), name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                t.start()  # before it counts: a thread that cannot start must not take a place in the pool
                self._threads.append(t)
            else:
                self._backlog.append(job)
        return future

    def _work(self, inbox: queue.SimpleQueue[_Job | None]) -> None:
        name_os_thread(threading.current_thread().name)
        while True:
            job = inbox.get()
            while job is not None:
                job.run()
                del job
                with self._lock:
                    if self._backlog:
                        job = self._backlog.popleft()
                        continue
                    if self._shutdown:
                        return
                    self._idle.append(inbox)
                    job = None
            if self._shutdown:
                return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft().future.cancel()
            for inbox in self._idle:
                inbox.put(None)
            self._idle.clear()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
