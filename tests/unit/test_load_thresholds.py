"""LoadModel's thresholds in the serving runtime: checked by ModelAdmin before anything loads, applied by
the model's `load_with` in thread and process instances (and again when a crashed process restarts),
refused for a model without thresholds, and dropped by the next load without them."""

from __future__ import annotations

import asyncio
import time

import pytest

from cxr_serving.errors import CheckpointError, InvalidInputError
from cxr_serving.lifecycle import BatchingConfig, ModelRepository, ModelState, ThresholdOverride
from cxr_serving.model_admin import ModelAdmin
from tests.support.instance_models import CRASH, PidModel, ThresholdModel


def _repo(mode: str) -> ModelRepository:
    return ModelRepository(
        BatchingConfig(max_batch_size=1, max_batch_delay_ms=1, model_instances=1, instance_mode=mode)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_thresholds_reach_the_model_and_the_next_plain_load_drops_them(mode: str) -> None:
    repo = _repo(mode)
    repo.add(ThresholdModel(), factory=ThresholdModel)
    admin = ModelAdmin(repo, None)
    try:
        await admin.load_model("thr", "")
        assert (await repo.predict("thr", 1))[1] == {}
        await admin.load_model("thr", "", {"doubled": 0.25}, "untrained")
        assert (await repo.predict("thr", 1))[1] == {"doubled": 0.25}
        with pytest.raises(CheckpointError):  # chosen for another version: refused, the loaded ones stay
            await admin.load_model("thr", "", {"doubled": 0.5}, "0123abcd")
        assert repo.status("thr").state is ModelState.READY
        assert (await repo.predict("thr", 1))[1] == {"doubled": 0.25}
        if mode == "process":  # a crashed instance process restarts with the same thresholds
            with pytest.raises(Exception):  # noqa: B017 - the crashed batch's caller gets an error
                await repo.predict("thr", CRASH)
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert (await repo.predict("thr", 1))[1] == {"doubled": 0.25}
                    break
                except AssertionError:
                    raise
                except Exception:
                    assert time.monotonic() < deadline, "the instance did not restart"
                    await asyncio.sleep(0.2)
        await admin.load_model("thr", "")
        assert (await repo.predict("thr", 1))[1] == {}
    finally:
        await repo.close()


async def test_admin_checks_thresholds_before_loading() -> None:
    repo = _repo("thread")
    repo.add(ThresholdModel(), factory=ThresholdModel)
    repo.add(PidModel(), factory=PidModel)
    admin = ModelAdmin(repo, None)
    try:
        await admin.load_model("thr", "")
        cases = [
            ("pid", {"doubled": 0.5}, "untrained", "THRESHOLDS_NOT_SUPPORTED"),
            ("thr", {"tripled": 0.5}, "untrained", "THRESHOLDS_UNKNOWN_LABEL"),
            ("thr", {"doubled": 0.0}, "untrained", "THRESHOLDS_OUT_OF_RANGE"),
            ("thr", {"doubled": float("nan")}, "untrained", "THRESHOLDS_OUT_OF_RANGE"),
            ("thr", {"doubled": 1.5}, "untrained", "THRESHOLDS_OUT_OF_RANGE"),
            ("thr", {"doubled": 0.5}, "", "THRESHOLDS_VERSION_MISSING"),
            ("thr", {}, "untrained", "THRESHOLDS_EMPTY"),
        ]
        for name, values, version, reason in cases:
            with pytest.raises(InvalidInputError) as e:
                await admin.load_model(name, "", values, version)
            assert e.value.reason == reason
        assert repo.status("pid").state is ModelState.UNLOADED  # refused before loading anything
    finally:
        await repo.close()


def test_the_base_model_refuses_thresholds() -> None:
    with pytest.raises(InvalidInputError):
        PidModel().load_with(None, ThresholdOverride({"doubled": 0.5}, "untrained"))
