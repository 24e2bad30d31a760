"""The embedded job queue: SQLite with Service Bus peek-lock semantics, safe across processes.

It behaves like a Service Bus queue so the same worker code runs on both: a receive locks a message for
``lock_duration_s`` and raises its delivery count (1 on first delivery); complete deletes it; abandon releases
it; dead-letter moves it aside with a reason and description; an expired lock makes it available again; a
message delivered more than ``max_delivery_count`` times goes to the dead-letter queue with reason
``MaxDeliveryCountExceeded``. Settling with a lock that expired or moved to another receiver raises
``LockLostError``, as Service Bus does.

``release_later`` (a failure of the environment, not of the job) hides the message until ``visible_at`` and
counts the release in its own column, ``released``, giving back the delivery it had taken: the job's budget of
``max_delivery_count`` is spent only on deliveries that were the job's own (or crashes). A message waiting out
its delay is reported as ``scheduled`` by the depth, as Service Bus reports a scheduled message.

Every settlement (complete, dead-letter) leaves a row in ``settled`` (enqueued, first and last delivery, settled
at), written in the transaction that settles and pruned to the last :data:`HISTORY_KEEP_S`: ``status`` reads the
last hour's throughput and waits from it (``base.QueueHistory``).

URL: ``sqlite:///relative/path.db?queue=name`` or ``sqlite:////absolute/path.db?queue=name``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import _sqlite

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    locked_until REAL,
    dead INTEGER NOT NULL DEFAULT 0,
    dl_reason TEXT,
    dl_description TEXT,
    released INTEGER NOT NULL DEFAULT 0,
    visible_at REAL,
    first_locked_at REAL,
    locked_at REAL,
    UNIQUE (queue, message_id)
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, dead, seq);
CREATE TABLE IF NOT EXISTS settled (
    queue TEXT NOT NULL,
    outcome TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    first_locked_at REAL,
    locked_at REAL,
    settled_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS settled_by_time ON settled (queue, settled_at);
"""
_ADDED_COLUMNS = {
    "released": "INTEGER NOT NULL DEFAULT 0",
    "visible_at": "REAL",
    "first_locked_at": "REAL",
    "locked_at": "REAL",
}
"""Columns newer than the first schema, added to a queue file made before them."""
_POLL_S = 0.05
_MAX_POLL_S = 0.5
HISTORY_KEEP_S = 24 * 3600.0
"""How long the record of settled jobs is kept (``status`` reads the last hour of it)."""
COMPLETED, DEAD_LETTERED = "completed", "dead_lettered"
_RECORD_SETTLED = "INSERT INTO settled SELECT queue, ?, enqueued_at, first_locked_at, locked_at, ? FROM messages"


def parse_url(url: str) -> tuple[Path, str]:
    """``sqlite:///path?queue=name`` → (path, queue name)."""
    parts = urllib.parse.urlsplit(url)
    queue = urllib.parse.parse_qs(parts.query).get("queue", [""])[0]
    if parts.scheme != "sqlite" or not parts.path.startswith("/") or len(parts.path) < 2:
        raise errors.ConfigError(
            "queue.url", f"{url!r} is not a SQLite queue URL", "use sqlite:///path?queue=jobs"
        )
    if not queue:
        raise errors.ConfigError("queue.url", f"{url!r} names no queue", "add ?queue=<name> to the URL")
    return Path(parts.path[1:]), queue


