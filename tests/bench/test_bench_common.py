"""The load drivers and process handling the benchmarks rely on (bench/_common.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from bench._common import (
    HttpStatusError,
    ServerProcess,
    closed_loop,
    gpu_mib_by_pid,
    interleaved,
    open_loop,
    outcome,
    paired_p50,
    process_tree,
    thread_policies,
    tree_cpu_s,
    tree_gpu_mib,
    tree_rss_mb,
)


class Shed(Exception):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED


def test_outcome_names() -> None:
    assert outcome(Shed()) == "RESOURCE_EXHAUSTED"
    assert outcome(HttpStatusError(429)) == "HTTP_429"
    assert outcome(TimeoutError()) == "TIMEOUT"
    assert outcome(ValueError()) == "ValueError"


async def test_closed_loop_is_bounded_by_count_and_time() -> None:
    async def call(i: int) -> None:
        await asyncio.sleep(0.01)

    by_count = await closed_loop(call, 4, max_requests=20, max_seconds=30)
    assert by_count["requests"] == 20 and by_count["codes"] == {"OK": 20}
    started = time.perf_counter()
    by_time = await closed_loop(call, 2, max_requests=10**6, max_seconds=0.3)
    assert time.perf_counter() - started < 2
    assert 0 < by_time["requests"] < 10**6


async def test_open_loop_keeps_its_rate_whatever_the_answers_and_times_shedding() -> None:
    async def call(i: int) -> None:
        if i % 2:
            raise Shed()  # answered at once
        await asyncio.sleep(0.2)  # slower than the arrival interval: an open loop does not wait

    r = await open_loop(call, 50, max_requests=1000, max_seconds=0.4, timeout=5)
    assert r["sent"] == 20
    assert r["achieved_send_per_s"] > 30
    assert r["codes"] == {"OK": 10, "RESOURCE_EXHAUSTED": 10}
    assert r["shed"] == 10 and r["time_to_shed_p50_ms"] < 100 <= r["p50_ms"]


async def test_open_loop_counts_timeouts() -> None:
    async def call(i: int) -> None:
        await asyncio.sleep(10)

    r = await open_loop(call, 20, max_requests=4, max_seconds=1, timeout=0.1)
    assert r["codes"] == {"TIMEOUT": 4} and r["requests"] == 0


async def test_interleaved_measures_every_path() -> None:
    async def fast(i: int) -> None:
        await asyncio.sleep(0)

    async def slow(i: int) -> None:
        await asyncio.sleep(0.02)

    out = await interleaved({"fast": fast, "slow": slow}, rounds=5, max_seconds=10, warmup=1)
    assert out["fast"]["requests"] == out["slow"]["requests"] == 5
    assert out["slow"]["p50_ms"] > out["fast"]["p50_ms"]
    assert len(out["calls_ms"]["fast"]) == len(out["calls_ms"]["slow"]) == 5
    assert 15 < paired_p50(out["calls_ms"]["fast"], out["calls_ms"]["slow"]) < 200


async def test_interleaved_rotates_the_order_every_round() -> None:
    """A path always taken first (or last) would carry the position's own cost or gain."""
    seen: list[str] = []

    def path(name: str):
        async def call(i: int) -> None:
            seen.append(name)

        return call

    await interleaved({n: path(n) for n in "abc"}, rounds=3, max_seconds=10, warmup=0)
    assert seen == list("abcbcacab")


def test_paired_p50_cancels_what_varies_between_rounds() -> None:
    base = [10.0, 200.0, 30.0, 400.0, 50.0]  # images of very different cost
    plus = [b + d for b, d in zip(base, [3.0, 2.5, 3.5, 3.0, 2.0], strict=True)]  # each round adds ~3 ms
    assert paired_p50(base, plus) == 3.0  # the difference of the two p50s would say 3.5 only by luck
    assert paired_p50(base, plus[:4]) is None  # a failed call: the rounds cannot be paired
    assert paired_p50([], []) is None


def test_tree_rss_counts_this_process() -> None:
    assert tree_rss_mb(os.getpid()) > 10


def test_thread_policies_read_each_threads_policy_across_the_process_tree() -> None:
    """A child under SCHED_BATCH whose own child stays SCHED_OTHER, each with a second thread: what the kernel
    reports per thread, which is what the benchmarks record of a service's cpu_scheduling."""
    code = (
        "import os, subprocess, sys, threading, time\n"
        "os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))\n"  # whatever policy pytest runs under
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"  # this thread only, after the first started
        "child = subprocess.Popen([sys.executable, '-c', 'import threading, time; "
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); print(1, flush=True); time.sleep(60)'],"
        " stdout=subprocess.PIPE, preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0)))\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip()
        assert thread_policies(proc.pid) == {"SCHED_BATCH": 1, "SCHED_OTHER": 3}
    finally:
        for pid in process_tree(proc.pid)[1:]:
            os.kill(pid, 9)
        proc.kill()
        proc.wait()


