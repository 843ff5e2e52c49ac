"""Hold a served model's forward passes until a test opens the gate, and record what each forward
received, so a test can fill the queue behind a running forward and then count what ran, in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from cxr_serving.lifecycle import ServedModel


class GatedForward:
    """Wraps `model.predict` (install before the model loads: the batcher binds it at load). Until
    `arm()` every forward runs as usual and is not recorded; after it, each forward records the
    `fingerprint` of its items in `batches`, sets `entered`, and waits for `release()`."""

    def __init__(self, model: ServedModel, fingerprint: Callable[[Any], Any], wait_s: float = 60.0) -> None:
        self.batches: list[list[Any]] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        self._armed = False
        inner = model.predict

        def predict(batch: list[Any]) -> Sequence[Any]:
            if self._armed:
                self.batches.append([fingerprint(x) for x in batch])
                self.entered.set()
                if not self._open.wait(wait_s):
                    raise TimeoutError(f"the test never released the gated forward within {wait_s}s")
            return inner(batch)

        model.predict = predict  # type: ignore[method-assign]

    def arm(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._open.set()

    @property
    def items(self) -> list[Any]:
        """Every recorded item, in the order the forwards received them."""
        return [x for batch in self.batches for x in batch]
