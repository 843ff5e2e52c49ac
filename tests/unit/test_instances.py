"""Model instances in worker processes (cxr_serving.instances): the wire, start-up, concurrency,
errors, crashes and restarts, shutdown, and the repository in `model_instance_mode: process`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_serving.errors import CheckpointError, ConfigError, InvalidInputError, ModelNotReadyError
from cxr_serving.instances import InstanceDiedError, LoadedModel, ProcessInstances, recv, send
from cxr_serving.lifecycle import BatchingConfig, ModelRepository, ModelState
from cxr_serving.metrics import MODEL_INSTANCE_RESTARTS
from tests.support.instance_models import BAD, CRASH, WHEN, PidModel
from tests.support.paths import REPO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def instances():
    made: list[ProcessInstances] = []

    def make(count: int = 2, **model_kwargs) -> ProcessInstances:
        p = ProcessInstances("pid", functools.partial(PidModel, **model_kwargs), count, load_timeout_s=60)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_the_wire_carries_arrays_tensors_and_errors_unchanged():
    import multiprocessing

    a, b = multiprocessing.Pipe()
    image = torch.rand(3, 32, 32)
    strided = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # not contiguous
    mask = np.random.default_rng(0).random((2, 16, 16)) > 0.5
    message = {
        "image": image,
        "strided": strided,
        "mask": mask,
        "bools": torch.tensor([True, False]),
        "png": b"\x89PNG",
        "labels": ("a", "b"),
        "error": CheckpointError("bad file", reason="CHECKPOINT_CORRUPT", metadata={"k": "v"}),
        "empty": np.zeros((0, 3), np.float32),
    }
    send(a, message)
    got = recv(b)
    assert torch.equal(got["image"], image) and got["image"].dtype == torch.float32
    assert torch.equal(got["strided"], strided)
    assert np.array_equal(got["mask"], mask) and got["mask"].dtype == bool
    assert torch.equal(got["bools"], torch.tensor([True, False]))
    assert got["png"] == b"\x89PNG" and got["labels"] == ("a", "b") and got["empty"].shape == (0, 3)
    err = got["error"]
    assert isinstance(err, CheckpointError) and err.reason == "CHECKPOINT_CORRUPT" and err.metadata == {"k": "v"}
    got["image"].add_(1)  # received buffers are writable (torch would warn on a read-only one)
    got["mask"][0, 0, 0] = not got["mask"][0, 0, 0]


def test_every_instance_is_its_own_process_and_batches_run_side_by_side(instances):
    p = instances(2, delay_s=2.0)
    info = p.start(None)
    assert info == LoadedModel("untrained", True, "cpu", "pid-reporter", ("doubled",))
    assert len(set(p.pids)) == 2 and os.getpid() not in p.pids
    batch = [np.arange(4, dtype=np.float32), 5, WHEN]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(p.predict, [batch, batch]))
    # each process reports when its 2 s forward ran (one clock for the host): they overlap, whatever the host's
    # overhead around them (a slow CI host took 1.47 s end to end for two 0.5 s batches): in turn they would not
    (s1, e1), (s2, e2) = (r[2][1] for r in results)
    overlap = min(e1, e2) - max(s1, s2)
    assert overlap >= 0.25, f"the two 2 s batches overlapped by {overlap:.2f} s: they did not run at once"
    assert {r[0][0] for r in results} == set(p.pids)  # one batch on each instance
    for r in results:
        np.testing.assert_array_equal(r[0][1], np.arange(4) * 2)
        assert r[1][1] == 10


def test_a_checkpoint_path_reaches_every_instance(instances, tmp_path):
    p = instances(2)
    assert p.start(tmp_path / "weights-v7.pt").version == "weights-v7.pt"


def test_a_load_error_comes_back_as_itself_and_leaves_no_process(instances):
    p = instances(2, fail_load=True)
    with pytest.raises(CheckpointError, match="corrupt") as err:
        p.start(Path("/models/x.pt"))
    assert err.value.reason == "CHECKPOINT_CORRUPT"
    assert p.live == 0


def test_a_model_that_cannot_be_built_fails_the_start_with_its_reason(instances):
    p = instances(1, fail_build=True)
    with pytest.raises(RuntimeError, match="cannot build the network"):  # as thread mode would see it
        p.start(None)


def test_a_per_item_error_fails_only_that_item(instances):
    p = instances(1)
    p.start(None)
    out = p.predict([1, BAD, 2])
    assert out[0][1] == 2 and out[2][1] == 4
    assert isinstance(out[1], InvalidInputError)


def test_a_crashed_instance_fails_only_its_batch_and_is_restarted(instances):
    p = instances(2)
    p.start(None)
    before = set(p.pids)
    restarts = MODEL_INSTANCE_RESTARTS.labels("pid")._value.get()
    with pytest.raises(InstanceDiedError, match=r"died during predict \(exit code 3\)") as err:
        p.predict([1, CRASH])
    assert isinstance(err.value, ModelNotReadyError)  # UNAVAILABLE: the client may retry
    assert MODEL_INSTANCE_RESTARTS.labels("pid")._value.get() == restarts + 1
    deadline = time.monotonic() + 60
    while p.live < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.live == 2
    assert len(set(p.pids) & before) == 1  # one survivor, one new process
    seen = {p.predict([i])[0][0] for i in range(6)}  # both instances serve again
    assert seen == set(p.pids)


def test_close_stops_every_instance_and_refuses_new_batches(instances):
    p = instances(2)
    p.start(None)
    pids = p.pids
    p.close()
    assert _wait_gone(pids) == []
    with pytest.raises(ModelNotReadyError, match="shutting down"):
        p.predict([1])


def test_instances_exit_when_the_server_process_is_killed(tmp_path):
    """SIGKILL of the server leaves no orphan: each instance sees its socket close and exits."""
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            import functools, sys, time
            sys.path.insert(0, sys.argv[1])
            from cxr_serving.instances import ProcessInstances
            from tests.support.instance_models import PidModel
            p = ProcessInstances("pid", functools.partial(PidModel), 2)
            p.start(None)
            print(*p.pids, flush=True)
            time.sleep(120)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2 and all(_alive(x) for x in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(pids) == [], "instance processes outlived the killed server"
    finally:
        proc.kill()
        proc.wait()


async def test_the_repository_serves_a_model_from_instance_processes():
    repo = ModelRepository(
        BatchingConfig(max_batch_size=4, max_batch_delay_ms=5, model_instances=2, instance_mode="process")
    )
    model = PidModel(delay_s=0.2)
    with pytest.raises(ConfigError, match="no factory"):
        repo.add(model)
    repo.add(model, factory=functools.partial(PidModel, delay_s=0.2))
    try:
        st = await repo.load("pid")
        assert st.state is ModelState.READY and st.version == "untrained" and st.untrained
        assert st.architecture == "pid-reporter" and st.labels == ["doubled"]
        assert model.version == ""  # the server process never loaded a copy
        results = await asyncio.gather(*(repo.predict("pid", i) for i in range(16)))
        assert [r[1] for r in results] == [2 * i for i in range(16)]
        pids = {r[0] for r in results}
        assert len(pids) == 2 and os.getpid() not in pids
        await repo.unload("pid")
        assert _wait_gone(sorted(pids)) == []
        with pytest.raises(ModelNotReadyError):
            await repo.predict("pid", 1)
    finally:
        await repo.close()


async def test_a_refused_checkpoint_keeps_the_instance_processes_serving():
    """Validate, then swap, in process mode: the new version loads in new processes; when it is
    refused the old processes keep answering, and when it loads they are replaced."""
    repo = ModelRepository(
        BatchingConfig(max_batch_size=4, max_batch_delay_ms=1, model_instances=2, instance_mode="process")
    )
    repo.add(PidModel(), factory=PidModel)
    try:
        await repo.load("pid", Path("a.pt"))
        before = {r[0] for r in await asyncio.gather(*(repo.predict("pid", i) for i in range(8)))}
        with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
            await repo.load("pid", Path("corrupt.pt"))
        st = repo.status("pid")
        assert st.state is ModelState.READY and st.version == "a.pt" and repo.ready
        results = await asyncio.gather(*(repo.predict("pid", i) for i in range(8)))
        assert [r[1] for r in results] == [2 * i for i in range(8)]
        assert {r[0] for r in results} <= before  # the same processes answer
        assert (await repo.load("pid", Path("b.pt"))).version == "b.pt"
        after = {r[0] for r in await asyncio.gather(*(repo.predict("pid", i) for i in range(8)))}
        assert after.isdisjoint(before) and _wait_gone(sorted(before)) == []  # swapped, old ones stopped
    finally:
        await repo.close()


_SPAWN_FAILS = textwrap.dedent(
    """
    import functools, os, resource, sys, time
    import psutil
    from cxr_serving.instances import ProcessInstances
    from tests.support.instance_models import PidModel

    p = ProcessInstances("pid", functools.partial(PidModel), 4, load_timeout_s=60)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:  # use up every descriptor, then give back a few: a later spawn runs out (EMFILE)
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for fd in held[: int(sys.argv[1])]:
        os.close(fd)
    spawned = []
    spawn = p._spawn
    p._spawn = lambda i: spawned.append(i) or spawn(i)  # counts the spawns; each is real
    try:
        p.start()
        outcome = "started"
    except OSError as exc:
        outcome = f"errno{exc.errno}"
    time.sleep(0.5)
    alive = [c for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE]
    print(outcome, len(spawned), len(alive))
    """
)


def test_a_spawn_that_fails_stops_the_instances_spawned_before_it():
    """Out of file descriptors at the 2nd-4th spawn (a real EMFILE), start raises and no worker
    process it spawned before is left alive."""
    failed_late = []
    for free in range(3, 9):
        out = subprocess.run(
            [sys.executable, "-c", _SPAWN_FAILS, str(free)], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        outcome, spawned, alive = out.stdout.split()[-3:]
        if outcome == "started":
            assert alive == "4"
            continue
        assert outcome == "errno24", out.stderr[-2000:]
        assert alive == "0", f"{alive} worker(s) left alive after a failed start ({free} free fds)"
        if int(spawned) > 1:
            failed_late.append(free)
    assert failed_late, "no fd budget made a later spawn fail: the test did not exercise the fix"
