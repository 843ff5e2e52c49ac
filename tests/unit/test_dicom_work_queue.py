"""cxr_dicom.work_queue and cxr_dicom.priority: each promise of the durable queue, on a real SQLite file."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from cxr_dicom.priority import PriorityPolicy, PriorityRule
from cxr_dicom.work_queue import (
    CLAIMED,
    DEAD,
    DONE,
    QUEUED,
    Priority,
    QueueFullError,
    QueueLock,
    QueueLockedError,
    WorkQueue,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"


class Clock:
    """A settable wall clock, so lease expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sop(i: int) -> str:
    return f"{STUDY}.{i}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path, clock):
    with WorkQueue(tmp_path, max_pending=50, max_attempts=3, lease_s=10.0, clock=clock) as q:
        yield q


def test_sqlite_file_is_wal_with_full_sync(tmp_path, queue):
    assert queue.path == tmp_path / "work_queue.sqlite3" and queue.path.exists()
    assert queue._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_enqueue_is_idempotent_by_sop_instance_uid(queue):
    first = queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE, "a")
    again = queue.enqueue(sop(1), STUDY, "s", Priority.STAT, "b")
    assert first.created and first.state == QUEUED
    assert not again.created and again.state == QUEUED and again.priority is Priority.ROUTINE
    item = queue.claim("w")
    assert item is not None and item.payload == "a"
    assert queue.claim("w") is None  # the duplicate added nothing
    # re-sent while being worked on, then after it is done: still one item, reported in its state
    assert queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE).state == CLAIMED
    assert queue.complete(item)
    resend = queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    assert not resend.created and resend.state == DONE
    assert queue.claim("w") is None
    assert queue.study_status(STUDY) == {QUEUED: 0, CLAIMED: 0, DONE: 1, DEAD: 0}


def test_stat_behind_twenty_routine_is_claimed_first_and_fifo_within_priority(queue):
    for i in range(20):
        queue.enqueue(sop(i), STUDY, "s", Priority.ROUTINE)
    queue.enqueue(sop(100), STUDY, "s", Priority.STAT)
    queue.enqueue(sop(101), STUDY, "s", Priority.STAT)
    assert queue.depth() == {"stat": 2, "routine": 20}
    order = []
    while (item := queue.claim("w")) is not None:
        order.append(item.sop_uid)
        assert queue.complete(item)
        assert len(order) <= 22
    assert order == [sop(100), sop(101), *(sop(i) for i in range(20))]
    assert queue.depth() == {"stat": 0, "routine": 0}


def test_bounded_size_raises_queue_full_but_duplicates_and_finished_do_not_count(tmp_path, clock):
    with WorkQueue(tmp_path, max_pending=3, clock=clock) as q:
        for i in range(3):
            q.enqueue(sop(i), STUDY, "s", Priority.ROUTINE)
        with pytest.raises(QueueFullError) as info:
            q.enqueue(sop(3), STUDY, "s", Priority.STAT)
        assert info.value.pending == 3 and info.value.max_pending == 3
        assert not q.enqueue(sop(0), STUDY, "s", Priority.ROUTINE).created  # a duplicate is not refused
        item = q.claim("w")
        assert item is not None
        with pytest.raises(QueueFullError):  # claimed items still count: they are not finished
            q.enqueue(sop(3), STUDY, "s", Priority.ROUTINE)
        assert q.complete(item)
        assert q.enqueue(sop(3), STUDY, "s", Priority.ROUTINE).created
        assert q.get(sop(3)) is not None


def test_expired_lease_is_claimable_again_and_stale_completion_is_refused(queue, clock):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    first = queue.claim("dead-worker")
    assert first is not None and first.attempts == 1
    assert queue.claim("other") is None  # the lease is live
    assert queue.in_flight() == 1 and queue.depth() == {"stat": 0, "routine": 0}
    clock.now += 10.0  # lease_s
    assert queue.depth() == {"stat": 0, "routine": 1}
    second = queue.claim("other")
    assert second is not None and second.sop_uid == sop(1) and second.attempts == 2
    assert second.claim_token != first.claim_token
    assert not queue.complete(first)  # the worker that lost its lease cannot complete it
    assert queue.fail(first, "late") is None
    assert queue.complete(second)
    assert not queue.complete(second)  # completes once
    assert queue.study_status(STUDY)[DONE] == 1


