"""A request's priority field and deadline as the runtime reads them, and the status an expired one gets."""

from __future__ import annotations

import time

import grpc
import pytest

from cxr_protos.common.v1 import common_pb2
from cxr_serving.errors import DeadlineExceededError, InvalidInputError
from cxr_serving.grpc_errors import error_info, status_for_exception
from cxr_serving.proto_convert import priority, urgency
from cxr_serving.urgency import Priority, Urgency


class Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_the_priority_field_maps_unspecified_to_routine_and_refuses_unknown_numbers():
    assert priority(common_pb2.PRIORITY_UNSPECIFIED) is Priority.ROUTINE
    assert priority(common_pb2.PRIORITY_ROUTINE) is Priority.ROUTINE
    assert priority(common_pb2.PRIORITY_STAT) is Priority.STAT
    with pytest.raises(InvalidInputError) as err:
        priority(99)
    assert err.value.reason == "UNKNOWN_PRIORITY"


def test_the_deadline_is_the_calls_time_remaining_and_none_never_expires():
    before = time.perf_counter()
    u = urgency(common_pb2.PRIORITY_STAT, Context(2.0))
    assert u.priority is Priority.STAT and u.deadline is not None
    assert before + 2.0 <= u.deadline <= time.perf_counter() + 2.0
    assert not u.expired(u.deadline - 0.001) and u.expired(u.deadline)
    forever = urgency(common_pb2.PRIORITY_UNSPECIFIED, Context(None))
    assert forever == Urgency() and not forever.expired(float("inf"))


def test_an_expired_request_maps_to_deadline_exceeded_through_the_one_error_map():
    code, status = status_for_exception(DeadlineExceededError("waited too long", metadata={"model": "m"}))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_info(status)
    assert info is not None and info.reason == "DEADLINE_EXCEEDED_IN_QUEUE" and info.metadata["model"] == "m"