def test_tree_cpu_counts_a_busy_grandchild() -> None:
    """The CPU a server's worker process burns is charged to the server (LitServe's workers,
    instance processes): 0.6 s of spinning in a grandchild shows up under the child's pid."""
    import signal
    import subprocess

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(60)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while len(process_tree(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = tree_cpu_s([child.pid])
        while tree_cpu_s([child.pid]) - before < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_s([child.pid]) - before >= 0.3
        assert tree_cpu_s([child.pid]) < 30  # seconds, not clock ticks
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


async def test_server_process_stop_ends_forked_workers_too() -> None:
    """LitServe forks its workers: stopping the server must not leave them running."""
    code = "import os, sys, time\nif os.fork() == 0:\n    time.sleep(120)\nelse:\n    time.sleep(120)\n"
    proc = ServerProcess([sys.executable, "-c", code], name="forking").start()
    assert proc.proc is not None
    pgid = proc.proc.pid
    await asyncio.sleep(0.5)
    proc.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


async def test_wait_ready_reports_a_crashed_server() -> None:
    proc = ServerProcess([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], name="crash").start()
    try:
        with pytest.raises(RuntimeError, match="boom"):

            async def never() -> bool:
                return False

            await proc.wait_ready(never, timeout=20)
    finally:
        proc.stop()


def test_saturation_needs_answers_to_keep_pace() -> None:
    from bench.openloop import saturation

    def row(offered: float, ok_per_s: float, shed: int = 0) -> dict:
        return {"offered_per_s": offered, "ok_per_s": ok_per_s, "requests": 10, "sent": 10, "shed": shed, "codes": {}}

    rows = [row(1, 1), row(2, 2), row(4, 3), row(8, 3, shed=5)]  # at 4/s all answered, but late: a queue grows
    assert saturation(rows) == 2
    assert saturation([row(8, 3, shed=5)]) is None


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def test_only_running_pauses_the_other_servers_and_resumes_them():
    from bench._common import only_running

    a = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], name="a").start()
    b = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], name="b").start()
    try:
        with only_running([a, b], [a]):
            time.sleep(0.2)
            assert _state(b.proc.pid) == "T" and _state(a.proc.pid) != "T"
        time.sleep(0.2)
        assert _state(b.proc.pid) != "T"
        b.pause()  # stop() must still end a paused server
    finally:
        a.stop()
        b.stop()
    assert a.proc.poll() is not None and b.proc.poll() is not None


def test_latency_c1_reads_the_server_time_from_the_real_access_log_format():
    import logging

    from bench.latency_c1 import server_ms
    from cxr_serving.logging_setup import JsonFormatter

    fmt = JsonFormatter("segmentation")

    def line(method: str, code: str, ms: float) -> str:
        rec = logging.LogRecord("cxr_serving.auth", logging.DEBUG, __file__, 1, "rpc", None, None)
        rec.fields = {"method": f"/cxr.segmentation.v1.SegmentationService/{method}", "code": code, "ms": ms}
        return fmt.format(rec)

    log = "\n".join(
        [line("SegmentImage", "OK", 12.5), "not json", line("ListModels", "OK", 1.0), line("SegmentImage", "OK", 7.25),
         line("SegmentImage", "INVALID_ARGUMENT", 3.0)]
    )  # fmt: skip
    assert server_ms(log, "SegmentImage") == [12.5, 7.25]


def test_ratios_pair_the_cells_of_each_round_and_the_table_shows_them():
    """service/LitServe round by round (each pair measured within one rotation) next to the totals."""
    from bench.plot import markdown
    from bench.stack import ratios, round_ratios

    def level(c: int, by_round: list[float]) -> dict:
        ips = sum(by_round) / len(by_round)
        return {"concurrency": c, "img_per_s": ips, "img_per_s_by_round": by_round, "p50_ms": 1.0, "p99_ms": 2.0,
                "rss_peak_mb": 1.0}  # fmt: skip

    svc = {"levels": [level(8, [10.0, 12.0, 9.0])]}
    lit = {"levels": [level(8, [9.0, 12.5, 8.0])]}
    assert round_ratios(svc["levels"][0], lit["levels"][0]) == [1.111, 0.96, 1.125]
    ceil = {"img_per_s": 12.0, "batch_size": 8, "forward_b1_p50_ms": 1.0, "prepare_p50_ms": 1.0,
            "finish_p50_ms": 1.0, "pipeline_b1_p50_ms": 3.0}  # fmt: skip
    r = ratios(ceil, {"service": svc, "litserve": lit}, [8])
    assert r["c8"]["service_over_litserve_won_rounds"] == "2/3"
    assert r["c8"]["service_over_litserve_by_round"] == [1.111, 0.96, 1.125]
    table = markdown({"tasks": {"classification": {"ceiling": ceil, "peers": {"service": svc, "litserve": lit},
                                                   "ratios": r}}})  # fmt: skip
    assert "| service_over_litserve | 1.05 |" in table  # 31 / 29.5
    assert "| service_over_litserve: rounds ahead (range) | 2/3 (0.96-1.12) |" in table