def test_failures_count_attempts_then_dead_letter_with_reason(queue):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    for attempt in (1, 2):
        item = queue.claim("w")
        assert item is not None and item.attempts == attempt
        assert queue.fail(item, f"classification unavailable #{attempt}") == QUEUED
    item = queue.claim("w")
    assert item is not None and item.attempts == 3 and item.last_error == "classification unavailable #2"
    assert queue.fail(item, "classification unavailable #3") == DEAD
    assert queue.claim("w") is None
    assert queue.dead_letters(STUDY) == [(sop(1), "classification unavailable #3")]
    assert queue.study_status(STUDY) == {QUEUED: 0, CLAIMED: 0, DONE: 0, DEAD: 1}
    # a re-send does not revive it; an operator's retry does
    assert queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE).state == DEAD
    assert queue.retry_dead(sop(1))
    again = queue.claim("w")
    assert again is not None and again.attempts == 1


def test_worker_dying_on_every_attempt_reaches_the_dead_letter(queue, clock):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    for _ in range(3):
        assert queue.claim("w") is not None
        clock.now += 11.0
    assert queue.claim("w") is None
    [(uid, reason)] = queue.dead_letters()
    assert uid == sop(1) and "lease expired 3 times" in reason


def test_fail_with_retry_after_backs_off_until_then_and_retry_dead_clears_it(queue, clock):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    queue.enqueue(sop(2), STUDY, "s", Priority.ROUTINE)
    first = queue.claim("w")
    assert first is not None and first.sop_uid == sop(1)
    assert queue.fail(first, "PACS down", retry_after_s=30.0) == QUEUED
    second = queue.claim("w")  # the backed-off item is skipped, the next one is served
    assert second is not None and second.sop_uid == sop(2)
    assert queue.claim("w") is None
    assert queue.complete(second)
    clock.now += 29.9
    assert queue.claim("w") is None
    clock.now += 0.2
    again = queue.claim("w")
    assert again is not None and again.sop_uid == sop(1) and again.attempts == 2
    assert [i.sop_uid for i in queue.study_items(STUDY)] == [sop(1), sop(2)]


def test_release_returns_item_without_spending_an_attempt(queue):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    item = queue.claim("w")
    assert item is not None and queue.release(item)
    again = queue.claim("w")
    assert again is not None and again.attempts == 1


def test_per_study_state_counts(queue):
    other = "1.2.3.4"
    for i in range(4):
        queue.enqueue(sop(i), STUDY, "s", Priority.ROUTINE)
    queue.enqueue("1.2.3.4.1", other, "s", Priority.ROUTINE)
    done = queue.claim("w")
    assert done is not None and queue.complete(done)
    assert queue.claim("w") is not None
    assert queue.study_status(STUDY) == {QUEUED: 2, CLAIMED: 1, DONE: 1, DEAD: 0}
    assert queue.study_status(other) == {QUEUED: 1, CLAIMED: 0, DONE: 0, DEAD: 0}
    assert queue.study_status("9.9") == {QUEUED: 0, CLAIMED: 0, DONE: 0, DEAD: 0}


def test_reopened_queue_keeps_every_item(tmp_path, clock):
    with WorkQueue(tmp_path, clock=clock) as q:
        q.enqueue(sop(1), STUDY, "s", Priority.ROUTINE, "p1")
        q.enqueue(sop(2), STUDY, "s", Priority.STAT, "p2")
    with WorkQueue(tmp_path, clock=clock) as q:
        assert [q.claim("w").payload, q.claim("w").payload] == ["p2", "p1"]


def test_reclaim_takes_back_a_dead_owners_lease_at_once_never_this_owners(tmp_path, clock):
    """A lease of 600 s held by an earlier process is taken back without waiting; the attempt stays counted."""
    earlier = WorkQueue(tmp_path, max_attempts=3, lease_s=600.0, clock=clock)
    earlier.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    earlier.enqueue(sop(2), STUDY, "s", Priority.ROUTINE)
    abandoned = earlier.claim("killed-worker")
    assert abandoned is not None and abandoned.attempts == 1
    with WorkQueue(tmp_path, max_attempts=3, lease_s=600.0, clock=clock) as q:
        assert q.owner != earlier.owner
        mine = q.claim("w")  # this owner's live lease
        assert mine is not None and mine.sop_uid == sop(2)
        assert q.reclaim_abandoned() == (1, 0)
        assert q.reclaim_abandoned() == (0, 0)  # this owner's lease is never taken
        assert q.get(sop(2)).state == CLAIMED
        again = q.claim("w")  # no clock advance: the 600 s lease did not have to expire
        assert again is not None and again.sop_uid == sop(1) and again.attempts == 2
        assert "node process stopped during attempt 1" in (again.last_error or "")
        assert not earlier.complete(abandoned)  # the dead owner's claim is no longer the current one
        assert q.complete(again) and q.complete(mine)
    earlier.close()


