"""``SqliteLease``: the controllers' lease as a row in the embedded pool's SQLite database.

Every controller of a local pool runs on this machine and opens the pool's file (``scale_set.state_path``), so one
row per lease name, changed only inside ``BEGIN IMMEDIATE`` transactions, decides who leads: whoever finds the
row free or run out takes it and raises its token by one. Times are wall-clock epoch seconds (``time.time()``),
which every process on one machine shares. Each tenure is also recorded in ``lease_tenures`` (token, holder, when
it began), so a later reader can tell which holder led at any moment (the standby test checks every write
against it).

Crash-only, as the pool is: the row also names the process that took the lease (pid and start time), and a lease
whose process is gone (a controller killed outright) is free at once instead of after its duration. A process
that is alive but silent (stopped, starved) still keeps it until the duration runs out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import _sqlite

log = structlog.get_logger(__name__)

DEFAULT_NAME = "controller"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    pid INTEGER,
    pid_started REAL
);
CREATE TABLE IF NOT EXISTS lease_tenures (
    name TEXT NOT NULL,
    token INTEGER NOT NULL,
    holder TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    PRIMARY KEY (name, token)
);
"""


class SqliteLease:
    """Implements ``base.Lease`` over one row of ``leases`` in a SQLite file."""

    def __init__(
        self,
        db: _sqlite.Database,
        *,
        duration_s: float,
        name: str = DEFAULT_NAME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if duration_s <= 0:
            raise errors.ConfigError("controller.lease_s", f"{duration_s:g} s is no lease", "give seconds above 0")
        self._db = db
        self._duration_s = duration_s
        self._name = name
        self._clock = clock

    @classmethod
    def open(cls, state_path: Path, *, duration_s: float, name: str = DEFAULT_NAME) -> SqliteLease:
        return cls(_sqlite.Database(state_path, _SCHEMA), duration_s=duration_s, name=name)

    @property
    def duration_s(self) -> float:
        return self._duration_s

    def acquire(self, holder: str) -> base.LeaseGrant | None:
        with self._db.write() as conn:
            now = self._clock()
            row = conn.execute(
                "SELECT token, expires_at, pid, pid_started FROM leases WHERE name = ?", (self._name,)
            ).fetchone()
            if row is not None and row[1] > now and _alive(row[2], row[3]):
                return None
            token = 1 if row is None else int(row[0]) + 1
            conn.execute(
                "INSERT OR REPLACE INTO leases (name, holder, token, expires_at, pid, pid_started)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self._name, holder, token, now + self._duration_s, os.getpid(), psutil.Process().create_time()),
            )
            conn.execute(
                "INSERT INTO lease_tenures (name, token, holder, acquired_at) VALUES (?, ?, ?, ?)",
                (self._name, token, holder, now),
            )
        log.info("lease_acquired", lease=self._name, holder=holder, token=token)
        return base.LeaseGrant(holder=holder, token=token)

    def renew(self, grant: base.LeaseGrant) -> base.LeaseGrant:
        with self._db.write() as conn:
            changed = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? AND token = ? AND expires_at > 0",
                (self._clock() + self._duration_s, self._name, grant.holder, grant.token),
            ).rowcount
        if not changed:
            raise errors.LeaseLostError(f"lease {self._name!r}: token {grant.token} is no longer {grant.holder}'s")
        return grant

    def release(self, grant: base.LeaseGrant) -> None:
        """Run the lease out now; the token stays, so the next holder's is still higher."""
        with self._db.write() as conn:
            conn.execute(
                "UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ? AND token = ?",
                (self._name, grant.holder, grant.token),
            )

    def holder(self) -> base.LeaseHolder | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT holder, token, expires_at, pid, pid_started FROM leases WHERE name = ?", (self._name,)
            ).fetchone()
        if row is None or row[2] <= self._clock() or not _alive(row[3], row[4]):
            return None
        return base.LeaseHolder(holder=str(row[0]), token=int(row[1]), expires_at=float(row[2]))

    def tenures(self) -> list[tuple[int, str, float]]:
        """Every tenure so far, oldest first: (token, holder, acquired_at)."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT token, holder, acquired_at FROM lease_tenures WHERE name = ? ORDER BY token", (self._name,)
            ).fetchall()
        return [(int(t), str(h), float(a)) for t, h, a in rows]

    def close(self) -> None:
        self._db.close()


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether the process that took the lease still runs (the same process: its start time matches)."""
    if pid is None:
        return True  # a row that names no process: only its duration can free it
    try:
        proc = psutil.Process(pid)
        return bool(abs(proc.create_time() - (started or 0.0)) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
