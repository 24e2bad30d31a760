"""Shared SQLite plumbing for the local backends: WAL mode, busy timeout, explicit write transactions.

Several processes (controller, workers, ``status``) open the same files; WAL lets readers proceed while one
writer holds ``BEGIN IMMEDIATE``, and the busy timeout turns contention into a short wait instead of an error.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from scalebus import errors

_BUSY_TIMEOUT_S = 30.0


class Database:
    """One connection, usable from several threads of one process (guarded by a lock)."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise errors.ConfigError(
                "path", f"cannot open {path} ({exc})", "point the URL at a writable location"
            ) from None
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(schema)

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised write transaction (``BEGIN IMMEDIATE``) across threads and processes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def close(self) -> None:
        """Close the connection; closing a closed database does nothing (``sqlite3`` allows it)."""
        with self._lock:
            self._conn.close()
