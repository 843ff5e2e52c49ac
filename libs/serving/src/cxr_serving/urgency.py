"""How urgent one request is: its priority and its deadline, which the batcher uses to order queued
requests and to drop those whose caller stopped waiting before they cost a forward pass."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum


class Priority(StrEnum):
    """A STAT request is served before every routine one (docs/serving-runtime.md)."""

    ROUTINE = "routine"
    STAT = "stat"


@dataclass(frozen=True)
class Urgency:
    """`deadline`: the `time.perf_counter()` value after which the caller no longer waits (None: never)."""

    priority: Priority = Priority.ROUTINE
    deadline: float | None = None

    @classmethod
    def of(cls, priority: Priority, time_remaining: float | None) -> Urgency:
        """From a call's priority and the seconds left before its deadline (gRPC's `time_remaining()`)."""
        deadline = None if time_remaining is None else time.perf_counter() + time_remaining
        return cls(priority, deadline)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


ROUTINE = Urgency()
