"""A durable work queue of accepted DICOM instances in SQLite, so no accepted image is lost or analysed twice.

Properties (each tested in tests/unit/test_dicom_work_queue.py and tests/integration/test_dicom_work_queue_kill.py):

- Durable: WAL journal with ``synchronous=FULL``. A C-STORE success tells the sender it may delete its copy,
  so an enqueue must survive power loss, not only a crash of this process; NORMAL in WAL mode only
  survives the latter (the last commits can roll back on an OS crash).
- Idempotent by SOP Instance UID: enqueueing an instance already known returns the existing item
  (``created=False``) in whatever state it is in. A re-send of a finished instance (``done``) returns
  ``done`` and is not analysed again; a dead-lettered one stays ``dead`` until an operator calls
  `WorkQueue.retry_dead`. Finished rows are kept until `WorkQueue.purge_finished` removes them, so its
  retention is the window in which a re-send is recognised.
- Priority: STAT items are claimed before routine ones; within a priority, first in first out.
- Bounded: at most ``max_pending`` unfinished (queued or claimed) items; beyond that `enqueue` raises
  `QueueFullError`, which the intakes turn into a "try later" status (backpressure to the sender).
- Leases: `claim` hands out an item for ``lease_s`` seconds. A worker that dies (kill -9) never
  completes it; once the lease expires, the item is claimable again. A completion from a worker whose
  lease expired and was taken over is refused (`complete` returns False), so an item completes once.
- Backoff: `fail` with ``retry_after_s`` keeps a re-queued item unclaimable until then, so retries of a
  failing destination back off instead of spinning.
- Transient failures: `requeue_transient` (a service or destination that is down, not the image) gives the
  attempt back and re-queues with backoff; only after ``give_up_after_s`` of such failures in a row does the
  item go to ``dead``, so an outage does not dead-letter the backlog.
- Attempts: every claim counts as an attempt (a poison image that kills its worker still reaches the
  dead letter); `fail` after the ``max_attempts``-th attempt, or an expired lease with no attempts left,
  moves the item to ``dead`` with its reason.
- Restart: each `WorkQueue` has its own ``owner`` token, stored with every lease it hands out. The node runs
  one process per queue file (`QueueLock` refuses a second); holding the lock, it calls
  `WorkQueue.reclaim_abandoned` at start, which takes back at once every lease of an earlier owner (a killed
  process) instead of waiting ``lease_s``. A lease of this owner is never taken. The killed attempt stays
  counted, so a poison image that kills the process every time is dead-lettered by the start that follows
  its ``max_attempts``-th claim.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

QUEUED = "queued"
CLAIMED = "claimed"
DONE = "done"
DEAD = "dead"
STATES: tuple[str, ...] = (QUEUED, CLAIMED, DONE, DEAD)

DB_FILE = "work_queue.sqlite3"
LOCK_FILE = "work_queue.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    claim_token INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_process TEXT,
    lease_until REAL,
    last_error TEXT,
    enqueued_at REAL NOT NULL,
    finished_at REAL,
    not_before REAL,
    transient_since REAL,
    transient_retries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_ready ON items (state, priority, id);
CREATE INDEX IF NOT EXISTS items_study ON items (study_uid);
"""
# Columns added after the first schema, for queue files written by an older node.
_ADDED_COLUMNS = {
    "lease_process": "TEXT",
    "transient_since": "REAL",
    "transient_retries": "INTEGER NOT NULL DEFAULT 0",
}


class Priority(enum.IntEnum):
    """Claim order: lower first."""

    STAT = 0
    ROUTINE = 1


class QueueFullError(RuntimeError):
    """The queue holds ``max_pending`` unfinished items: the sender must retry later."""

    def __init__(self, pending: int, max_pending: int) -> None:
        super().__init__(f"work queue full: {pending} unfinished items (max_pending={max_pending})")
        self.pending = pending
        self.max_pending = max_pending


class QueueLockedError(RuntimeError):
    """Another live process holds the queue's lock: two nodes on one queue file would take each other's leases."""