def test_an_image_that_kills_every_process_is_dead_lettered_by_the_start_after_max_attempts(tmp_path, clock):
    """Each "process" reclaims, claims the poison image and dies; the start after the 3rd such claim dead-letters it
    without analysing it a 4th time."""
    with WorkQueue(tmp_path, max_attempts=3, lease_s=600.0, clock=clock) as q:
        q.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    for attempt in (1, 2, 3):
        q = WorkQueue(tmp_path, max_attempts=3, lease_s=600.0, clock=clock)
        assert q.reclaim_abandoned() == ((0, 0) if attempt == 1 else (1, 0))
        item = q.claim("w")
        assert item is not None and item.attempts == attempt
        q.close()  # dies holding the lease
    with WorkQueue(tmp_path, max_attempts=3, lease_s=600.0, clock=clock) as q:
        assert q.reclaim_abandoned() == (0, 1)
        assert q.claim("w") is None
        [(uid, reason)] = q.dead_letters()
        assert uid == sop(1) and "node process stopped during attempt 3" in reason


def test_a_queue_file_from_before_lease_owners_is_upgraded_and_its_leases_reclaimed(tmp_path, clock):
    import sqlite3

    with WorkQueue(tmp_path, clock=clock) as q:
        q.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
        assert q.claim("w") is not None
    db = sqlite3.connect(tmp_path / "work_queue.sqlite3")
    db.execute("ALTER TABLE items DROP COLUMN lease_process")  # the schema an older node wrote
    db.commit()
    db.close()
    with WorkQueue(tmp_path, clock=clock, lease_s=600.0) as q:
        assert q.reclaim_abandoned() == (1, 0)
        item = q.claim("w")
        assert item is not None and item.attempts == 2


def test_queue_lock_is_exclusive_and_names_its_holder(tmp_path):
    import os

    with QueueLock(tmp_path) as held:
        assert held.held and held.path == tmp_path / "work_queue.lock"
        with pytest.raises(QueueLockedError, match=f"pid {os.getpid()} "):
            QueueLock(tmp_path).acquire()
    second = QueueLock(tmp_path)
    second.acquire()  # released: free again
    second.release()
    assert not second.held


def test_two_connections_never_claim_the_same_item(tmp_path):
    with WorkQueue(tmp_path) as a, WorkQueue(tmp_path) as b:
        for i in range(10):
            a.enqueue(sop(i), STUDY, "s", Priority.ROUTINE)
        claimed = []
        for _ in range(6):
            for q in (a, b):
                item = q.claim("w")
                if item is not None:
                    claimed.append(item.sop_uid)
        assert sorted(claimed) == sorted(sop(i) for i in range(10))


def test_bad_construction_and_items_are_refused(tmp_path):
    with pytest.raises(ValueError):
        WorkQueue(tmp_path, max_pending=0)
    with WorkQueue(tmp_path) as q, pytest.raises(ValueError):
        q.enqueue("", STUDY, "s", Priority.ROUTINE)


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_priority_rule_on_tag_value_and_calling_ae():
    policy = PriorityPolicy.from_config(
        [
            {"keyword": "RequestedProcedurePriority", "values": ["STAT", "high"], "priority": "stat"},
            {"calling_ae_titles": ["ER_CR1"], "priority": "stat"},
        ]
    )
    assert policy.decide(_ds(RequestedProcedurePriority="STAT ")) is Priority.STAT
    assert policy.decide(_ds(RequestedProcedurePriority="HIGH")) is Priority.STAT
    assert policy.decide(_ds(RequestedProcedurePriority="ROUTINE")) is Priority.ROUTINE
    assert policy.decide(_ds(), calling_ae="er_cr1") is Priority.STAT
    assert policy.decide(_ds(), calling_ae="WARD_DX") is Priority.ROUTINE
    assert policy.decide(_ds()) is Priority.ROUTINE
    # a multi-valued attribute matches when any value does
    assert (
        PriorityPolicy((PriorityRule(Priority.STAT, keyword="ImageType", values=("URGENT",)),)).decide(
            _ds(ImageType=["ORIGINAL", "PRIMARY", "URGENT"])
        )
        is Priority.STAT
    )
    # the default can be STAT with a rule that demotes
    demote = PriorityPolicy.from_config([{"calling_ae_titles": ["RESEARCH"], "priority": "routine"}], default="stat")
    assert demote.decide(_ds(), "RESEARCH") is Priority.ROUTINE and demote.decide(_ds(), "ER") is Priority.STAT


