"""Versions side by side in the serving runtime (versions.py, lifecycle.py), with real repositories and
batchers around small models whose version is their checkpoint's file name: the split is exact, the
shadow never delays a response and is bounded, and the admin rules (promote, rollback, unload, policy)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cxr_serving.errors import ModelNotFoundError, VersionStateError
from cxr_serving.lifecycle import BatchingConfig, ModelRepository, ServedModel
from cxr_serving.metrics import SHADOW_DROPPED, SHADOW_FLIPS, SHADOW_REQUESTS
from cxr_serving.urgency import Priority, Urgency
from cxr_serving.versions import VersionPolicy, WeightedCounter

GATE = threading.Event()  # the "slow" version's forwards wait for it
RAN: list[float] = []  # the items the "slow" version ran, in order


class Versioned(ServedModel):
    """predict: item x the checkpoint's number (a.pt -> 1, b.pt -> 2, slow.pt -> 3, after GATE)."""

    name = "v"
    labels = ("x",)

    def __init__(self) -> None:
        self._version = ""

    def load(self, checkpoint_path: Path | None = None) -> None:
        self._version = checkpoint_path.name if checkpoint_path else "untrained"

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        if self._version == "slow.pt":
            assert GATE.wait(30)
            RAN.extend(batch)
        factor = {"a.pt": 1.0, "b.pt": 2.0, "slow.pt": 3.0}.get(self._version, 0.0)
        return [item * factor for item in batch]

    def disagreement(self, serving: Any, candidate: Any) -> Mapping[str, tuple[float, bool]] | None:
        return {"x": (abs(serving - candidate), (serving >= 1) != (candidate >= 1))}

    @property
    def version(self) -> str:
        return self._version


def _repo(max_batch_size: int = 1) -> ModelRepository:
    batching = BatchingConfig(max_batch_size=max_batch_size, max_batch_delay_ms=0)
    repo = ModelRepository(batching, shadow_max_in_flight=2)
    repo.add(Versioned(), factory=Versioned)
    return repo


async def _ask(
    repo: ModelRepository, item: float, pin: str = "", priority: Priority = Priority.ROUTINE
) -> tuple[float, str]:
    with repo.expect(["v"], {"v": pin}, priority=priority) as dispatches:
        out = await repo.predict("v", item, dispatches["v"], Urgency(priority))
        return out, dispatches["v"].version


@pytest.mark.parametrize("percent", [0.0, 1.0, 20.0, 33.33, 50.0, 99.5, 100.0])
def test_the_weighted_counter_takes_exactly_its_share_of_every_prefix(percent: float) -> None:
    counter, taken = WeightedCounter(), 0
    for n in range(1, 2001):
        taken += counter.take(percent)
        assert taken == n * round(percent * 100) // 10000


