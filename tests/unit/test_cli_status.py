"""``scalebus status``: every pool, every dead letter up to a stated cap, reasons in the table, the last hour's
throughput and waits, real nulls, rounded numbers and ISO times in JSON, each part read on its own, and ``--watch``
until Ctrl-C.

``read_status`` runs over the real SQLite queue; the scale set and heartbeat ports are small stand-ins at our own
seam (a process pool would have to start workers to list any), one of which refuses like an identity without
the right would. The command itself runs as a user runs it, in its own process.
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
from typing import Any

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


class _DeniedHistory:
    """A history the identity may not read (Azure Monitor without Monitoring Reader)."""

    def recent(self, *, since: float) -> base.History:
        raise errors.QueueAccessDenied("read CompleteMessage of jobs: refused (HTTP 403)")

    def close(self) -> None:
        pass


class _Lease:
    def holder(self) -> base.LeaseHolder | None:
        return base.LeaseHolder("host-a/123", token=7, expires_at=NOW + 20)


def _ports(q: sqlite_queue.SqliteJobQueue, **kw: object) -> status._StatusPorts:
    instances = kw.get("instances", [])
    return status._StatusPorts(
        queue=q,
        depth=kw.get("depth", q),  # type: ignore[arg-type]
        scale_set=_Instances(instances),  # type: ignore[arg-type]
        heartbeats=_Beats(kw.get("beats", [])),  # type: ignore[arg-type]
        history=kw.get("history"),  # type: ignore[arg-type]
        pool=str(kw.get("pool", "default")),
    )


def _table_text(renderable: rich.console.RenderableType) -> str:
    console = rich.console.Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_every_dead_letter_is_read_not_the_first_twenty(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 45)
    data = status.read_status(_ports(queue), max_dead_letters=1000, now=NOW)
    assert len(data["dead_letters"]) == 45
    assert data["dead_letters_capped"] is False


def test_the_dead_letter_cap_is_stated(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 12)
    data = status.read_status(_ports(queue), max_dead_letters=10, now=NOW)
    assert (len(data["dead_letters"]), data["dead_letters_capped"]) == (10, True)
    text = _table_text(output.pool_status_table(data))
    assert "the first 10 of 12, capped by --max-dead-letters 10" in text


def test_capped_only_when_more_exist_than_the_cap(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 250)
    exact = status.read_status(_ports(queue), max_dead_letters=250, now=NOW)
    assert (len(exact["dead_letters"]), exact["dead_letters_capped"]) == (250, False)
    under = status.read_status(_ports(queue), max_dead_letters=249, now=NOW)
    assert (len(under["dead_letters"]), under["dead_letters_capped"]) == (249, True)
    assert [d["message_id"] for d in exact["dead_letters"]] == [f"j{i:03}" for i in range(250)]


def test_the_table_lists_dead_letters_by_reason(queue: sqlite_queue.SqliteJobQueue) -> None:
    _dead_letter(queue, 9)
    data = status.read_status(_ports(queue), max_dead_letters=100, now=NOW)
    text = _table_text(output.pool_status_table(data))
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
    data = status.read_fleet([_ports(queue)], None, max_dead_letters=5, now=NOW)
    output.emit(data, output.Output.JSON, output.status_table)
    output.emit(data, output.Output.TABLE, output.status_table)
    printed = capsys.readouterr().out
    assert "SECRET0" not in printed and printed.count("sig=***") == 2


CTRL_C_WORKS = [
    sys.executable,
    "-c",
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'scalebus'; runpy.run_module('scalebus', run_name='__main__', alter_sys=True)",
]
"""``python -m scalebus`` with Ctrl-C handled whatever this process inherited: a shell's background job (a CI
runner's) has SIGINT ignored, every child inherits that, and Python then installs no Ctrl-C handler."""


