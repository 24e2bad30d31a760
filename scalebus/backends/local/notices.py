"""The embedded pool's scheduled events: the local stand-in for IMDS Scheduled Events (``base.NoticeSource``).

Notices live in the pool's SQLite file (``scale_set.state_path``), posted by whoever simulates the platform's
decision — a test, the demo, an operator simulating a Spot eviction with :meth:`LocalNoticeBoard.post` — and read
by each worker for its own instance. As on Azure an event names one or more instances, is ``Scheduled`` until
acknowledged (or until its time comes, which the reader sees as ``not_before`` in the past) and ``Started`` after.
The pool then plays the platform's part (``LocalScaleSet``): a started ``Preempt`` or ``Terminate`` stops its
instances abruptly and deletes them, and the event goes with them (:meth:`LocalNoticeBoard.clear`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import _sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scheduled_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    resources TEXT NOT NULL,
    not_before REAL NOT NULL,
    acknowledged_at REAL
);
"""


class LocalNoticeBoard:
    """The platform's side: post notices for instances of the local pool, see which were acknowledged."""

    def __init__(self, state_path: Path) -> None:
        self._db = _sqlite.Database(state_path, _SCHEMA)

    def post(self, instance_ids: Sequence[str], kind: base.NoticeKind, *, not_before: float) -> str:
        """Schedule an event for these instances; returns its id."""
        event_id = str(uuid.uuid4())
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO scheduled_events (event_id, kind, resources, not_before) VALUES (?, ?, ?, ?)",
                (event_id, kind.value, json.dumps(list(instance_ids)), not_before),
            )
        return event_id

    def acknowledged(self) -> list[str]:
        """Ids of the events some worker acknowledged, oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT event_id FROM scheduled_events WHERE acknowledged_at IS NOT NULL ORDER BY seq"
            ).fetchall()
        return [row[0] for row in rows]

    def started_evictions(self, *, now: float) -> list[tuple[str, list[str]]]:
        """``(event_id, instance ids)`` of each ``Preempt`` or ``Terminate`` that has started: approved by a
        worker, or its ``not_before`` passed. The pool acts on these as the platform would."""
        ending = (base.NoticeKind.PREEMPT.value, base.NoticeKind.TERMINATE.value)
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT event_id, resources FROM scheduled_events "
                "WHERE kind IN (?, ?) AND (acknowledged_at IS NOT NULL OR not_before <= ?) ORDER BY seq",
                (*ending, now),
            ).fetchall()
        return [(event_id, list(json.loads(resources))) for event_id, resources in rows]

    def clear(self, event_id: str) -> None:
        """The event is over (or cancelled): it is no longer reported."""
        with self._db.write() as conn:
            conn.execute("DELETE FROM scheduled_events WHERE event_id = ?", (event_id,))

    def source_for(self, instance_id: str) -> SqliteNoticeSource:
        """What the worker of ``instance_id`` reads (its own connection, closed with it)."""
        return SqliteNoticeSource.open(self._db.path, instance_id)

    def close(self) -> None:
        self._db.close()


class SqliteNoticeSource:
    """Implements ``base.NoticeSource`` for one instance of the local pool."""

    def __init__(self, db: _sqlite.Database, instance_id: str) -> None:
        self._db = db
        self._instance_id = instance_id

    @classmethod
    def open(cls, state_path: Path, instance_id: str) -> SqliteNoticeSource:
        return cls(_sqlite.Database(state_path, _SCHEMA), instance_id)

    def pending(self) -> list[base.Notice]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT event_id, kind, resources, not_before, acknowledged_at FROM scheduled_events ORDER BY seq"
            ).fetchall()
        now = time.time()
        notices = []
        for event_id, kind, resources, not_before, acknowledged_at in rows:
            names = json.loads(resources)
            if self._instance_id not in names:
                continue
            started = acknowledged_at is not None or not_before <= now  # as on Azure: approved, or its time came
            notices.append(
                base.Notice(
                    event_id=event_id,
                    kind=base.NoticeKind(kind),
                    not_before=None if started else not_before,
                    started=started,
                    others_affected=any(name != self._instance_id for name in names),
                )
            )
        return notices

    def acknowledge(self, event_id: str) -> None:
        with self._db.write() as conn:
            updated = conn.execute(
                "UPDATE scheduled_events SET acknowledged_at = COALESCE(acknowledged_at, ?) WHERE event_id = ?",
                (time.time(), event_id),
            ).rowcount
        if not updated:
            raise errors.NoticeError(f"no scheduled event {event_id!r} to acknowledge")

    def close(self) -> None:
        self._db.close()
