"""Bounded load generators (count and time) that record every outcome and latency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc


@dataclass
class Outcomes:
    codes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    skipped: int = 0  # open loop without catch-up: sends dropped because the generator itself fell behind

    def record(self, code: grpc.StatusCode, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.codes[code.name] += 1
            self.latencies.setdefault(code.name, []).append(seconds)
            if code is not grpc.StatusCode.OK and len(self.errors) < 20:
                self.errors.append(f"{code.name}: {detail[:200]}")

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    def failed(self, allowed: tuple[str, ...] = ("OK",)) -> int:
        return sum(n for c, n in self.codes.items() if c not in allowed)

    def percentile_ms(self, code: str, q: float) -> float:
        values = sorted(self.latencies.get(code, []))
        if not values:
            return float("nan")
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)


def closed_loop(call: Callable[[], object], workers: int, seconds: float, max_calls: int) -> Outcomes:
    """`workers` threads calling back to back until `seconds` or `max_calls`."""
    out = Outcomes()
    deadline = time.monotonic() + seconds
    budget = iter(range(max_calls))
    budget_lock = threading.Lock()

    def worker() -> None:
        while time.monotonic() < deadline:
            with budget_lock:
                if next(budget, None) is None:
                    return
            started = time.perf_counter()
            try:
                call()
                out.record(grpc.StatusCode.OK, time.perf_counter() - started)
            except grpc.RpcError as err:
                out.record(err.code(), time.perf_counter() - started, err.details() or "")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return out


async def open_loop(
    call: Callable[[], object], rate_per_s: float, seconds: float, timeout: float = 30, catch_up: bool = True
) -> Outcomes:
    """Fire `rate_per_s` async calls per second for `seconds`, whatever the answers (open loop). With `catch_up`
    False, a send more than one interval overdue (this process stalled, e.g. in its own garbage collection) is
    dropped and counted in `skipped` instead of joining a burst the requested rate never asked for."""
    out = Outcomes()
    n = int(rate_per_s * seconds)
    start = time.perf_counter()

    async def one() -> None:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(call(), timeout)  # type: ignore[arg-type]
            out.record(grpc.StatusCode.OK, time.perf_counter() - started)
        except grpc.aio.AioRpcError as err:
            out.record(err.code(), time.perf_counter() - started, err.details() or "")
        except TimeoutError:
            out.record(grpc.StatusCode.DEADLINE_EXCEEDED, time.perf_counter() - started, "client timeout")

    tasks = []
    for i in range(n):
        delay = start + i / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif not catch_up and -delay > 1 / rate_per_s:
            out.skipped += 1
            continue
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    return out