def _watch(argv: list[str], *, cwd: Path, env: dict[str, str], count: int) -> list[dict[str, Any]]:
    """The first ``count`` JSON readings of ``scalebus <argv>`` (a ``--watch``), then Ctrl-C: it must exit 0."""
    proc = subprocess.Popen(
        [*CTRL_C_WORKS, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        readings = [json.loads(proc.stdout.readline()) for _ in range(count)]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return readings


def test_watch_redraws_until_ctrl_c(tmp_path: Path) -> None:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5)
    q.close()
    env = {
        **os.environ,
        "SCALEBUS_QUEUE__URL": f"sqlite:///{tmp_path}/q.db?queue=jobs",
        "SCALEBUS_SCALE_SET__STATE_PATH": f"{tmp_path}/pool.db",
    }
    readings = _watch(["status", "--watch", "--interval", "0.2", "-o", "json"], cwd=tmp_path, env=env, count=3)
    times = [r["read_at"] for r in readings]
    assert all([p["queue"] for p in r["pools"]] == ["jobs"] for r in readings) and times == sorted(times)
    assert time.time() - datetime.datetime.fromisoformat(times[-1]).timestamp() < 30


def test_the_last_hour_is_shown_rounded_with_iso_times(queue: sqlite_queue.SqliteJobQueue) -> None:
    queue.send([base.OutgoingMessage(f"j{i}", b"{}") for i in range(3)])
    for _ in range(2):
        message = queue.receive(max_wait_s=1)
        assert message is not None
        queue.complete(message)
    now = time.time()
    data = status.read_status(_ports(queue, history=queue), max_dead_letters=5, now=now)
    last = data["throughput"]
    assert (last["completed"], last["dead_lettered"], last["enqueued"], last["source"]) == (2, 0, 3, "sqlite")
    assert last["completed_per_minute"] == round(2 / 60, 2)
    for seconds in (*last["wait_s"].values(), *last["run_s"].values(), last["oldest_waiting_s"]):
        assert isinstance(seconds, float) and seconds == round(seconds, 1)
    since = datetime.datetime.fromisoformat(last["since"]).timestamp()
    assert abs(since - (now - status.HISTORY_WINDOW_S)) <= 1
    assert not any(u.startswith("throughput") for u in data["unavailable"])
    text = _table_text(output.pool_status_table(data))
    assert re.search(r"last hour: 2 completed \(0\.03/min\), 0 dead-lettered, 3 enqueued; wait p50 [\d.]+ s", text)


def test_a_queue_without_a_record_says_so_and_nulls_the_throughput(queue: sqlite_queue.SqliteJobQueue) -> None:
    data = status.read_status(_ports(queue), max_dead_letters=5, now=NOW)
    assert data["throughput"] is None and status.NO_HISTORY in data["unavailable"]


def test_every_pool_is_read_on_its_own_with_only_some_rights(tmp_path: Path) -> None:
    """One pool's identity may read neither depth nor Monitor; the other pool and the leader are still shown."""
    short = sqlite_queue.SqliteJobQueue(tmp_path / "a.db", queue="short", lock_duration_s=30, max_delivery_count=5)
    long = sqlite_queue.SqliteJobQueue(tmp_path / "b.db", queue="long", lock_duration_s=30, max_delivery_count=5)
    try:
        _dead_letter(long, 2)
        instance = base.Instance("vm-1", base.InstanceState.RUNNING, created_at=NOW - 10)
        pools = [
            _ports(short, pool="short", history=short),
            _ports(long, pool="long", depth=_DeniedDepth(), history=_DeniedHistory(), instances=[instance]),
        ]
        data = status.read_fleet(pools, _Lease(), max_dead_letters=5, now=NOW)  # type: ignore[arg-type]
    finally:
        short.close()
        long.close()
    first, second = data["pools"]
    assert (first["pool"], first["queue"], second["pool"], second["queue"]) == ("short", "short", "long", "long")
    assert first["depth"] is not None and first["throughput"] is not None and first["unavailable"] == []
    assert second["depth"] is None and second["throughput"] is None
    assert len(second["dead_letters"]) == 2 and len(second["instances"]) == 1
    assert any(u.startswith("throughput: ") and "403" in u for u in second["unavailable"])
    assert data["leader"] == {"holder": "host-a/123", "token": 7, "expires_at": status.iso(NOW + 20)}
    text = _table_text(output.status_table(data))
    assert "pool short, queue short:" in text and "pool long, queue long: depth unavailable" in text
    assert "leader: host-a/123 (token 7)" in text and "not shown: throughput: " in text


def _two_pools(tmp_path: Path, *, missing: str = "") -> Path:
    """A config of two embedded pools, their queue databases created (but ``missing``'s)."""
    lines = []
    for name in ("short", "long"):
        if name != missing:
            sqlite_queue.SqliteJobQueue(
                tmp_path / f"{name}.db", queue=name, lock_duration_s=30, max_delivery_count=5
            ).close()
        lines += [
            "[[pools]]",
            f'name = "{name}"',
            "[pools.queue]",
            f'url = "sqlite:///{tmp_path}/{name}.db?queue={name}"',
            "[pools.scale_set]",
            f'state_path = "{tmp_path}/{name}-pool.db"',
        ]
    config = tmp_path / "scalebus.toml"
    config.write_text("[controller]\nlease_s = 0\n" + "\n".join(lines) + "\n")
    return config


def _status(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebus", "status", *args],
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCALEBUS_")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_every_pool_or_the_one_named(tmp_path: Path) -> None:
    config = _two_pools(tmp_path)
    every = _status(tmp_path, "-c", str(config), "-o", "json")
    assert every.returncode == 0, every.stderr
    data = json.loads(every.stdout)
    assert [(p["pool"], p["queue"]) for p in data["pools"]] == [("short", "short"), ("long", "long")]
    assert data["leader"] is None and "read_at" in data
    one = _status(tmp_path, "-c", str(config), "-o", "json", "--pool", "long")
    assert one.returncode == 0, one.stderr
    assert [p["pool"] for p in json.loads(one.stdout)["pools"]] == ["long"]
    table = _status(tmp_path, "-c", str(config))
    assert (
        table.returncode == 0
        and "pool short, queue short" in table.stdout
        and "pool long, queue long" in table.stdout
    )


@pytest.mark.parametrize(
    ("missing", "args", "says"),
    [
        pytest.param("", ("--pool", "medium"), "no pool named 'medium'", id="unknown-pool"),
        pytest.param("long", (), "long.db does not exist", id="a-pool-without-its-queue-database"),
        pytest.param("long", ("--pool", "long"), "long.db does not exist", id="the-named-pool-without-it"),
    ],
)
def test_a_pool_that_is_not_there_is_a_mistake(
    tmp_path: Path, missing: str, args: tuple[str, ...], says: str
) -> None:
    result = _status(tmp_path, "-c", str(_two_pools(tmp_path, missing=missing)), "-o", "json", *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_pool_of_a_config_without_pools_is_default(tmp_path: Path) -> None:
    sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5).close()
    env = ("-c", str(_single(tmp_path)), "-o", "json")
    assert [p["pool"] for p in json.loads(_status(tmp_path, *env).stdout)["pools"]] == ["default"]
    assert _status(tmp_path, *env, "--pool", "default").returncode == 0
    assert _status(tmp_path, *env, "--pool", "other").returncode == 2


def _single(tmp_path: Path) -> Path:
    config = tmp_path / "single.toml"
    config.write_text(
        f'[queue]\nurl = "sqlite:///{tmp_path}/q.db?queue=jobs"\n[scale_set]\nstate_path = "{tmp_path}/pool.db"\n'
    )
    return config


def test_watch_redraws_every_pool(tmp_path: Path) -> None:
    argv = ["status", "-c", str(_two_pools(tmp_path)), "--watch", "--interval", "0.2", "-o", "json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEBUS_")}
    readings = _watch(argv, cwd=tmp_path, env=env, count=2)
    assert all([p["pool"] for p in r["pools"]] == ["short", "long"] for r in readings)