def test_gpu_memory_per_process_tree_from_nvidia_smi(tmp_path, monkeypatch) -> None:
    """The stack's GPU column: nvidia-smi's per-process CSV summed over a server's process tree."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fake = tmp_path / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\necho '{os.getpid()}, 1200'\necho '{proc.pid}, 300'\necho '1, 77'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        table = gpu_mib_by_pid()
        assert table[os.getpid()] == 1200 and table[proc.pid] == 300
        assert tree_gpu_mib(os.getpid(), table) == 1500  # this process and its child, not pid 1
        assert tree_gpu_mib(proc.pid, table) == 300
    finally:
        proc.kill()
        proc.wait()
    assert tree_gpu_mib(os.getpid(), {}) is None  # nothing read: no GPU column, not zero
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_mib_by_pid() == {}  # no nvidia-smi on this machine


def test_every_result_names_the_commit_it_ran_from_and_whether_the_tree_was_changed(tmp_path):
    """A result file can be traced to its code: HEAD's sha and a dirty flag (tracked files changed), both from a
    real git repository; None outside one."""
    import subprocess

    from bench._common import write_result
    from bench._revision import source_revision

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                              env={**os.environ, **env})  # fmt: skip

    git("init", "-q")
    (repo / "f.txt").write_text("one")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    sha = git("rev-parse", "HEAD").stdout.strip()
    assert source_revision(repo) == {"commit": sha, "dirty": False}
    (repo / "f.txt").write_text("two")
    assert source_revision(repo) == {"commit": sha, "dirty": True}
    (repo / "untracked.txt").write_text("x")  # untracked files (results being written) do not count
    git("checkout", "-q", "f.txt")
    assert source_revision(repo) == {"commit": sha, "dirty": False}
    (tmp_path / "not-a-repo").mkdir()
    assert source_revision(tmp_path / "not-a-repo") == {"commit": None, "dirty": None}
    written = json.loads(write_result("probe", {"x": 1}, tmp_path / "probe.json").read_text())
    assert len(written["source"]["commit"]) == 40 and isinstance(written["source"]["dirty"], bool)


def test_latency_c1_reports_both_sides_decode_and_preprocessing_when_the_response_times_it():
    from bench.latency_c1 import Rounds, summarise

    timed = Rounds(client=[10.0, 12.0, 11.0], local=[8.0, 9.0, 8.5], service_prepare=[4.0, 5.0, 4.5],
                   local_prepare=[2.0, 3.0, 2.5])  # fmt: skip
    row = summarise(timed, [9.0, 10.0, 9.5])
    assert row["decode_preprocess_p50_ms"] == {"service": 4.5, "in_process": 2.5}
    assert row["added_p50_ms"] == 2.5 and row["inside_over_in_process_p50_ms"] == 1.0
    untimed = Rounds(client=[10.0], local=[8.0], local_prepare=[2.0])  # a response without `timing`
    assert "decode_preprocess_p50_ms" not in summarise(untimed, [9.0])
    assert "inference_p50_ms" not in row and "inference_p50_ms" not in summarise(untimed, [9.0])


def test_latency_c1_reports_each_sides_inference_and_what_serving_adds_besides_it():
    from bench.latency_c1 import Rounds, summarise

    rounds = Rounds(client=[60.0, 61.0, 62.0], local=[55.0, 55.0, 56.0], service_inference=[52.0, 53.0, 54.0],
                    local_inference=[50.0, 50.0, 51.0])  # fmt: skip
    row = summarise(rounds, [58.0, 59.0, 60.0])
    assert row["inference_p50_ms"] == {"service": 53.0, "in_process": 50.0}
    # per round (client - its inference) - (local - its forward): 8-5, 8-5, 8-5: service minus in process
    assert row["added_besides_inference_paired_p50_ms"] == 3.0
    rounds.service_inference.pop()  # a response without `timing` would pair the wrong rounds: not reported
    row = summarise(rounds, [58.0, 59.0, 60.0])
    assert "added_besides_inference_paired_p50_ms" not in row and row["inference_p50_ms"]["service"] == 52.5


def test_busiest_threads_names_the_thread_that_used_the_cpu() -> None:
    """A thread that spins for 0.3 s tops `busiest_threads`, under its kernel name, with about that CPU."""
    from bench._common import add_thread_cpu, busiest_threads, thread_cpu_s
    from cxr_serving.os_thread_name import name_os_thread

    spun, leave = threading.Event(), threading.Event()

    def spin() -> None:
        name_os_thread("bench-spin")
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        spun.set()
        leave.wait(10)  # alive until read: a finished thread leaves /proc

    before = thread_cpu_s([os.getpid()])
    started = time.perf_counter()
    t = threading.Thread(target=spin)
    t.start()
    assert spun.wait(10)
    wall = time.perf_counter() - started
    after = thread_cpu_s([os.getpid()])
    leave.set()
    t.join()
    spent: dict[tuple[int, int], tuple[str, float]] = {}
    add_thread_cpu(spent, before, after)
    top = busiest_threads(spent, answered=10, wall_s=wall)
    assert top[0]["thread"] == "bench-spin", top
    assert 25 <= top[0]["ms_per_answer"] <= 45, top  # 0.3 s over 10 answers, at the 10 ms tick
    assert top[0]["core_share"] == round(top[0]["ms_per_answer"] * 10 / 1000 / wall, 3)
    assert all(t["thread"] != "main" or t["tid"] == threading.main_thread().native_id for t in top)


def test_pyspy_summary_sums_self_and_total_per_thread(tmp_path: Path) -> None:
    """py-spy's raw stacks become per-thread samples, self counts (the leaf) and totals (each frame once)."""
    from bench.gpu.pyspy_executor import summarise

    raw = tmp_path / "x.raw"
    lines = ["thread (1): MainThread;run (a.py:1);f (a.py:2);f (a.py:2) 3", "thread (1): MainThread;run (a.py:1) 1",
             "thread (2): pool;g (b.py:1) 5", "not a sample line"]  # fmt: skip
    raw.write_text("\n".join(lines) + "\n")
    out = summarise(raw)
    assert list(out) == ["thread (2): pool", "thread (1): MainThread"]
    main = out["thread (1): MainThread"]
    assert main["samples"] == 4
    assert main["self"] == [["f (a.py:2)", 3, 0.75], ["run (a.py:1)", 1, 0.25]]
    assert dict((f, n) for f, n, _ in main["total"]) == {"run (a.py:1)": 4, "f (a.py:2)": 3}