async def test_canary_pins_promote_rollback_and_unload_rules() -> None:
    repo = _repo()
    try:
        await repo.load("v", Path("a.pt"))
        with pytest.raises(VersionStateError, match="no candidate"):
            repo.promote("v")
        with pytest.raises(VersionStateError, match="no previous version"):
            repo.rollback("v")
        await repo.load("v", Path("b.pt"), side_by_side=True)
        with pytest.raises(VersionStateError) as err:
            await repo.load("v", Path("b.pt"), side_by_side=True)
        assert err.value.reason == "MODEL_VERSION_ALREADY_LOADED"
        assert await _ask(repo, 1.0) == (1.0, "a.pt")  # b stands by
        assert await _ask(repo, 1.0, "b.pt") == (2.0, "b.pt")
        with pytest.raises(ModelNotFoundError, match=r"no version 'c.pt' loaded; loaded versions: \['a.pt', 'b.pt'\]"):
            await _ask(repo, 1.0, "c.pt")

        repo.set_routing("v", candidate="b.pt", canary_percent=25.0, shadow_percent=0.0)
        answers = [(await _ask(repo, 1.0))[1] for _ in range(100)]
        assert answers.count("b.pt") == 25
        assert [(s.version, s.role, s.traffic_percent) for s in repo.version_statuses()] == [
            ("a.pt", "serving", 75.0),
            ("b.pt", "canary", 25.0),
        ]
        with pytest.raises(VersionStateError, match="serves"):
            await repo.unload("v", "a.pt")

        repo.promote("v")  # the candidate
        assert await _ask(repo, 1.0) == (2.0, "b.pt")
        assert {s.version: s.role for s in repo.version_statuses()} == {"b.pt": "serving", "a.pt": "previous"}
        repo.rollback("v")
        assert await _ask(repo, 1.0) == (1.0, "a.pt")
        await repo.unload("v", "b.pt")
        with pytest.raises(VersionStateError, match="no previous version"):
            repo.rollback("v")

        # a pinned policy: a plain load goes beside the serving version; under `latest` it replaces it
        repo.set_routing("v", candidate="", canary_percent=0.0, shadow_percent=0.0, policy=VersionPolicy.PINNED)
        await repo.load("v", Path("b.pt"))
        assert await _ask(repo, 1.0) == (1.0, "a.pt")
        repo.set_routing("v", candidate="", canary_percent=0.0, shadow_percent=0.0, policy=VersionPolicy.LATEST)
        await repo.unload("v", "b.pt")
        await repo.load("v", Path("b.pt"))
        assert await _ask(repo, 1.0) == (2.0, "b.pt")
        assert [s.version for s in repo.version_statuses()] == ["b.pt"]
    finally:
        await repo.close()


async def test_shadow_runs_after_the_response_and_is_dropped_when_the_candidate_is_busy() -> None:
    GATE.clear()
    repo = _repo(max_batch_size=8)  # a queue of 8 would take more: the in-flight bound is what drops
    before = {
        m: m.labels("v", "slow.pt")._value.get()  # type: ignore[attr-defined]
        for m in (SHADOW_REQUESTS, SHADOW_DROPPED)
    }
    try:
        await repo.load("v", Path("a.pt"))
        await repo.load("v", Path("slow.pt"), side_by_side=True)
        repo.set_routing("v", candidate="slow.pt", canary_percent=0.0, shadow_percent=100.0)
        started = time.monotonic()
        answers = [await _ask(repo, 2.0) for _ in range(20)]
        # every response is the serving version's, while the candidate's forwards are all held
        assert answers == [(2.0, "a.pt")] * 20 and time.monotonic() - started < 10
        dropped = SHADOW_DROPPED.labels("v", "slow.pt")._value.get() - before[SHADOW_DROPPED]  # type: ignore[attr-defined]
        assert dropped == 18  # 2 in flight at most (shadow_max_in_flight), the rest dropped and counted
        GATE.set()
        deadline = time.monotonic() + 30
        while SHADOW_REQUESTS.labels("v", "slow.pt")._value.get() - before[SHADOW_REQUESTS] < 2:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # serving 2.0 vs candidate 6.0: |Δ| 4, no flip (both >= 1)
        assert SHADOW_FLIPS.labels("v", "slow.pt", "x")._value.get() == 0  # type: ignore[attr-defined]
    finally:
        GATE.set()
        await repo.close()


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["promote then unload the old version", "a plain load replaces it"])
async def test_a_version_taken_out_of_service_answers_every_request_already_queued_on_it(how: str) -> None:
    """Its forward held, 4 unpinned and 2 pinned requests queued behind it: the unload (or the
    replacing load) runs them all before the version closes; none fails."""
    GATE.clear()
    repo = _repo()
    try:
        await repo.load("v", Path("slow.pt"))
        slow = repo.batcher("v", "slow.pt")
        assert slow is not None
        unpinned = [asyncio.ensure_future(_ask(repo, 1.0)) for _ in range(5)]
        pinned = [asyncio.ensure_future(_ask(repo, 1.0, "slow.pt")) for _ in range(2)]
        await _until(lambda: slow.queue_depth == 6, "1 forward held, 6 requests queued")
        if how.startswith("promote"):
            await repo.load("v", Path("b.pt"), side_by_side=True)
            repo.promote("v", "b.pt")
            admin = asyncio.ensure_future(repo.unload("v", "slow.pt"))
        else:
            admin = asyncio.ensure_future(repo.load("v", Path("b.pt")))
        await _until(lambda: _serving(repo) == "b.pt", "b serves")
        assert await _ask(repo, 1.0) == (2.0, "b.pt")  # new traffic goes to b while slow.pt drains
        assert not admin.done() and slow.queue_depth == 6  # nothing of slow.pt's queue was failed
        GATE.set()
        results = await asyncio.gather(*unpinned, *pinned, return_exceptions=True)
        assert results == [(3.0, "slow.pt")] * 7
        await admin
        assert [s.version for s in repo.version_statuses()] == ["b.pt"]
    finally:
        GATE.set()
        await repo.close()