class QueueLock:
    """An exclusive ``flock`` on ``data_path``/work_queue.lock, held while the node runs.

    The kernel drops it when its holder dies (kill -9 included), so a restarted node gets it at once, while a
    second live node on the same file is refused with the holder's pid and host. ``flock`` is reliable on a
    local filesystem or a ReadWriteOnce volume; NFS may not honour it."""

    def __init__(self, data_path: str | os.PathLike[str]) -> None:
        Path(data_path).mkdir(parents=True, exist_ok=True)
        self.path = Path(data_path) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise QueueLockedError naming its holder."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise QueueLockedError(
                f"the work queue in {self.path.parent} is in use by another node process ({self._holder()}):"
                " one node per queue file, stop that one first"
            ) from None
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        self._fd = fd

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {int(info['pid'])} on {info.get('host', '?')}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> QueueLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Item:
    """One queued instance as a worker sees it; ``claim_token`` identifies this claim for `complete`/`fail`."""

    sop_uid: str
    study_uid: str
    series_uid: str
    priority: Priority
    state: str
    payload: str
    attempts: int
    claim_token: int
    last_error: str | None
    transient_retries: int = 0


@dataclass(frozen=True)
class EnqueueResult:
    """``created`` is False when the SOP Instance UID was already known; ``state`` is its current state."""

    created: bool
    state: str
    priority: Priority


