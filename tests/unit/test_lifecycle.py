"""ModelRepository: admission (announcing a request for several models is all-or-nothing), and
unload/reload (drain running forwards before freeing weights; validate a new version, then swap)."""

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cxr_serving.errors import CheckpointError, ModelNotReadyError, OverloadedError
from cxr_serving.lifecycle import BatchingConfig, ModelRepository, ModelState, ServedModel
from tests.support.toy_service import BrightnessModel


class Named(BrightnessModel):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


async def test_a_model_that_sheds_withdraws_the_announcements_made_before_it():
    repo = ModelRepository(BatchingConfig(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=1))
    for name in ("a", "b"):
        repo.add(Named(name))
    await repo.load_all()
    try:
        with repo.expect(["b"]):  # b is full: one request on its way
            with pytest.raises(OverloadedError, match="'b'"):
                with repo.expect(["a", "b"]):
                    pass
            assert repo.batcher("a")._upcoming == 0  # a's announcement was withdrawn
            assert repo.batcher("b")._upcoming == 1
        assert repo.batcher("b")._upcoming == 0
        with repo.expect(["a", "b"]) as arrivals:  # room again for both
            assert sorted(arrivals) == ["a", "b"]
    finally:
        await repo.close()


class Gated(ServedModel):
    """A model whose forward blocks until `release` is set; it records what unload() saw."""

    name = "gated"

    def __init__(self, released: bool = False) -> None:
        self.release = threading.Event()
        if released:
            self.release.set()
        self.started = threading.Event()
        self.running = 0
        self.forwards_running_at_unload: list[int] = []
        self._version = ""

    def load(self, checkpoint_path: Path | None = None) -> None:
        if checkpoint_path is not None and checkpoint_path.name == "corrupt.pt":
            raise CheckpointError(f"checkpoint {checkpoint_path} is corrupt", reason="CHECKPOINT_UNREADABLE")
        self._version = checkpoint_path.name if checkpoint_path else "untrained"

    def predict(self, batch):
        version = self._version
        self.running += 1
        self.started.set()
        try:
            self.release.wait(10)
            return [(version, x) for x in batch]
        finally:
            self.running -= 1

    def unload(self) -> None:
        self.forwards_running_at_unload.append(self.running)
        self._version = ""

    @property
    def version(self) -> str:
        return self._version


def gated_repo(**batching) -> tuple[ModelRepository, Gated, list[Gated]]:
    """A repository with one Gated model; the factory's fresh instances (released) land in the list."""
    repo = ModelRepository(BatchingConfig(max_batch_size=4, max_batch_delay_ms=0, **batching))
    model, fresh = Gated(), []

    def factory() -> Gated:
        fresh.append(Gated(released=True))
        return fresh[-1]

    repo.add(model, factory=factory)
    return repo, model, fresh


async def test_unload_waits_for_the_running_forward_before_it_frees_the_weights():
    repo, model, _ = gated_repo()
    await repo.load("gated")
    try:
        call = asyncio.ensure_future(repo.predict("gated", 1))
        await asyncio.to_thread(model.started.wait, 2)
        unloading = asyncio.ensure_future(repo.unload("gated"))
        await asyncio.sleep(0.3)
        assert model.forwards_running_at_unload == [], "unload() freed the weights under a running forward"
        assert not unloading.done()
        with pytest.raises(ModelNotReadyError):  # new work is refused at once meanwhile
            await repo.predict("gated", 2)
        model.release.set()
        st = await asyncio.wait_for(unloading, 5)
        assert st.state is ModelState.UNLOADED
        assert model.forwards_running_at_unload == [0]  # unloaded once, after the forward ended
        assert await call == ("untrained", 1)  # the forward that had started answered
    finally:
        model.release.set()
        await repo.close()


