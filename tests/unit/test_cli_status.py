"""``scalebus status``: every dead letter up to a stated cap, reasons in the table, real nulls and ISO times in
JSON, each part read on its own, and ``--watch`` until Ctrl-C.

``read_status`` runs over the real SQLite queue; the scale set and heartbeat ports are small stand-ins at our own
seam (a process pool would have to start workers to list any), one of which refuses like an identity without
the right would.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import rich.console

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import sqlite_queue
from scalebus.cli import output, status

NOW = 1_780_000_000.0


class _Instances:
    """A scale set that lists what it is given (``None``: refuses, as without Microsoft.Compute read)."""

    def __init__(self, instances: list[base.Instance] | None) -> None:
        self.instances = instances

    def list_instances(self) -> list[base.Instance]:
        if self.instances is None:
            raise errors.AccessDeniedError("list instances: HTTP 403 AuthorizationFailed")
        return self.instances

    def get_capacity(self) -> int:
        return len(self.instances or [])

    def set_capacity(self, capacity: int) -> None:
        raise AssertionError("status never writes")

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        raise AssertionError("status never writes")

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        raise AssertionError("status never writes")

    def close(self) -> None:
        pass


class _Beats:
    def __init__(self, beats: list[base.Heartbeat]) -> None:
        self.beats = beats

    def beat(self, heartbeat: base.Heartbeat) -> None:
        raise AssertionError("status never writes")

    def read_all(self) -> list[base.Heartbeat]:
        return self.beats

    def forget(self, instance_id: str) -> None:
        raise AssertionError("status never writes")

    def publish_hint(self, hint: base.FleetHint) -> None:
        raise AssertionError("status never writes")

    def read_hint(self) -> base.FleetHint | None:
        return None

    def close(self) -> None:
        pass


class _DeniedDepth:
    """A depth source the identity may not read (Service Bus's admin API without Manage)."""

    def read_depth(self) -> base.DepthSample:
        raise errors.QueueAccessDenied("read runtime properties of jobs: HTTP 401 (needs Manage)")

    def close(self) -> None:
        pass


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5)
    yield q
    q.close()


def _dead_letter(q: sqlite_queue.SqliteJobQueue, count: int) -> None:
    q.send([base.OutgoingMessage(f"j{i:03}", b"{}") for i in range(count)])
    for i in range(count):
        message = q.receive(max_wait_s=1)
        assert message is not None
        reason = "InputMissing" if i % 4 == 0 else "SchemaViolation"
        q.dead_letter(message, reason=reason, description=f"job {i}: https://a/c?sp=r&sig=SECRET{i}")


def _ports(q: sqlite_queue.SqliteJobQueue, **kw: object) -> status._StatusPorts:
    instances = kw.get("instances", [])
    return status._StatusPorts(
        queue=q,
        depth=kw.get("depth", q),  # type: ignore[arg-type]
        scale_set=_Instances(instances),  # type: ignore[arg-type]
        heartbeats=_Beats(kw.get("beats", [])),  # type: ignore[arg-type]
    )


def test_every_dead_letter_is_read_not_the_first_twenty(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 45)
    data = status.read_status(_ports(queue), max_dead_letters=1000, now=NOW)
    assert len(data["dead_letters"]) == 45
    assert data["dead_letters_capped"] is False


def test_the_dead_letter_cap_is_stated(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 12)
    data = status.read_status(_ports(queue), max_dead_letters=10, now=NOW)
    assert (len(data["dead_letters"]), data["dead_letters_capped"]) == (10, True)
    console = rich.console.Console(record=True, width=200)
    console.print(output.status_table(data))
    text = console.export_text()
    assert "the first 10 of 12, capped by --max-dead-letters 10" in text


def test_the_table_lists_dead_letters_by_reason(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 9)
    data = status.read_status(_ports(queue), max_dead_letters=100, now=NOW)
    console = rich.console.Console(record=True, width=200)
    console.print(output.status_table(data))
    text = console.export_text()
    assert "dead letters by reason (9)" in text
    assert re.search(r"│ SchemaViolation\s+│\s+6 │ job 1: ", text), text
    assert re.search(r"│ InputMissing\s+│\s+3 │ job 0: .*│ j000, j004, j008\s+│", text), text


def test_json_has_real_nulls_iso_times_and_whole_seconds(queue: sqlite_queue.SqliteJobQueue) -> None:
    idle = base.Instance("vm-1", base.InstanceState.RUNNING, created_at=NOW - 90.6)
    busy = base.Instance("vm-2", base.InstanceState.STARTING, created_at=NOW - 5.2, model="img/1.0.0")
    beat = base.Heartbeat("vm-2", base.WorkerState.BUSY, at=NOW - 1, job_id="j7")
    data = status.read_status(_ports(queue, instances=[idle, busy], beats=[beat]), max_dead_letters=10, now=NOW)
    first, second = data["instances"]
    assert (first["worker"], first["job_id"], first["heartbeat_at"], first["model"]) == (None, None, None, None)
    assert (first["age_s"], second["age_s"], second["job_id"]) == (91, 5, "j7")
    for stamp in (data["read_at"], data["depth"]["sampled_at"], first["created_at"], second["heartbeat_at"]):
        assert datetime.datetime.fromisoformat(stamp).tzinfo is not None
    assert datetime.datetime.fromisoformat(data["read_at"]).timestamp() == NOW
    assert "-" not in [v for row in data["instances"] for v in row.values()], "no placeholder dashes in JSON"


def test_with_rights_for_dead_letters_and_instances_only_it_shows_those(
    queue: sqlite_queue.SqliteJobQueue,
) -> None:
    _dead_letter(queue, 2)
    instance = base.Instance("vm-1", base.InstanceState.RUNNING, created_at=NOW - 10)
    data = status.read_status(
        _ports(queue, depth=_DeniedDepth(), instances=[instance]), max_dead_letters=5, now=NOW
    )
    assert data["depth"] is None
    assert len(data["dead_letters"]) == 2 and len(data["instances"]) == 1
    assert any(u.startswith("depth: ") and "Manage" in u for u in data["unavailable"])
    denied = status.read_status(_ports(queue, instances=None), max_dead_letters=5, now=NOW)
    assert denied["instances"] is None and any(u.startswith("instances: ") for u in denied["unavailable"])


def test_dead_letter_text_is_redacted_in_both_views(
    queue: sqlite_queue.SqliteJobQueue, capsys: pytest.CaptureFixture[str]
) -> None:
    _dead_letter(queue, 1)
    data = status.read_status(_ports(queue), max_dead_letters=5, now=NOW)
    output.emit(data, output.Output.JSON, output.status_table)
    output.emit(data, output.Output.TABLE, output.status_table)
    printed = capsys.readouterr().out
    assert "SECRET0" not in printed and printed.count("sig=***") == 2


def test_watch_redraws_until_ctrl_c(tmp_path: Path) -> None:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5)
    q.close()
    env = {
        **os.environ,
        "SCALEBUS_QUEUE__URL": f"sqlite:///{tmp_path}/q.db?queue=jobs",
        "SCALEBUS_SCALE_SET__STATE_PATH": f"{tmp_path}/pool.db",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalebus", "status", "--watch", "--interval", "0.2", "-o", "json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        readings = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    times = [r["read_at"] for r in readings]
    assert all(r["queue"] == "jobs" for r in readings) and times == sorted(times)
    assert time.time() - datetime.datetime.fromisoformat(times[-1]).timestamp() < 30
