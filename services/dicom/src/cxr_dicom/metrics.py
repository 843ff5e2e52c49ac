"""Prometheus metrics of the DICOM node, on the runtime's registry, so the service's metrics port
(catalog ``metrics_port``) serves them beside the gRPC metrics; no second HTTP server.

- ``cxr_dicom_queue_depth{priority,state}`` (state: queued, in_progress, dead) and
  ``cxr_dicom_queue_oldest_age_seconds{priority}`` are read from the SQLite queue at every scrape: the queue is
  the truth, so the gauges are right after a restart or a kill -9 and whichever process changed the queue.
- ``cxr_dicom_time_to_result_seconds{priority}``: from the instance's acceptance (its enqueue time in the queue)
  to its results delivered to every configured destination.
- ``cxr_dicom_results_sent_total`` / ``cxr_dicom_results_failed_total`` ``{destination,object}``: every result
  object per destination (stow, cstore, fhir, fhir_folder) and kind (sr, seg, fhir_bundle), per attempt.
- ``cxr_dicom_instances_accepted_total{intake}`` / ``cxr_dicom_instances_refused_total{intake,status}``: what
  the intakes (dimse, stow) answered; ``status`` is the status the sender got (C-STORE status or STOW-RS
  FailureReason as 0xNNNN, ``http_503`` for a full queue over STOW-RS).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cxr_dicom.work_queue import CLAIMED, DEAD, QUEUED, Priority, WorkQueue

TIME_TO_RESULT_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
STATE_LABELS = {QUEUED: "queued", CLAIMED: "in_progress", DEAD: "dead"}
PRIORITIES = tuple(p.name.lower() for p in Priority)
INTAKES = ("dimse", "stow")

TIME_TO_RESULT = Histogram(
    "cxr_dicom_time_to_result_seconds",
    "From an instance's acceptance to its results delivered to every destination",
    ["priority"],
    buckets=TIME_TO_RESULT_BUCKETS,
)
RESULTS_SENT = Counter(
    "cxr_dicom_results_sent_total", "Result objects a destination accepted", ["destination", "object"]
)
RESULTS_FAILED = Counter(
    "cxr_dicom_results_failed_total", "Result objects whose sending to a destination failed", ["destination", "object"]
)
INSTANCES_ACCEPTED = Counter("cxr_dicom_instances_accepted_total", "Instances an intake stored and queued", ["intake"])
INSTANCES_REFUSED = Counter(
    "cxr_dicom_instances_refused_total",
    "Instances an intake refused, by the status the sender got",
    ["intake", "status"],
)
for _p in PRIORITIES:
    TIME_TO_RESULT.labels(_p)
for _i in INTAKES:
    INSTANCES_ACCEPTED.labels(_i)


class QueueReader:
    """A read-only view of one node's queue on its own SQLite connection (WAL: readers never block the writer)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA query_only=ON")

    def states(self) -> list[tuple[int, str, int, float | None]]:
        """(priority, state, count, oldest enqueue time) of every unfinished or dead-lettered group."""
        with self._lock:
            rows = self._db.execute(
                "SELECT priority, state, COUNT(*), MIN(enqueued_at) FROM items WHERE state IN (?, ?, ?)"
                " GROUP BY priority, state",
                (QUEUED, CLAIMED, DEAD),
            ).fetchall()
        return [(int(p), str(s), int(n), oldest) for p, s, n, oldest in rows]

    def enqueued_at(self, sop_uid: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT enqueued_at FROM items WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _QueueCollector(Collector):
    """The queue gauges, summed over the queues attached in this process (one per node; tests run several)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: dict[int, QueueReader] = {}

    def attach(self, queue: WorkQueue) -> None:
        """Report ``queue`` (a node starting) until `detach`."""
        reader = QueueReader(queue.path)
        with self._lock:
            old = self._readers.pop(id(queue), None)
            self._readers[id(queue)] = reader
        if old is not None:
            old.close()

    def detach(self, queue: WorkQueue) -> None:
        with self._lock:
            reader = self._readers.pop(id(queue), None)
        if reader is not None:
            reader.close()

    def reader(self, queue: WorkQueue) -> QueueReader | None:
        with self._lock:
            return self._readers.get(id(queue))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "cxr_dicom_queue_depth",
            "Instances in the DICOM node's queue by priority and state",
            labels=["priority", "state"],
        )
        oldest = GaugeMetricFamily(
            "cxr_dicom_queue_oldest_age_seconds",
            "Age of the oldest queued or in-progress instance (0 when none)",
            labels=["priority"],
        )
        counts = {(p, s): 0 for p in PRIORITIES for s in STATE_LABELS.values()}
        first: dict[str, float] = {}
        with self._lock:
            readers = list(self._readers.values())
        for reader in readers:
            try:
                rows = reader.states()
            except sqlite3.Error:  # a closing node: its rows are gone with it
                continue
            for level, state, n, enqueued in rows:
                name = Priority(level).name.lower()
                counts[(name, STATE_LABELS[state])] += n
                if state != DEAD and enqueued is not None:
                    first[name] = min(first.get(name, enqueued), enqueued)
        for (name, label), n in counts.items():
            depth.add_metric([name, label], n)
        now = time.time()
        for name in PRIORITIES:
            oldest.add_metric([name], max(0.0, now - first[name]) if name in first else 0.0)
        yield depth
        yield oldest


QUEUES = _QueueCollector()
REGISTRY.register(QUEUES)


def result_delivered(queue: WorkQueue, sop_uid: str, priority: Priority) -> None:
    """Observe the time to result of an instance whose results every destination has now."""
    reader = QUEUES.reader(queue)
    if reader is None:  # a worker outside a started node (a test driving it directly)
        return
    try:
        enqueued = reader.enqueued_at(sop_uid)
    except sqlite3.Error:
        return
    if enqueued is not None:
        TIME_TO_RESULT.labels(priority.name.lower()).observe(max(0.0, time.time() - enqueued))


def object_kind(ds: Any) -> str:
    """``sr``/``seg`` (the result's Modality, lower case) for a result dataset."""
    return str(getattr(ds, "Modality", "unknown")).lower()


@contextmanager
def delivery(destination: str, objects: Sequence[str]) -> Iterator[None]:
    """Count ``objects`` (kinds) as sent to ``destination`` when the block returns, as failed when it raises."""
    try:
        yield
    except Exception:
        for kind in objects:
            RESULTS_FAILED.labels(destination, kind).inc()
        raise
    for kind in objects:
        RESULTS_SENT.labels(destination, kind).inc()


def accepted(intake: str) -> None:
    INSTANCES_ACCEPTED.labels(intake).inc()


def refused(intake: str, status: int | str) -> None:
    INSTANCES_REFUSED.labels(intake, status if isinstance(status, str) else f"0x{status:04X}").inc()
