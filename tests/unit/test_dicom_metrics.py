"""The DICOM node's metrics on the runtime's registry: the queue gauges come from the SQLite queue itself (another
process's writes and a restart included), and the delivery and intake counters count what they are told."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from cxr_dicom import metrics
from cxr_dicom.work_queue import Priority, WorkQueue


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_queue_gauges_are_read_from_the_queue_file_after_a_restart(tmp_path):
    node = WorkQueue(tmp_path, max_attempts=1)
    metrics.QUEUES.attach(node)
    try:
        before = {
            (p, s): sample("cxr_dicom_queue_depth", priority=p, state=s)
            for p in ("stat", "routine")
            for s in ("queued", "in_progress", "dead")
        }
        other = WorkQueue(tmp_path, max_attempts=1)  # another process's connection to the same file
        for i in range(3):
            other.enqueue(f"1.2.{i}", "1.2", "1.2.9", Priority.ROUTINE)
        other.enqueue("1.3.1", "1.3", "1.3.9", Priority.STAT)
        other.close()
        assert sample("cxr_dicom_queue_depth", priority="routine", state="queued") == before[("routine", "queued")] + 3
        assert sample("cxr_dicom_queue_depth", priority="stat", state="queued") == before[("stat", "queued")] + 1
        time.sleep(0.05)
        assert sample("cxr_dicom_queue_oldest_age_seconds", priority="routine") >= 0.05
        stat = node.claim("w")
        assert stat is not None and stat.priority == Priority.STAT
        assert (
            sample("cxr_dicom_queue_depth", priority="stat", state="in_progress") == before[("stat", "in_progress")] + 1
        )
        assert node.fail(stat, "boom") == "dead"
        assert sample("cxr_dicom_queue_depth", priority="stat", state="dead") == before[("stat", "dead")] + 1
        assert sample("cxr_dicom_queue_depth", priority="stat", state="in_progress") == before[("stat", "in_progress")]
    finally:
        metrics.QUEUES.detach(node)
        node.close()
    # a restart: a new queue object on the same file reports the same numbers
    restarted = WorkQueue(tmp_path)
    metrics.QUEUES.attach(restarted)
    try:
        assert sample("cxr_dicom_queue_depth", priority="routine", state="queued") == before[("routine", "queued")] + 3
        assert sample("cxr_dicom_queue_depth", priority="stat", state="dead") == before[("stat", "dead")] + 1
    finally:
        metrics.QUEUES.detach(restarted)
        restarted.close()
    # detached: this queue no longer counts
    assert sample("cxr_dicom_queue_depth", priority="routine", state="queued") == before[("routine", "queued")]


def test_time_to_result_is_measured_from_the_enqueue_time(tmp_path):
    clock = [1000.0]
    queue = WorkQueue(tmp_path, clock=lambda: clock[0])
    queue.enqueue("1.2.3", "1.2", "1.2.9", Priority.STAT)
    item = queue.claim("w")
    assert item is not None and queue.complete(item)
    count = sample("cxr_dicom_time_to_result_seconds_count", priority="stat")
    metrics.result_delivered(queue, item.sop_uid, item.priority)  # not attached: nothing observed
    assert sample("cxr_dicom_time_to_result_seconds_count", priority="stat") == count
    metrics.QUEUES.attach(queue)
    try:
        total = sample("cxr_dicom_time_to_result_seconds_sum", priority="stat")
        metrics.result_delivered(queue, item.sop_uid, item.priority)
        elapsed = sample("cxr_dicom_time_to_result_seconds_sum", priority="stat") - total
        assert sample("cxr_dicom_time_to_result_seconds_count", priority="stat") == count + 1
        assert elapsed == pytest.approx(time.time() - 1000.0, abs=5)  # wall clock now minus the stored enqueue time
    finally:
        metrics.QUEUES.detach(queue)
        queue.close()


def test_delivery_counts_each_object_as_sent_or_failed():
    labels = [("cstore", "sr"), ("cstore", "seg")]
    sent = [sample("cxr_dicom_results_sent_total", destination=d, object=o) for d, o in labels]
    failed = [sample("cxr_dicom_results_failed_total", destination=d, object=o) for d, o in labels]
    with metrics.delivery("cstore", ["sr", "seg"]):
        pass
    with pytest.raises(ConnectionError), metrics.delivery("cstore", ["sr", "seg"]):
        raise ConnectionError("no association")
    with pytest.raises(ConnectionError), metrics.delivery("cstore", ["sr"]):
        raise ConnectionError("no association")
    assert [sample("cxr_dicom_results_sent_total", destination=d, object=o) for d, o in labels] == [
        sent[0] + 1,
        sent[1] + 1,
    ]
    assert [sample("cxr_dicom_results_failed_total", destination=d, object=o) for d, o in labels] == [
        failed[0] + 2,
        failed[1] + 1,
    ]


def test_refusals_are_labelled_with_the_status_the_sender_got():
    before = sample("cxr_dicom_instances_refused_total", intake="dimse", status="0xA700")
    metrics.refused("dimse", 0xA700)
    metrics.refused("stow", "http_503")
    assert sample("cxr_dicom_instances_refused_total", intake="dimse", status="0xA700") == before + 1
    assert sample("cxr_dicom_instances_refused_total", intake="stow", status="http_503") >= 1
