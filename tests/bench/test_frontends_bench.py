"""bench/frontends.py: how the client spreads calls over its channels, the per-frontend connection count
from /proc, and a real N=1 vs N=2 run reporting the client's, the executor's and the frontends' CPU."""

import argparse
import asyncio
import os
import socket

import pytest

from bench import frontends, stack
from bench._client_pool import ClientPool, _split


def test_least_request_pick_goes_to_the_channel_with_fewest_calls_in_flight() -> None:
    picker = frontends.ChannelPicker(4)
    picker.in_flight[:] = [3, 1, 2, 1]
    assert picker.pick(0) == 1  # tie between 1 and 3: the first in turn from call 0
    assert picker.pick(2) == 3  # ...from call 2
    picker.in_flight[:] = [0, 5, 5, 5]
    assert [picker.pick(i) for i in range(4)] == [0, 0, 0, 0]  # a slow frontend's channels get nothing new
    uniform = frontends.ChannelPicker(4, "uniform")
    uniform.in_flight[:] = [9, 0, 0, 0]
    assert [uniform.pick(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        frontends.ChannelPicker(2, "random")


def test_connections_are_counted_on_the_process_that_accepted_them() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as a, socket.create_connection(("127.0.0.1", port)) as b:
            accepted = [server.accept()[0], server.accept()[0]]
            counts = frontends.connections_by_process(port, [os.getpid()])
            for s in accepted:
                s.close()
            del a, b
    assert counts == {os.getpid(): 2}  # the two accepted ends, not the two client ends


def test_client_pool_splits_callers_requests_and_connections_evenly() -> None:
    assert _split(8, 3) == [3, 3, 2]
    assert _split(40, 4) == [10, 10, 10, 10]
    assert _split(1, 3) == [1, 1, 1]  # every worker gets at least one caller
    with pytest.raises(ValueError):
        ClientPool(0, {}, 1)


def test_client_pool_counts_failed_calls_from_every_worker_and_reports_their_cpu() -> None:
    """Two real worker processes calling a port where nothing listens: every call fails fast, each is counted by
    its outcome (no worker crashes, none hangs), the budget is split between the workers, and their CPU counts."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = ClientPool(2, {7: port}, 4, images=2)
    try:
        cell = asyncio.run(pool.run(7, 4, max_requests=4000, max_seconds=20.0))
    finally:
        pool.close()
    assert cell.ok == 0 and sum(cell.codes.values()) == 4000, cell.codes
    assert set(cell.codes) == {"UNAVAILABLE"}, cell.codes
    assert sorted(cell.per_worker_ok) == [0, 0] and len(cell.per_worker_s) == 2 and cell.wall_s < 20.0
    assert cell.wall_s >= max(cell.per_worker_s)  # the cell runs until the last worker answers
    assert cell.client_cpu_s >= 0.05  # the workers' own CPU, as each measured it (4,000 calls)
    assert all(not p.is_alive() for p in pool.procs)


def test_client_pool_reports_a_worker_that_cannot_start_or_dies() -> None:
    """A worker whose set-up fails says why and the pool is not left behind; a worker killed between cells makes
    the next cell raise with its exit code instead of waiting for an answer that cannot come."""
    with pytest.raises(RuntimeError, match=r"client process 0 failed to start: .*no NIH PNGs"):
        ClientPool(1, {1: 1}, 1, images=0)  # no image to send: the worker's set-up stops
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = ClientPool(2, {7: port}, 2, images=1)
    try:
        pool.procs[1].kill()
        pool.procs[1].join(timeout=10)
        with pytest.raises(RuntimeError, match=r"client process 1 exited \(code -9\)"):
            asyncio.run(pool.run(7, 2, max_requests=4, max_seconds=5.0))
    finally:
        pool.close()
    assert all(not p.is_alive() for p in pool.procs)


def test_client_processes_must_fit_the_callers_and_connections(tmp_path) -> None:
    args = argparse.Namespace(
        images=1, seconds=1.0, rounds=1, device="cpu", frontend_counts=(1,), frontend_concurrency=2,
        frontend_requests=4, frontend_input_size=64, frontend_pick="least", frontend_client_processes=3,
        frontend_channels=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match="between 1 and the callers"):
        asyncio.run(frontends.measure(args, tmp_path))
    for argv in (["--frontend-client-processes", "0"], ["--frontend-client-processes", "40"]):  # 32 callers
        with pytest.raises(SystemExit) as refused:
            frontends.parse_args(argv)
        assert refused.value.code == 2
    with pytest.raises(SystemExit) as refused:  # bench.stack's scale-out stage: refused before any peer runs
        stack.parse_args(["--frontend-concurrency", "4", "--frontend-client-processes", "5"])
    assert refused.value.code == 2
    bad = ["--frontend-concurrency", "4", "--frontend-client-processes", "5"]
    for no_stage in (["--frontend-requests", "0"], ["--tasks", "segmentation"]):  # no scale-out stage: nothing to split
        assert stack.parse_args(bad + no_stage).frontend_client_processes == 5


@pytest.mark.slow  # two service processes (N=1 and N=2) with the cheap model: ~40-60 s on 2 cores, each
@pytest.mark.parametrize("client_processes", [1, 2])
def test_scaling_reports_client_executor_and_frontend_cpu_per_request(tmp_path, client_processes: int) -> None:
    """With --frontend-client-processes 2 the same cells run from two load-generator processes: every request
    answered, the workers' CPU counted as the client's, their connections together the service's channels."""
    args = argparse.Namespace(
        images=2, seconds=10.0, rounds=1, device="cpu", frontend_counts=(1, 2), frontend_concurrency=8,
        frontend_requests=40, frontend_input_size=64, frontend_pick="least", frontend_client_processes=client_processes,
    )  # fmt: skip
    result = asyncio.run(frontends.measure(args, tmp_path))
    assert result["client_processes"] == client_processes
    for row in result["by_frontends"].values():  # the workers' CPU is part of the client's, and only with workers
        for c, workers in zip(row["c_ms"], row["c_workers_ms"], strict=True):
            assert (workers > 0) == (client_processes > 1) and c >= workers
        for cell, rate in zip(row["client_workers"], row["req_per_s"], strict=True):  # [answers, seconds] each
            assert len(cell) == (client_processes if client_processes > 1 else 0)
            assert sum(ok for ok, _ in cell) == (40 if client_processes > 1 else 0)
            if cell:  # the cell's rate: its answers over the time to the last worker's reply, never more
                assert rate <= sum(ok for ok, _ in cell) / max(s for _, s in cell) * 1.01
    one, two = result["by_frontends"]["1"], result["by_frontends"]["2"]
    assert one["codes"] == two["codes"] == {"OK": 40}
    for row in (one, two):
        for c, e, f, server in zip(row["c_ms"], row["e_ms"], row["f_ms"], row["server_cpu_ms"], strict=True):
            assert c > 0 and f > 0
            assert e + f == pytest.approx(server, abs=2e-3)
    assert one["e_ms"] == [0.0]  # one process: no executor of its own
    assert two["e_ms"][0] > 0  # the model runs in the executor
    assert one["connections_per_frontend"] == [[result["channels"]]]
    assert (
        sum(two["connections_per_frontend"][0]) == result["channels"] and len(two["connections_per_frontend"][0]) == 2
    )
    assert result["channel_pick"] == "least"
    for n in ("1", "2"):  # every thread of every process of each service, as server_config.cpu_scheduling sets them
        assert set(result["server_thread_policies"][n]) == {"SCHED_BATCH"}, result["server_thread_policies"]
    cores_n1 = sum(one["cores_used"]) / len(one["cores_used"])
    assert result["cores_bound_over_n1"] == pytest.approx(len(os.sched_getaffinity(0)) / cores_n1, abs=2e-3)
    assert result["load_average_1m"]["max"] >= result["load_average_1m"]["min"] >= 0
