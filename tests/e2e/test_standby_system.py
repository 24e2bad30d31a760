"""Two controllers on the embedded default: one leads, SIGKILL takes it out mid-burst, the standby carries on.

Both are real ``scalebus controller run`` processes on one pool database. Controller A takes the lease and starts
workers for the first wave of jobs; it is killed outright; B takes over (within two lease periods), scales out for
the second wave and drains. A sampler reads the pool's instance table throughout: the live instances never exceed
``max_instances``, and every instance was created by the controller whose tenure (fencing token) was in force at
that moment, as the lease's own record of tenures tells, so no write was made twice or by a deposed leader.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e._system import System, assert_outputs_exactly_once

pytestmark = pytest.mark.slow

LEASE_S = 4
MAX_INSTANCES = 4
SQLITE_QUEUE = """url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = 5
max_delivery_count = 3"""


class InstanceSampler:
    """Reads the pool's instance table every 0.1 s: each row ever seen, and the most live at once."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self.rows: dict[str, tuple[float, int]] = {}
        """instance id → (created_at, spawner pid)."""
        self.most_live = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InstanceSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            if not self._db.exists():
                continue
            try:
                with sqlite3.connect(f"file:{self._db}?mode=ro", uri=True, timeout=5) as conn:
                    rows = conn.execute(
                        "SELECT instance_id, created_at, spawner_pid, deleting_since FROM instances"
                    ).fetchall()
            except sqlite3.OperationalError:
                continue  # the pool has not made its tables yet
            for instance_id, created_at, spawner_pid, _ in rows:
                self.rows.setdefault(instance_id, (created_at, spawner_pid))
            self.most_live = max(self.most_live, sum(1 for row in rows if row[3] is None))


def _start(system: System, name: str) -> subprocess.Popen[bytes]:
    """A controller whose output (and its workers', which inherit it) goes to files: a pipe nobody drains after
    the controller is killed would stall the workers still writing to it."""
    out = (system.root / f"{name}.out").open("wb")
    err = (system.root / f"{name}.err").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "scalebus", "controller", "run", "--config", str(system.config), "-o", "json"],
            env=system.env,
            stdout=out,
            stderr=err,
        )
    finally:
        out.close()
        err.close()


def _tenures(db: Path) -> list[tuple[int, int, float]]:
    """(token, holder pid, acquired_at) per tenure, oldest first."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT token, holder, acquired_at FROM lease_tenures ORDER BY token").fetchall()
    return [(token, int(holder.rsplit("/", 1)[1]), acquired_at) for token, holder, acquired_at in rows]


def _wait_for(what: str, check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    system = System(
        tmp_path,
        queue_table=SQLITE_QUEUE.format(root=tmp_path),
        environ={
            "SCALEBUS_CONTROLLER__LEASE_S": str(LEASE_S),
            "SCALEBUS_CONTROLLER__MAX_INSTANCES": str(MAX_INSTANCES),
        },
    )
    yield system
    _kill_workers(tmp_path / "pool.db")


def _kill_workers(db: Path) -> None:
    """Workers outlive a killed controller (as VMs do); none may outlive the test."""
    if not db.exists():
        return
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        pids = [row[0] for row in conn.execute("SELECT pid FROM instances WHERE pid IS NOT NULL")]
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            continue


def test_standby_takes_over_mid_burst_and_no_write_is_doubled(system: System) -> None:
    first, second = [f"slow{i}" for i in range(2)], [f"slow{i}" for i in range(2, 8)]
    inputs = system.write_inputs(first + second)
    lines = inputs.read_text().splitlines()
    (system.root / "wave1.jsonl").write_text("\n".join(lines[: len(first)]))
    (system.root / "wave2.jsonl").write_text("\n".join(lines[len(first) :]))
    pool_db = system.root / "pool.db"
    assert system.cli("submit", "-f", str(system.root / "wave1.jsonl")).returncode == 0
    a = _start(system, "a")
    b: subprocess.Popen[bytes] | None = None
    with InstanceSampler(pool_db) as sampler:
        try:
            _wait_for("A to lead", lambda: pool_db.exists() and _has_tenure(pool_db), 20)
            b = _start(system, "b")
            _wait_for("A to start the first wave's workers", lambda: len(sampler.rows) >= len(first), 20)
            _wait_for("B to stand by", lambda: b"controller_started" in (system.root / "b.err").read_bytes(), 20)
            assert len(_tenures(pool_db)) == 1, "B stands by while A leads"
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=5)
            killed_at = time.time()
            assert system.cli("submit", "-f", str(system.root / "wave2.jsonl")).returncode == 0
            _wait_for("B to lead", lambda: len(_tenures(pool_db)) >= 2, 2 * LEASE_S + 5)
            leader = system.status()["leader"]
            assert leader is not None and leader["holder"].endswith(f"/{b.pid}")  # type: ignore[index]
            assert b.wait(timeout=45) == 0, (system.root / "b.err").read_text()[-3000:]
        finally:
            for proc in (a, b):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)

    assert_outputs_exactly_once(system, first + second)
    tenures = _tenures(pool_db)
    assert [pid for _, pid, _ in tenures] == [a.pid, b.pid], "A led, then B; nobody else"
    assert tenures[1][2] - killed_at < 2 * LEASE_S, "the standby took over within two lease periods"
    assert sampler.most_live <= MAX_INSTANCES
    by_spawner = {pid for _, pid in sampler.rows.values()}
    assert by_spawner == {a.pid, b.pid}, "B continued the scale-out A began"
    for instance_id, (created_at, spawner) in sampler.rows.items():
        in_force = [pid for _, pid, acquired_at in tenures if acquired_at <= created_at][-1]
        assert spawner == in_force, f"{instance_id} was created by a controller that did not hold the lease"
    stats = json.loads((system.root / "b.out").read_text())
    assert stats["capacity_writes"] >= 1 and stats["fenced_writes"] == 0


def _has_tenure(db: Path) -> bool:
    try:
        return bool(_tenures(db))
    except sqlite3.OperationalError:
        return False
