"""Small `ServedModel`s for the instance-process tests: they report which process ran them,
crash on request, or fail to build or load. Importable by a fresh interpreter (the factories
are partials of these classes)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_serving.errors import CheckpointError, InvalidInputError
from cxr_serving.lifecycle import ServedModel

CRASH = "crash"  # an item that kills the instance process mid-batch
BAD = "bad"  # an item that fails alone (a per-item exception)
WHEN = "when"  # an item answered with (pid, (start, end)) of the batch's sleep, on the host-wide monotonic clock


class PidModel(ServedModel):
    """predict: (pid, 2 * item) per item, after `delay_s`; `CRASH` exits the process with code 3."""

    name = "pid"
    architecture = "pid-reporter"
    labels = ("doubled",)

    def __init__(self, delay_s: float = 0.0, fail_load: bool = False, fail_build: bool = False) -> None:
        if fail_build:
            raise RuntimeError("cannot build the network")
        self.delay_s = delay_s
        self.fail_load = fail_load
        self._version = ""

    def load(self, checkpoint_path: Path | None = None) -> None:
        if self.fail_load or (checkpoint_path is not None and checkpoint_path.name.startswith("corrupt")):
            raise CheckpointError(f"checkpoint {checkpoint_path} is corrupt", reason="CHECKPOINT_CORRUPT")
        self._version = checkpoint_path.name if checkpoint_path else "untrained"

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        started = time.monotonic()
        time.sleep(self.delay_s)
        ended = time.monotonic()
        out: list[Any] = []
        for item in batch:
            if isinstance(item, str) and item == WHEN:
                out.append((os.getpid(), (started, ended)))
                continue
            if isinstance(item, str) and item == CRASH:
                os._exit(3)
            if isinstance(item, str) and item == BAD:
                out.append(InvalidInputError("this item is bad"))
                continue
            out.append((os.getpid(), item * 2 if isinstance(item, np.ndarray | int | float) else item))
        return out

    @property
    def version(self) -> str:
        return self._version


class ThresholdModel(PidModel):
    """A PidModel with decision thresholds: predict answers (pid, the thresholds its load set)."""

    name = "thr"
    accepts_thresholds = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thresholds: dict[str, float] = {}

    def load(self, checkpoint_path: Path | None = None) -> None:
        super().load(checkpoint_path)
        self.thresholds = {}

    def load_with(self, checkpoint_path: Path | None, thresholds: Any) -> None:
        super().load(checkpoint_path)
        if thresholds.model_version != self.version:
            raise CheckpointError("thresholds are for another version", reason="THRESHOLDS_VERSION_MISMATCH")
        self.thresholds = dict(thresholds.values)

    def predict(self, batch: list[Any]) -> Sequence[Any]:
        if any(isinstance(item, str) and item == CRASH for item in batch):
            os._exit(3)
        return [(os.getpid(), dict(self.thresholds)) for _ in batch]