def _serving(repo: ModelRepository) -> str:
    return next((s.version for s in repo.version_statuses() if s.role == "serving"), "")


@pytest.mark.parametrize("route", ["canary", "pinned"])
async def test_a_stat_request_runs_next_on_the_canary_and_on_a_pinned_version(route: str) -> None:
    """The candidate's forward held with 4 routine requests queued behind it: a STAT request sent last
    (by the canary at 100 %, or pinning the version) is the next one its forward runs."""
    GATE.clear()
    RAN.clear()
    repo = _repo()
    try:
        await repo.load("v", Path("a.pt"))
        await repo.load("v", Path("slow.pt"), side_by_side=True)
        pin = "slow.pt" if route == "pinned" else ""
        if route == "canary":
            repo.set_routing("v", candidate="slow.pt", canary_percent=100.0, shadow_percent=0.0)
        slow = repo.batcher("v", "slow.pt")
        assert slow is not None
        routine = [asyncio.ensure_future(_ask(repo, float(i), pin)) for i in range(1, 6)]
        await _until(lambda: slow.queue_depth == 4, "1 routine forward held, 4 routine requests queued")
        stat = asyncio.ensure_future(_ask(repo, 100.0, pin, Priority.STAT))
        await _until(lambda: slow.queue_depth == 5, "the STAT request queued last")
        GATE.set()
        results = await asyncio.gather(*routine, stat)
        assert RAN == [1.0, 100.0, 2.0, 3.0, 4.0, 5.0]
        assert {version for _, version in results} == {"slow.pt"}
    finally:
        GATE.set()
        await repo.close()


def _series_of(version: str) -> list[str]:
    from prometheus_client import REGISTRY

    return sorted(
        {
            s.name
            for family in REGISTRY.collect()
            if family.name.startswith(("cxr_model_version_", "cxr_shadow_"))
            for s in family.samples
            if s.labels.get("model") == "v" and s.labels.get("version") == version
        }
    )


async def test_unloading_a_version_drops_its_request_and_shadow_series() -> None:
    repo = _repo()
    try:
        await repo.load("v", Path("a.pt"))
        await repo.load("v", Path("b.pt"), side_by_side=True)
        repo.set_routing("v", candidate="b.pt", canary_percent=0.0, shadow_percent=100.0)
        assert await _ask(repo, 1.0, "b.pt") == (2.0, "b.pt")
        assert await _ask(repo, 1.0) == (1.0, "a.pt")  # shadowed on b
        await _until(lambda: "cxr_shadow_requests_total" in _series_of("b.pt"), "b's shadow run compared")
        assert {"cxr_model_version_requests_total", "cxr_shadow_flips_total"} <= set(_series_of("b.pt"))
        await repo.unload("v", "b.pt")
        assert _series_of("b.pt") == []
        assert "cxr_model_version_requests_total" in _series_of("a.pt")  # the serving version's stay
    finally:
        await repo.close()
