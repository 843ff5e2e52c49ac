"""A closed-loop gRPC load generator spread over several processes, for cells that one client cannot drive.

Why: an asyncio client runs every call's Python on one event-loop thread, so it tops out at the rate that thread
can issue; where the servers answer faster than that, a single client would measure itself. Each worker process
holds its own connections to every target, builds its calls once, and runs its share of a cell (concurrency and
request budget split evenly) when the parent asks. A cell's rate is its answers over the time from the command to
the last worker's reply, as one client's would be (a worker that finishes first leaves the others the server, so
this is a lower bound when they finish unevenly: each worker's own count and time are kept to show it); each
worker reports its own process CPU over the cell (`time.process_time`, nanoseconds: a short cell of a few ms of
CPU reads as 0 in /proc's 10 ms ticks), so the client's cost stays reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import multiprocessing.connection
import time
from dataclasses import dataclass, field
from typing import Any

READY_TIMEOUT_S = 120.0
ANSWER_GRACE_S = 180.0  # past a cell's max_seconds: a call's own timeout (120 s) and the worker's bookkeeping


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares that differ by at most one, none below 1."""
    base, extra = divmod(max(total, parts), parts)
    return [base + (k < extra) for k in range(parts)]


@dataclass
class CellResult:
    ok: int
    codes: dict[str, int]
    wall_s: float  # from the command to the last worker's answer
    client_cpu_s: float  # the workers' CPU over the cell, as each measured its own
    per_worker_ok: list[int] = field(default_factory=list)
    per_worker_s: list[float] = field(default_factory=list)


class ClientPool:
    """`processes` workers, each with `channels_per_target` connections to every port in `targets` (key -> port),
    calling the task's RPC with the first `images` NIH PNGs; `pick` chooses each call's channel (bench.frontends)."""

    def __init__(
        self,
        processes: int,
        targets: dict[int, int],
        channels_per_target: int,
        *,
        task: str = "classification",
        images: int = 16,
        pick: str = "least",
    ) -> None:
        if processes < 1:
            raise ValueError("client processes: at least 1")
        ctx = mp.get_context("spawn")  # a fork would copy this process's gRPC state, which gRPC forbids
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        shares = _split(channels_per_target, processes)
        try:
            for k in range(processes):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker, args=(theirs, targets, shares[k], task, images, pick), daemon=True,
                    name=f"client-{k}",
                )  # fmt: skip
                self.conns.append(ours)
                try:
                    proc.start()
                finally:
                    theirs.close()  # the worker has its own copy once started
                self.procs.append(proc)
            for k in range(processes):
                ready = self._answer(k, READY_TIMEOUT_S)
                if ready != "ready":
                    raise RuntimeError(f"client process {k} failed to start: {ready}")
        except BaseException:
            self.close()
            raise

    def _answer(self, k: int, timeout: float) -> Any:
        """Worker k's next message; a clear error when it died or said nothing for `timeout` seconds."""
        conn, proc = self.conns[k], self.procs[k]
        try:
            if conn.poll(timeout):
                return conn.recv()
        except (EOFError, OSError):
            pass
        else:
            raise RuntimeError(f"client process {k} did not answer within {timeout:.0f} s")
        proc.join(timeout=5)
        if proc.exitcode is None:
            raise RuntimeError(f"client process {k} closed its pipe before answering (still running)")
        raise RuntimeError(f"client process {k} exited (code {proc.exitcode}) before answering")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def run(self, key: int, concurrency: int, *, max_requests: int, max_seconds: float) -> CellResult:
        """One closed-loop cell against `targets[key]`: concurrency and requests split over the workers."""
        n = len(self.conns)
        callers, budget = _split(concurrency, n), _split(max_requests, n)
        started = time.perf_counter()
        for k, (conn, c, r) in enumerate(zip(self.conns, callers, budget, strict=True)):
            try:
                conn.send(("run", key, c, r, max_seconds))
            except OSError:  # its end of the pipe is gone: the process died (the caller closes the pool)
                self.procs[k].join(timeout=5)
                raise RuntimeError(f"client process {k} exited (code {self.procs[k].exitcode})") from None
        wait = max_seconds + ANSWER_GRACE_S
        replies = await asyncio.gather(*(asyncio.to_thread(self._answer, k, wait) for k in range(n)))
        elapsed = time.perf_counter() - started
        codes: dict[str, int] = {}
        for k, reply in enumerate(replies):
            if isinstance(reply, str):
                raise RuntimeError(f"client process {k} failed: {reply}")
            for code, count in reply[1].items():
                codes[code] = codes.get(code, 0) + count
        oks = [reply[0] for reply in replies]
        return CellResult(
            ok=sum(oks),
            codes=codes,
            wall_s=elapsed,
            client_cpu_s=sum(reply[3] for reply in replies),
            per_worker_ok=oks,
            per_worker_s=[reply[2] for reply in replies],
        )

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def _worker(
    conn: multiprocessing.connection.Connection,
    targets: dict[int, int],
    channels: int,
    task: str,
    images: int,
    pick: str,
) -> None:
    try:
        asyncio.run(_serve(conn, targets, channels, task, images, pick))
    except (Exception, SystemExit) as exc:  # the parent reads this instead of waiting forever
        with contextlib.suppress(OSError):
            conn.send(f"{type(exc).__name__}: {exc}")


async def _serve(
    conn: multiprocessing.connection.Connection,
    targets: dict[int, int],
    channels: int,
    task_name: str,
    images: int,
    pick: str,
) -> None:
    import grpc

    from bench._common import Recorder, drive_closed, nih_pngs
    from bench._peers import task_named
    from bench.frontends import picked_call

    task = task_named(task_name)
    pngs = nih_pngs(images)
    calls, opened = {}, []
    for key, port in targets.items():
        chans = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        opened.extend(chans)
        calls[key] = picked_call(chans, task, pngs, pick)
    conn.send("ready")
    try:
        while True:
            message = await asyncio.to_thread(conn.recv)
            if message[0] == "stop":
                return
            _, key, concurrency, max_requests, max_seconds = message
            rec = Recorder()
            cpu_before = time.process_time()  # every thread of this worker (its loop, gRPC's threads)
            wall = await drive_closed(calls[key], concurrency, rec, max_requests=max_requests, max_seconds=max_seconds)
            conn.send((len(rec.ok), rec.codes(), wall, time.process_time() - cpu_before))
    finally:
        for ch in opened:
            await ch.close()