class SqliteJobQueue:
    """A named queue inside a SQLite file. Implements ``base.JobQueue``, ``base.QueueDepth`` and
    ``base.QueueHistory``."""

    def __init__(self, path: Path, *, queue: str, lock_duration_s: float, max_delivery_count: int) -> None:
        self._db = _sqlite.Database(path, _SCHEMA)
        _add_missing_columns(self._db)
        self._queue = queue
        self._lock_duration_s = lock_duration_s
        self._max_delivery_count = max_delivery_count

    @classmethod
    def from_url(cls, url: str, *, lock_duration_s: float, max_delivery_count: int) -> SqliteJobQueue:
        path, queue = parse_url(url)
        return cls(path, queue=queue, lock_duration_s=lock_duration_s, max_delivery_count=max_delivery_count)

    @property
    def name(self) -> str:
        return self._queue

    @property
    def lock_duration_s(self) -> float:
        return self._lock_duration_s

    def send(self, messages: Sequence[base.OutgoingMessage]) -> None:
        now = time.time()
        rows = [(self._queue, m.message_id, m.body, now) for m in messages]
        with self._db.write() as conn:
            duplicate = _first_present(conn, self._queue, [m.message_id for m in messages])
            if duplicate is not None:
                raise errors.DuplicateJobError(f"a job with id {duplicate} is already in queue {self._queue}")
            conn.executemany("INSERT INTO messages (queue, message_id, body, enqueued_at) VALUES (?,?,?,?)", rows)

    def receive(self, *, max_wait_s: float) -> base.ReceivedMessage | None:
        deadline = time.monotonic() + max_wait_s
        pause = _POLL_S
        while True:
            message = self._try_lock_next()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_POLL_S)

    def _try_lock_next(self) -> base.ReceivedMessage | None:
        now = time.time()
        with self._db.write() as conn:
            while True:
                row = conn.execute(
                    "SELECT seq, message_id, body, enqueued_at, delivery_count, released FROM messages "
                    "WHERE queue = :queue AND dead = 0 AND (locked_until IS NULL OR locked_until < :now) "
                    "AND (visible_at IS NULL OR visible_at <= :now) ORDER BY seq LIMIT 1",
                    {"queue": self._queue, "now": now},
                ).fetchone()
                if row is None:
                    return None
                seq, message_id, body, enqueued_at, count, released = row
                if count >= self._max_delivery_count:
                    _dead_letter_row(conn, seq, "MaxDeliveryCountExceeded", _exceeded(count), now=now)
                    log.warning("message_dead_lettered", message_id=message_id, reason="MaxDeliveryCountExceeded")
                    continue
                token, until = str(uuid.uuid4()), now + self._lock_duration_s
                conn.execute(
                    "UPDATE messages SET delivery_count = ?, lock_token = ?, locked_until = ?, locked_at = ?, "
                    "first_locked_at = COALESCE(first_locked_at, ?) WHERE seq = ?",
                    (count + 1, token, until, now, now, seq),
                )
                return base.ReceivedMessage(
                    message_id=message_id,
                    body=bytes(body),
                    lock_token=token,
                    delivery_count=count + 1,
                    sequence_number=seq,
                    enqueued_at=enqueued_at,
                    locked_until=until,
                    released=released,
                )

    def renew_lock(self, message: base.ReceivedMessage) -> float:
        until = time.time() + self._lock_duration_s
        self._update_locked(message, "UPDATE messages SET locked_until = ?", (until,))
        return until

    def keep_locked(
        self, message: base.ReceivedMessage, *, on_lost: Callable[[BaseException], None]
    ) -> base.LockKeeper:
        return ThreadedLockKeeper(
            renew=lambda: self.renew_lock(message), interval_s=self._lock_duration_s / 3, on_lost=on_lost
        )

    def complete(self, message: base.ReceivedMessage) -> None:
        self._update_locked(message, "DELETE FROM messages", (), settled=COMPLETED)

    def abandon(self, message: base.ReceivedMessage) -> None:
        self._update_locked(message, "UPDATE messages SET lock_token = NULL, locked_until = NULL", ())

    def release_later(self, message: base.ReceivedMessage, *, delay_s: float) -> None:
        """Unlock, give back this delivery's count, count a release, and hide the message for ``delay_s``."""
        self._update_locked(
            message,
            "UPDATE messages SET lock_token = NULL, locked_until = NULL, visible_at = ?, "
            "delivery_count = MAX(delivery_count - 1, 0), released = released + 1",
            (time.time() + max(delay_s, 0.0),),
        )

    def dead_letter(self, message: base.ReceivedMessage, *, reason: str, description: str) -> None:
        self._update_locked(
            message,
            "UPDATE messages SET dead = 1, lock_token = NULL, locked_until = NULL, dl_reason = ?, "
            "dl_description = ?",
            (reason, description),
            settled=DEAD_LETTERED,
        )

    def _update_locked(
        self, message: base.ReceivedMessage, statement: str, args: tuple[object, ...], *, settled: str = ""
    ) -> None:
        """Run ``statement`` on the message while this receiver holds its lock (``LockLostError`` otherwise);
        with ``settled``, record the settlement in the same transaction."""
        now = time.time()
        held = (message.sequence_number, message.lock_token, now)
        with self._db.write() as conn:
            if settled:
                conn.execute(
                    f"{_RECORD_SETTLED} WHERE seq = ? AND lock_token = ? AND locked_until >= ?",
                    (settled, now, *held),
                )
            cursor = conn.execute(
                f"{statement} WHERE seq = ? AND lock_token = ? AND locked_until >= ?", (*args, *held)
            )
            if cursor.rowcount != 1:
                raise errors.LockLostError(
                    f"lock on message {message.message_id} expired or is held by another receiver"
                )
            if settled:
                _prune_settled(conn, self._queue, now=now)

    def peek_dead_letters(self, *, max_count: int) -> list[base.DeadLetter]:
        return base.page_dead_letters(self._peek_dead_letter_page, max_count=max_count)

    def _peek_dead_letter_page(self, from_sequence_number: int, count: int) -> list[base.DeadLetter]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT message_id, dl_reason, dl_description, delivery_count, body, seq FROM messages "
                "WHERE queue = ? AND dead = 1 AND seq >= ? ORDER BY seq LIMIT ?",
                (self._queue, from_sequence_number, count),
            ).fetchall()
        return [
            base.DeadLetter(mid, reason or "", desc or "", count, bytes(body), sequence_number=seq)
            for mid, reason, desc, count, body, seq in rows
        ]

    def requeue_dead_letters(self, *, max_count: int, concurrency: int = 1) -> list[base.Requeued]:
        """One transaction moves them all, oldest first: each copy goes to the back of the queue (a new row,
        delivery count 0) and its dead letter is deleted. ``concurrency`` has nothing to spread here."""
        del concurrency
        now = time.time()
        moved: list[base.Requeued] = []
        with self._db.write() as conn:
            rows = conn.execute(
                "SELECT seq, message_id, body FROM messages WHERE queue = ? AND dead = 1 ORDER BY seq LIMIT ?",
                (self._queue, max(max_count, 0)),
            ).fetchall()
            for seq, message_id, body in rows:
                new_id = base.requeued_message_id(message_id, seq)
                conn.execute(
                    "INSERT INTO messages (queue, message_id, body, enqueued_at) VALUES (?,?,?,?)",
                    (self._queue, new_id, body, now),
                )
                conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                moved.append(base.Requeued(message_id=message_id, new_message_id=new_id))
        if moved:
            log.info("dead_letters_requeued", queue=self._queue, count=len(moved))
        return moved

    def read_depth(self) -> base.DepthSample:
        now = time.time()
        with self._db.read() as conn:
            active, in_flight, dead, scheduled = conn.execute(
                "SELECT "
                "COALESCE(SUM(dead = 0 AND (locked_until IS NULL OR locked_until < :now) "
                "AND (visible_at IS NULL OR visible_at <= :now)), 0), "
                "COALESCE(SUM(dead = 0 AND locked_until >= :now), 0), "
                "COALESCE(SUM(dead = 1), 0), "
                "COALESCE(SUM(dead = 0 AND (locked_until IS NULL OR locked_until < :now) "
                "AND visible_at > :now), 0) FROM messages WHERE queue = :queue",
                {"now": now, "queue": self._queue},
            ).fetchone()
        return base.DepthSample(
            active=active,
            in_flight=in_flight,
            dead_lettered=dead,
            sampled_at=now,
            scheduled=scheduled,
            source="sqlite",
        )

    def recent(self, *, since: float) -> base.History:
        """Settlements since ``since``; waits of the jobs first delivered since then (settled or not), runs of
        the deliveries that completed since then; the oldest job waiting now."""
        now = time.time()
        args = {"queue": self._queue, "since": since, "now": now}
        with self._db.read() as conn:
            settled = conn.execute(
                "SELECT outcome, enqueued_at, first_locked_at, locked_at, settled_at FROM settled "
                "WHERE queue = :queue AND settled_at >= :since",
                args,
            ).fetchall()
            live = conn.execute(
                "SELECT enqueued_at, first_locked_at FROM messages WHERE queue = :queue AND dead = 0 "
                "AND (enqueued_at >= :since OR first_locked_at >= :since)",
                args,
            ).fetchall()
            (oldest,) = conn.execute(
                "SELECT MIN(enqueued_at) FROM messages WHERE queue = :queue AND dead = 0 "
                "AND (locked_until IS NULL OR locked_until < :now) AND (visible_at IS NULL OR visible_at <= :now)",
                args,
            ).fetchone()
        return _history(settled, live, oldest, since=since, now=now)

    def close(self) -> None:
        self._db.close()