class WorkQueue:
    """The queue in ``data_path``/work_queue.sqlite3; safe to share between threads and processes.

    ``owner`` identifies this instance (host, pid and a random part) in the leases it hands out."""

    def __init__(
        self,
        data_path: str | os.PathLike[str],
        *,
        max_pending: int = 10_000,
        max_attempts: int = 3,
        lease_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_pending < 1 or max_attempts < 1 or lease_s <= 0:
            raise ValueError("max_pending and max_attempts must be >= 1 and lease_s > 0")
        Path(data_path).mkdir(parents=True, exist_ok=True)
        self.path = Path(data_path) / DB_FILE
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # Wall-clock time: leases are compared across processes, which share no monotonic clock.
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], object]] = []
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._write() as db:
            have = {r["name"] for r in db.execute("PRAGMA table_info(items)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def on_queued(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call ``listener`` (from the enqueuing thread) each time an item becomes ready to claim, so idle claim
        loops wake at once instead of at their next poll; returns the call that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _queued(self) -> None:
        """After the commit: a listener that fails (a closed event loop) must not turn a durable enqueue into an
        error for the sender; the claim loops' poll still finds the item."""
        for listener in list(self._listeners):
            try:
                listener()
            except Exception as exc:
                log.warning("a queue listener failed", extra={"fields": {"error": type(exc).__name__}})

    def __enter__(self) -> WorkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading so that two processes cannot claim the same item."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def enqueue(
        self, sop_uid: str, study_uid: str, series_uid: str, priority: Priority, payload: str = ""
    ) -> EnqueueResult:
        """Add an instance once; raise QueueFullError when a new one would exceed ``max_pending``."""
        if not sop_uid or not study_uid:
            raise ValueError("an item needs a SOP Instance UID and a Study Instance UID")
        with self._write() as db:
            row = db.execute("SELECT state, priority FROM items WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is not None:
                return EnqueueResult(created=False, state=row["state"], priority=Priority(row["priority"]))
            pending = db.execute("SELECT COUNT(*) FROM items WHERE state IN (?, ?)", (QUEUED, CLAIMED)).fetchone()[0]
            if pending >= self.max_pending:
                raise QueueFullError(pending, self.max_pending)
            db.execute(
                "INSERT INTO items (sop_uid, study_uid, series_uid, priority, state, payload, enqueued_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, study_uid, series_uid, int(priority), QUEUED, payload, self._clock()),
            )
        self._queued()
        return EnqueueResult(created=True, state=QUEUED, priority=Priority(priority))

    def claim(self, worker: str) -> Item | None:
        """The next item (STAT first, then FIFO) leased to ``worker`` for ``lease_s``, or None when none is ready.

        An item whose lease expired is ready again; one that has no attempts left goes to the dead letter."""
        now = self._clock()
        with self._write() as db:
            while True:
                row = db.execute(
                    "SELECT * FROM items WHERE (state = ? AND (not_before IS NULL OR not_before <= ?))"
                    " OR (state = ? AND lease_until <= ?) ORDER BY priority, id LIMIT 1",
                    (QUEUED, now, CLAIMED, now),
                ).fetchone()
                if row is None:
                    return None
                if row["state"] == CLAIMED and row["attempts"] >= self.max_attempts:
                    db.execute(
                        "UPDATE items SET state = ?, last_error = ?, finished_at = ?, lease_owner = NULL,"
                        " lease_until = NULL WHERE id = ?",
                        (DEAD, f"lease expired {row['attempts']} times (the worker died or hung)", now, row["id"]),
                    )
                    continue
                token = row["claim_token"] + 1
                db.execute(
                    "UPDATE items SET state = ?, attempts = attempts + 1, claim_token = ?, lease_owner = ?,"
                    " lease_process = ?, lease_until = ? WHERE id = ?",
                    (CLAIMED, token, worker, self.owner, now + self.lease_s, row["id"]),
                )
                return Item(
                    sop_uid=row["sop_uid"],
                    study_uid=row["study_uid"],
                    series_uid=row["series_uid"],
                    priority=Priority(row["priority"]),
                    state=CLAIMED,
                    payload=row["payload"],
                    attempts=row["attempts"] + 1,
                    claim_token=token,
                    last_error=row["last_error"],
                    transient_retries=row["transient_retries"],
                )

    def reclaim_abandoned(self) -> tuple[int, int]:
        """Take back at once every lease not handed out by this instance; (requeued, dead-lettered) counts.

        Only safe while this process holds the `QueueLock`: any other lease then belongs to a process that is
        gone. The abandoned claim keeps its attempt, so an item with no attempts left goes to the dead letter."""
        now = self._clock()
        with self._write() as db:
            rows = db.execute(
                "SELECT id, attempts FROM items WHERE state = ? AND (lease_process IS NULL OR lease_process != ?)",
                (CLAIMED, self.owner),
            ).fetchall()
            dead = 0
            for row in rows:
                reason = f"the node process stopped during attempt {row['attempts']} (killed or crashed)"
                if row["attempts"] >= self.max_attempts:
                    dead += 1
                    db.execute(
                        "UPDATE items SET state = ?, last_error = ?, finished_at = ?, lease_owner = NULL,"
                        " lease_process = NULL, lease_until = NULL WHERE id = ?",
                        (DEAD, reason, now, row["id"]),
                    )
                else:
                    db.execute(
                        "UPDATE items SET state = ?, last_error = ?, not_before = NULL, lease_owner = NULL,"
                        " lease_process = NULL, lease_until = NULL WHERE id = ?",
                        (QUEUED, reason, row["id"]),
                    )
        return len(rows) - dead, dead

    def complete(self, item: Item) -> bool:
        """Mark ``item`` done; False (and nothing changes) when this claim is no longer the current one."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE items SET state = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL,"
                " transient_since = NULL WHERE sop_uid = ? AND state = ? AND claim_token = ?",
                (DONE, self._clock(), item.sop_uid, CLAIMED, item.claim_token),
            )
            return cur.rowcount == 1

    def fail(self, item: Item, reason: str, retry_after_s: float = 0.0) -> str | None:
        """Record a failed attempt: back to ``queued`` (claimable again ``retry_after_s`` from now), or ``dead``
        with ``reason`` after ``max_attempts``.

        Returns the new state, or None when this claim is no longer the current one."""
        with self._write() as db:
            row = db.execute(
                "SELECT attempts FROM items WHERE sop_uid = ? AND state = ? AND claim_token = ?",
                (item.sop_uid, CLAIMED, item.claim_token),
            ).fetchone()
            if row is None:
                return None
            state = DEAD if row["attempts"] >= self.max_attempts else QUEUED
            now = self._clock()
            db.execute(
                "UPDATE items SET state = ?, last_error = ?, lease_owner = NULL, lease_until = NULL,"
                " finished_at = ?, not_before = ?, transient_since = NULL, transient_retries = 0 WHERE sop_uid = ?",
                (
                    state,
                    reason[:2000],
                    now if state == DEAD else None,
                    now + retry_after_s if state == QUEUED and retry_after_s > 0 else None,
                    item.sop_uid,
                ),
            )
            return state

    def requeue_transient(self, item: Item, reason: str, retry_after_s: float, give_up_after_s: float) -> str | None:
        """A failed attempt that is not the image's fault (a service or destination down): back to ``queued``
        after ``retry_after_s`` with the attempt given back, or ``dead`` once such failures have lasted
        ``give_up_after_s`` without a break. Returns the new state, or None when this claim is no longer current."""
        with self._write() as db:
            row = db.execute(
                "SELECT transient_since FROM items WHERE sop_uid = ? AND state = ? AND claim_token = ?",
                (item.sop_uid, CLAIMED, item.claim_token),
            ).fetchone()
            if row is None:
                return None
            now = self._clock()
            since = now if row["transient_since"] is None else float(row["transient_since"])
            if now - since >= give_up_after_s:
                db.execute(
                    "UPDATE items SET state = ?, last_error = ?, lease_owner = NULL, lease_until = NULL,"
                    " finished_at = ?, not_before = NULL WHERE sop_uid = ?",
                    (
                        DEAD,
                        f"transient failures for {now - since:.0f}s (max_transient_retry_s): {reason}"[:2000],
                        now,
                        item.sop_uid,
                    ),
                )
                return DEAD
            db.execute(
                "UPDATE items SET state = ?, attempts = attempts - 1, last_error = ?, lease_owner = NULL,"
                " lease_until = NULL, not_before = ?, transient_since = ?, transient_retries = transient_retries + 1"
                " WHERE sop_uid = ?",
                (QUEUED, reason[:2000], now + retry_after_s if retry_after_s > 0 else None, since, item.sop_uid),
            )
            return QUEUED

    def release(self, item: Item) -> bool:
        """Give a claimed item back unprocessed (graceful shutdown) without spending an attempt."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE items SET state = ?, attempts = attempts - 1, lease_owner = NULL, lease_until = NULL"
                " WHERE sop_uid = ? AND state = ? AND claim_token = ?",
                (QUEUED, item.sop_uid, CLAIMED, item.claim_token),
            )
            return cur.rowcount == 1

    def retry_dead(self, sop_uid: str) -> bool:
        """An operator's second chance for a dead-lettered item: queued again with its attempts reset; the old
        reason is kept, marked as the previous one, until the next attempt replaces it."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE items SET state = ?, attempts = 0, finished_at = NULL, not_before = NULL,"
                " transient_since = NULL, transient_retries = 0,"
                " last_error = CASE WHEN last_error IS NULL THEN NULL ELSE 'previous: ' || last_error END"
                " WHERE sop_uid = ? AND state = ?",
                (QUEUED, sop_uid, DEAD),
            )
        if cur.rowcount == 1:
            self._queued()
        return cur.rowcount == 1

    def purge_finished(self, older_than_s: float) -> int:
        """Forget ``done`` items finished more than ``older_than_s`` ago (dead letters stay for an operator).

        The retention is also the idempotency window: an instance re-sent after its row is purged is
        analysed again."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM items WHERE state = ? AND finished_at < ?", (DONE, self._clock() - older_than_s)
            )
            return int(cur.rowcount)

    def get(self, sop_uid: str) -> Item | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return None if row is None else _item(row)

    def study_status(self, study_uid: str) -> dict[str, int]:
        """How many of the study's instances are in each state (every state present, 0 when none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) AS n FROM items WHERE study_uid = ? GROUP BY state", (study_uid,)
            ).fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def study_items(self, study_uid: str) -> list[Item]:
        """Every known instance of the study, in arrival order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM items WHERE study_uid = ? ORDER BY id", (study_uid,)).fetchall()
        return [_item(r) for r in rows]

    def dead_letters(self, study_uid: str | None = None) -> list[tuple[str, str]]:
        """(SOP Instance UID, reason) of the dead-lettered items, oldest first."""
        query = "SELECT sop_uid, last_error FROM items WHERE state = ?"
        args: tuple[str, ...] = (DEAD,)
        if study_uid is not None:
            query += " AND study_uid = ?"
            args += (study_uid,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [(r["sop_uid"], r["last_error"] or "") for r in rows]

    def unfinished_sop_uids(self) -> set[str]:
        """SOP Instance UIDs of the queued, claimed and dead items: those whose received file is still needed."""
        with self._lock:
            rows = self._db.execute("SELECT sop_uid FROM items WHERE state != ?", (DONE,)).fetchall()
        return {r["sop_uid"] for r in rows}

    def depth(self) -> dict[str, int]:
        """Items waiting per priority (queued, or claimed with an expired lease): the queue-depth gauge."""
        with self._lock:
            rows = self._db.execute(
                "SELECT priority, COUNT(*) AS n FROM items WHERE state = ? OR (state = ? AND lease_until <= ?)"
                " GROUP BY priority",
                (QUEUED, CLAIMED, self._clock()),
            ).fetchall()
        counts = {p.name.lower(): 0 for p in Priority}
        counts.update({Priority(r["priority"]).name.lower(): r["n"] for r in rows})
        return counts

    def in_flight(self) -> int:
        """Items claimed under a live lease."""
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM items WHERE state = ? AND lease_until > ?", (CLAIMED, self._clock())
                ).fetchone()[0]
            )


def _item(row: sqlite3.Row) -> Item:
    return Item(
        sop_uid=row["sop_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        priority=Priority(row["priority"]),
        state=row["state"],
        payload=row["payload"],
        attempts=row["attempts"],
        claim_token=row["claim_token"],
        last_error=row["last_error"],
        transient_retries=row["transient_retries"],
    )
