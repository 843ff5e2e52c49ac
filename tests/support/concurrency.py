"""Counts how many calls of something run at the same time (threads), for batcher/instance tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PeakGauge:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self._lock:
                self.now -= 1
