"""Counts how many calls of something run at the same time (threads), for batcher/instance tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PeakGauge:
    """`meet=n`: each call waits (once per gauge, `meet_timeout_s` at most) until n calls run together, so a
    runner that allows n at once reaches n whatever the host's scheduling, and one that allows fewer times out."""

    def __init__(self, meet: int = 1, meet_timeout_s: float = 10.0) -> None:
        self._cond = threading.Condition()
        self.now = 0
        self.peak = 0
        self._meet = meet
        self._meet_timeout_s = meet_timeout_s
        self._gave_up = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._cond:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self._cond.notify_all()
            if not self._gave_up and not self._cond.wait_for(lambda: self.peak >= self._meet, self._meet_timeout_s):
                self._gave_up = True  # the runner never let that many run: later calls need not wait too
        try:
            yield
        finally:
            with self._cond:
                self.now -= 1