_FAKE_EXECUTOR = """
import os, subprocess, sys, time
token, me = sys.argv[3], str(os.getpid())
orphaned = "import os, sys, time\\nwhile os.getppid() == int(sys.argv[1]):\\n    time.sleep(0.2)"
kids = [subprocess.Popen([sys.executable, "-c", orphaned, me, token]) for _ in range(2)]
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
time.sleep(float(sys.argv[2]))  # idle first: a process still loading its model
while time.monotonic() < end:  # then its main thread busy, as an executor's event loop under load
    pass
for k in kids:
    k.kill()
"""


def test_the_pyspy_probe_finds_the_process_with_frontend_children_once_its_main_thread_is_busy(
    capfd, monkeypatch
) -> None:
    """find_executor picks the parent of the processes running the frontend module; wait_busy returns it only
    once its main thread spins, and says what it saw while it waited. The module's name is a token of this
    test's own, so a real service on the host cannot be picked instead."""
    from bench.gpu import pyspy_executor

    token = f"cxr-test-frontend-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setattr(pyspy_executor, "FRONTEND_MODULE", token)
    cmd = [sys.executable, "-c", _FAKE_EXECUTOR, "30", "2.5", token]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            assert pyspy_executor.find_executor() == proc.pid
            started = time.monotonic()
            assert pyspy_executor.wait_busy(0.3, timeout_s=20) == proc.pid
            assert time.monotonic() - started >= 1.5  # not during the idle start
            err = capfd.readouterr().err
            assert f"waiting: executor {proc.pid}: main thread at 0.0" in err and "recording" in err
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the fake and its children: one session
            proc.wait()


def test_environ_of_reads_a_running_process_and_says_none_for_what_it_lacks() -> None:
    from bench._common import environ_of

    env = {**os.environ, "CXR_TEST_ENV_MARK": "a=b"}
    env.pop("GOMP_SPINCOUNT", None)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env) as proc:
        try:
            deadline = time.monotonic() + 10  # a child just started may not show its environ yet (read as None)
            while (seen := environ_of(proc.pid, ["CXR_TEST_ENV_MARK", "GOMP_SPINCOUNT"]))["CXR_TEST_ENV_MARK"] is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert seen == {"CXR_TEST_ENV_MARK": "a=b", "GOMP_SPINCOUNT": None}
        finally:
            proc.kill()
    assert environ_of(proc.pid, ["CXR_TEST_ENV_MARK"]) == {"CXR_TEST_ENV_MARK": None}  # reaped: gone