@pytest.mark.parametrize(
    "rule",
    [
        {"keyword": "NotADicomKeyword", "values": ["X"]},
        {"keyword": "StudyDescription", "values": []},
        {"keyword": "StudyDescription", "values": ["X"], "calling_ae_titles": ["A"]},
        {"values": ["X"]},
        {"calling_ae_titles": ["A"], "priority": "urgent"},
        {"calling_ae_titles": ["A"], "colour": "red"},
    ],
)
def test_priority_config_errors_are_refused(rule):
    with pytest.raises(ValueError):
        PriorityPolicy.from_config([rule])


def test_purge_forgets_old_finished_items_but_keeps_dead_letters(queue, clock):
    for i in range(3):
        queue.enqueue(sop(i), STUDY, "s", Priority.ROUTINE)
    done = queue.claim("w")
    assert done is not None and queue.complete(done)
    dead = queue.claim("w")
    assert dead is not None
    for _ in range(2):
        assert queue.fail(dead, "boom") == QUEUED
        dead = queue.claim("w")
        assert dead is not None and dead.sop_uid == sop(1)
    assert queue.fail(dead, "boom") == DEAD
    clock.now += 100.0
    assert queue.purge_finished(older_than_s=200.0) == 0  # not old enough
    assert queue.purge_finished(older_than_s=50.0) == 1
    assert queue.get(sop(0)) is None and queue.get(sop(1)).state == DEAD and queue.get(sop(2)).state == QUEUED
    assert queue.enqueue(sop(0), STUDY, "s", Priority.ROUTINE).created  # past retention: analysed again


def test_transient_failures_spend_no_attempt_until_give_up_after_s_then_dead_letter(queue, clock):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    for n in range(1, 10):  # more failures than max_attempts (3)
        item = queue.claim("w")
        assert item is not None and item.attempts == 1 and item.transient_retries == n - 1
        assert queue.requeue_transient(item, "UnavailableError: down", 5.0, give_up_after_s=100.0) == QUEUED
        assert queue.claim("w") is None  # backed off
        clock.now += 5.0
    item = queue.claim("w")
    # a failure of the image itself ends the transient run and spends the attempt
    assert queue.fail(item, "InvalidImageError", 0.0) == QUEUED
    assert queue.get(sop(1)).transient_retries == 0 and queue.get(sop(1)).attempts == 1
    first = queue.claim("w")
    assert queue.requeue_transient(first, "down", 1.0, give_up_after_s=100.0) == QUEUED
    clock.now += 100.0
    last = queue.claim("w")
    assert queue.requeue_transient(last, "still down", 1.0, give_up_after_s=100.0) == DEAD
    dead = queue.get(sop(1))
    assert (
        dead.state == DEAD
        and "transient failures for 100s" in (dead.last_error or "")
        and "still down" in (dead.last_error or "")
    )


def test_retry_dead_marks_the_old_reason_as_the_previous_one(queue):
    queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE)
    for _ in range(3):
        queue.fail(queue.claim("w"), "InvalidImageError: bad pixels")
    assert queue.get(sop(1)).state == DEAD
    assert queue.retry_dead(sop(1))
    again = queue.get(sop(1))
    assert (again.state, again.attempts, again.last_error) == (QUEUED, 0, "previous: InvalidImageError: bad pixels")


def test_a_failing_listener_neither_fails_the_enqueue_nor_stops_the_next_listener(queue, caplog):
    heard: list[str] = []

    def closed_loop() -> None:
        raise RuntimeError("Event loop is closed")

    queue.on_queued(closed_loop)
    queue.on_queued(lambda: heard.append("woken"))
    with caplog.at_level("WARNING", logger="cxr_dicom.work_queue"):
        added = queue.enqueue(sop(1), STUDY, "s", Priority.ROUTINE, "a")
    assert added.created and added.state == QUEUED  # durably queued, and the sender is told so
    assert heard == ["woken"]
    warned = [r for r in caplog.records if r.getMessage() == "a queue listener failed"]
    assert [r.fields for r in warned] == [{"error": "RuntimeError"}]  # type: ignore[attr-defined]
    item = queue.claim("w")
    assert item is not None and item.payload == "a"
