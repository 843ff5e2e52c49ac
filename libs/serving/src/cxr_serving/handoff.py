"""Run a blocking call on a thread pool and await it from the event loop, with one wake-up.

`loop.run_in_executor` chains a concurrent.futures.Future to an asyncio future: when the job ends,
the loop thread runs the chaining callbacks, which take the concurrent future's Condition lock,
copy its state and check it again. Every request crosses to a thread pool two or three times
(decode, forward, for segmentation the mask encoding), and on a GPU node the event loop is what one
service process runs out of first, so every wake-up saved is loop time given back to requests.

`run_on` has the job itself settle the asyncio future, with a single `call_soon_threadsafe`. The
pool still owns its threads (a ThreadPoolExecutor: joined at interpreter exit). A job
whose caller gave up before it started is skipped, as `run_in_executor` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class PoolClosedError(RuntimeError):
    """The pool was shut down before the job could start: its owner is stopping."""


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


async def run_on(pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on `pool`; its result (or exception) once it is done."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def job() -> None:
        if future.cancelled():  # read from this thread: at worst the job runs and its result is dropped
            return
        outcome: tuple[bool, Any]
        try:
            outcome = (True, fn(*args))
        except BaseException as exc:  # handed to the caller, as run_in_executor does
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    try:
        pool.submit(job)
    except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
        raise PoolClosedError(str(exc)) from exc
    return await future
