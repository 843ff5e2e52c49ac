"""The DicomService gRPC API: per-study state, the dead letter, and an operator's retry of it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from cxr_dicom.work_queue import CLAIMED, DEAD, DONE, QUEUED, Item, Priority, WorkQueue
from cxr_protos.dicom.v1 import dicom_service_pb2 as pb
from cxr_protos.dicom.v1 import dicom_service_pb2_grpc as pb_grpc

_STATES = {
    QUEUED: pb.INSTANCE_STATE_QUEUED,
    CLAIMED: pb.INSTANCE_STATE_IN_PROGRESS,
    DONE: pb.INSTANCE_STATE_DONE,
    DEAD: pb.INSTANCE_STATE_DEAD,
}
_PRIORITIES = {Priority.STAT: pb.PRIORITY_STAT, Priority.ROUTINE: pb.PRIORITY_ROUTINE}


def _status(item: Item) -> pb.InstanceStatus:
    return pb.InstanceStatus(
        sop_instance_uid=item.sop_uid,
        series_instance_uid=item.series_uid,
        state=_STATES[item.state],
        priority=_PRIORITIES[item.priority],
        attempts=item.attempts,
        last_error=item.last_error or "",
    )


class DicomServicer(pb_grpc.DicomServiceServicer):  # type: ignore[misc]  # generated *_pb2_grpc has no stub: its base is Any
    def __init__(self, queue: Callable[[], WorkQueue | None]) -> None:
        self._queue = queue

    @property
    def queue(self) -> WorkQueue:
        """The node's queue, opened once the node holds its lock (a call before then fails)."""
        queue = self._queue()
        if queue is None:
            raise RuntimeError("the DICOM node has not opened its work queue yet")
        return queue

    async def GetStudyStatus(self, request: pb.GetStudyStatusRequest, context: Any) -> pb.GetStudyStatusResponse:
        uid = request.study_instance_uid.strip()
        if not uid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "study_instance_uid is required")
        items = await asyncio.to_thread(self.queue.study_items, uid)
        if not items:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no instance of this study was accepted")
        counts = {s: sum(1 for i in items if i.state == s) for s in (QUEUED, CLAIMED, DONE, DEAD)}
        return pb.GetStudyStatusResponse(
            study_instance_uid=uid,
            queued=counts[QUEUED],
            in_progress=counts[CLAIMED],
            done=counts[DONE],
            dead=counts[DEAD],
            finished=counts[QUEUED] + counts[CLAIMED] == 0,
            instances=[_status(i) for i in items],
        )

    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Any) -> pb.ListDeadLettersResponse:
        dead = await asyncio.to_thread(self.queue.dead_letters, request.study_instance_uid.strip() or None)
        items = [await asyncio.to_thread(self.queue.get, sop) for sop, _ in dead]
        return pb.ListDeadLettersResponse(instances=[_status(i) for i in items if i is not None])

    async def RetryDeadLetter(self, request: pb.RetryDeadLetterRequest, context: Any) -> pb.RetryDeadLetterResponse:
        uid = request.sop_instance_uid.strip()
        if not uid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sop_instance_uid is required")
        return pb.RetryDeadLetterResponse(requeued=await asyncio.to_thread(self.queue.retry_dead, uid))