def _history(
    settled: list[tuple[str, float, float | None, float | None, float]],
    live: list[tuple[float, float | None]],
    oldest: float | None,
    *,
    since: float,
    now: float,
) -> base.History:
    """The figures ``recent`` reports, from the rows it read (pure)."""
    waits = sorted(
        first - enqueued
        for enqueued, first in [(row[1], row[2]) for row in settled] + live
        if first is not None and first >= since
    )
    runs = sorted(
        at - locked for outcome, _, _, locked, at in settled if outcome == COMPLETED and locked is not None
    )
    return base.History(
        since=since,
        until=now,
        source="sqlite",
        completed=sum(1 for row in settled if row[0] == COMPLETED),
        dead_lettered=sum(1 for row in settled if row[0] == DEAD_LETTERED),
        enqueued=sum(1 for row in settled if row[1] >= since) + sum(1 for row in live if row[0] >= since),
        wait_p50_s=percentile(waits, 50),
        wait_p95_s=percentile(waits, 95),
        wait_max_s=waits[-1] if waits else None,
        run_p50_s=percentile(runs, 50),
        run_p95_s=percentile(runs, 95),
        oldest_waiting_s=None if oldest is None else max(now - oldest, 0.0),
    )


def percentile(ordered: Sequence[float], pct: float) -> float | None:
    """The nearest-rank percentile of sorted values (``None`` for none): a value that occurred, never an
    interpolation between two."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def _prune_settled(conn: sqlite3.Connection, queue: str, *, now: float) -> None:
    conn.execute("DELETE FROM settled WHERE queue = ? AND settled_at < ?", (queue, now - HISTORY_KEEP_S))


def _add_missing_columns(db: _sqlite.Database) -> None:
    with db.write() as conn:
        present = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        for column, declaration in _ADDED_COLUMNS.items():
            if column not in present:
                conn.execute(f"ALTER TABLE messages ADD COLUMN {column} {declaration}")


def _first_present(conn: sqlite3.Connection, queue: str, ids: list[str]) -> str | None:
    if len(set(ids)) != len(ids):
        return next(i for i in ids if ids.count(i) > 1)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        row = conn.execute(
            f"SELECT message_id FROM messages WHERE queue = ? AND message_id IN ({marks}) LIMIT 1",
            (queue, *chunk),
        ).fetchone()
        if row is not None:
            return str(row[0])
    return None


def _dead_letter_row(conn: sqlite3.Connection, seq: int, reason: str, description: str, *, now: float) -> None:
    conn.execute(
        f"{_RECORD_SETTLED} WHERE seq = ?",
        (DEAD_LETTERED, now, seq),
    )
    conn.execute(
        "UPDATE messages SET dead = 1, lock_token = NULL, locked_until = NULL, dl_reason = ?, dl_description = ? "
        "WHERE seq = ?",
        (reason, description, seq),
    )


def _exceeded(count: int) -> str:
    return f"delivered {count} times without being completed"


class ThreadedLockKeeper:
    """Renews a lock from a daemon thread every ``interval_s`` until stopped or the lock is lost."""

    def __init__(
        self, *, renew: Callable[[], float], interval_s: float, on_lost: Callable[[BaseException], None]
    ) -> None:
        self._renew = renew
        self._interval_s = interval_s
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._lost: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lock-keeper", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> BaseException | None:
        return self._lost

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._renew()
            except errors.LockLostError as exc:
                self._fail(exc)
                return
            except errors.BackendError as exc:
                log.warning("lock_renewal_failed", error=str(exc), transient=exc.transient)
                if not exc.transient:
                    self._fail(exc)
                    return

    def _fail(self, exc: BaseException) -> None:
        self._lost = exc
        self._on_lost(exc)