async def test_unload_waits_no_longer_than_the_drain_grace():
    repo, model, _ = gated_repo(drain_grace_s=0.2)
    await repo.load("gated")
    try:
        call = asyncio.ensure_future(repo.predict("gated", 1))
        await asyncio.to_thread(model.started.wait, 2)
        t0 = time.perf_counter()
        await repo.unload("gated")
        assert time.perf_counter() - t0 < 1.5
        with pytest.raises(ModelNotReadyError):  # its caller is answered, not stranded
            await asyncio.wait_for(call, 1)
    finally:
        model.release.set()
        await repo.close()


async def test_a_refused_checkpoint_leaves_the_served_version_serving():
    repo, model, fresh = gated_repo()
    model.release.set()
    await repo.load("gated", Path("a.pt"))
    try:
        with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
            await repo.load("gated", Path("corrupt.pt"))
        st = repo.status("gated")
        assert st.state is ModelState.READY and st.version == "a.pt" and st.error == ""
        assert repo.ready
        assert await repo.predict("gated", 1) == ("a.pt", 1)  # answering as before
        assert model.forwards_running_at_unload == []  # the served instance was never touched
        assert len(fresh) == 1 and fresh[0].version == ""  # the refused version loaded into a fresh one
    finally:
        await repo.close()


async def test_a_reload_swaps_in_the_new_version_and_drains_the_old_one():
    repo, model, fresh = gated_repo()
    await repo.load("gated", Path("a.pt"))
    try:
        old_call = asyncio.ensure_future(repo.predict("gated", 1))
        await asyncio.to_thread(model.started.wait, 2)
        reload = asyncio.ensure_future(repo.load("gated", Path("b.pt")))
        deadline = time.monotonic() + 5
        while repo.status("gated").version != "b.pt" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await repo.predict("gated", 2) == ("b.pt", 2)  # new requests reach the new version at once
        assert not reload.done() and model.forwards_running_at_unload == []  # the old one still drains
        model.release.set()
        assert (await asyncio.wait_for(reload, 5)).version == "b.pt"
        assert await old_call == ("a.pt", 1)
        assert model.forwards_running_at_unload == [0] and fresh[0].forwards_running_at_unload == []
    finally:
        model.release.set()
        await repo.close()


_LOAD_THREAD_PROBE = """
import asyncio, os, threading, time
import torch
from cxr_serving.lifecycle import BatchingConfig, ModelRepository
from tests.support.toy_service import BrightnessModel

torch.set_num_threads(2)
if "libgomp" not in open("/proc/self/maps").read():  # another OpenMP may keep its workers in a shared pool
    print("skip: torch did not load libgomp")
    raise SystemExit(0)


class TorchLoad(BrightnessModel):
    def load(self, checkpoint_path=None):
        self.load_tid = threading.get_native_id()
        (torch.ones(4_000_000) * 2).sum()  # a parallel region: this thread now has an OpenMP team
        super().load(checkpoint_path)


def comms():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            pass
    return out


async def main():
    repo = ModelRepository(BatchingConfig(max_batch_size=1, max_batch_delay_ms=0))
    model = TorchLoad()
    repo.add(model)
    await repo.load_all()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (model.load_tid in comms() or "model-load" in comms().values()):
        await asyncio.sleep(0.05)
    seen = comms()
    print("load thread alive:", model.load_tid in seen, "| threads named model-load:",
          sum(v == "model-load" for v in seen.values()))
    await repo.close()


asyncio.run(main())
"""


def test_a_load_runs_on_a_thread_that_ends_with_its_torch_workers():
    """A model's load runs torch's parallel operators on its own thread, which ends afterwards together with the
    OpenMP workers it started: no thread keeps a team besides those that serve forwards (more teams than cores
    slow every forward). In a child process: the thread count and torch's thread setting are the process's."""
    import subprocess
    import sys

    from tests.support.paths import REPO

    out = subprocess.run([sys.executable, "-c", _LOAD_THREAD_PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    if out.stdout.startswith("skip: "):
        pytest.skip(out.stdout.strip().removeprefix("skip: "))
    assert out.stdout.strip() == "load thread alive: False | threads named model-load: 0", out.stdout + out.stderr
