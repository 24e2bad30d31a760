"""The worker loop over the real embedded backends (SQLite queue, folder store, real subprocess analytics).

No mocks: each test writes a tiny analytics program, submits a job and asserts on the queue's and the data
lake's state afterwards — what a user would check.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from scalebus import errors, jobs
from scalebus.backends import base
from scalebus.backends.local import folder, pool, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.worker import job as worker_job
from scalebus.worker import loop, runner

ENVIRONMENT = worker_job.Cause.ENVIRONMENT

OK_PROGRAM = """
import os, pathlib
src = pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"])
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
names = sorted(str(p.relative_to(src)) for p in src.rglob("*.txt"))
(out / "result.txt").write_text(os.environ.get("SCALEBUS_PARAM_GREETING", "") + ":" + ",".join(names))
print("done")
"""


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "in" / "sample").mkdir(parents=True)
        (root / "in" / "sample" / "a.txt").write_text("A" * 100)
        (root / "in" / "sample" / "sub").mkdir()
        (root / "in" / "sample" / "sub" / "b.txt").write_text("B" * 10)

    def job(self, job_id: str, **extra: object) -> jobs.Job:
        raw = {
            "job_id": job_id,
            "inputs": [(self.root / "in" / "sample").as_uri() + "/"],
            "output": (self.root / "out" / job_id).as_uri() + "/",
            **extra,
        }
        return jobs.validate(raw)

    def out(self, job_id: str) -> Path:
        return self.root / "out" / job_id


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    yield q
    q.close()


def make_worker(
    queue: base.JobQueue,
    tmp_path: Path,
    program: str,
    *,
    heartbeats: base.HeartbeatStore | None = None,
    on_idle: Callable[[], None] | None = None,
    **overrides: object,
) -> loop.Worker:
    script = tmp_path / "analytics.py"
    script.write_text(program)
    defaults: dict[str, object] = {"idle_timeout_s": 1.5, "receive_wait_s": 0.5, "heartbeat_interval_s": 0.2}
    settings = WorkerSettings(
        command=[sys.executable, str(script)],
        work_dir=str(tmp_path / "work"),
        **(defaults | overrides),
    )
    store = folder.FolderStore()
    return loop.Worker(
        loop.WorkerPorts(queue=queue, resolve=lambda _uri: store, heartbeats=heartbeats),
        instance_id="test-1",
        settings=settings,
        staging_settings=StagingSettings(min_free_bytes=0),
        on_idle=on_idle,
    )


def submit(queue: base.JobQueue, *job_list: jobs.Job) -> None:
    jobs.JobProducer(queue).submit(job_list)


def test_job_is_staged_run_published_and_completed(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1", params={"greeting": "hi"}))
    stats = make_worker(queue, tmp_path, OK_PROGRAM).run()
    out = lake.out("j1")
    assert (out / "result.txt").read_text() == "hi:sample/a.txt,sample/sub/b.txt"
    assert (out / "stdout.txt").read_text().strip() == "done"
    assert (out / "_SUCCESS").exists()
    report = json.loads((out / worker_job.JOB_REPORT).read_text())
    assert report["bytes_staged"] == 110 and report["files_staged"] == 2 and report["instance_id"] == "test-1"
    assert stats.completed == 1
    assert queue.read_depth().active == 0 and queue.receive(max_wait_s=0.1) is None
    assert not list((tmp_path / "work").iterdir()), "job work dirs are cleaned up"


def test_invalid_job_is_dead_lettered_with_reason(queue, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queue.send([base.OutgoingMessage("bad-1", b"{not json"), base.OutgoingMessage("bad-2", b'{"job_id": "x"}')])
    make_worker(queue, tmp_path, OK_PROGRAM).run()
    dead = {d.message_id: d for d in queue.peek_dead_letters(max_count=10)}
    assert dead["bad-1"].reason == "InvalidJson"
    assert dead["bad-2"].reason == "SchemaViolation"
    assert "inputs" in dead["bad-2"].description and "output" in dead["bad-2"].description


def test_analytics_exit_3_dead_letters(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"))
    make_worker(queue, tmp_path, "import sys; print('bad reference', file=sys.stderr); sys.exit(3)").run()
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert (dead.reason, dead.description) == ("AnalyticsRejected", "bad reference")
    assert not lake.out("j1").exists()


def test_failing_analytics_is_retried_then_dead_lettered(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"))
    with capture_logs() as logs:
        stats = make_worker(queue, tmp_path, "import sys; sys.exit(1)").run()
    assert stats.abandoned == 2  # max_delivery_count = 2
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert dead.reason == "MaxDeliveryCountExceeded"
    abandoned = [e for e in logs if e["event"] == "job_abandoned"]
    assert [e["delivery_count"] for e in abandoned] == [1, 2]


def test_missing_input_is_dead_lettered(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    job = jobs.validate(
        {"job_id": "j1", "inputs": [(lake.root / "nope").as_uri() + "/"], "output": lake.out("j1").as_uri()}
    )
    submit(queue, job)
    make_worker(queue, tmp_path, OK_PROGRAM).run()
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert dead.reason == "ObjectNotFound"


def test_already_published_job_is_completed_without_running(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lake.out("j1").mkdir(parents=True)
    (lake.out("j1") / "_SUCCESS").write_text(json.dumps({"job_id": "j1"}))  # an earlier delivery committed
    submit(queue, lake.job("j1"))
    stats = make_worker(queue, tmp_path, "import sys; sys.exit(1)").run()
    assert stats.completed == 1 and stats.abandoned == 0
    assert sorted(p.name for p in lake.out("j1").iterdir()) == ["_SUCCESS"]


def test_lost_lock_stops_the_job_and_publishes_nothing(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"))
    worker = make_worker(queue, tmp_path, "import time; time.sleep(30)")
    steal = threading.Thread(target=_steal_lock_once_locked, args=(tmp_path / "q.db",))
    steal.start()
    stats = worker.run()
    steal.join()
    assert stats.lock_lost == 1 and stats.completed == 0
    assert not lake.out("j1").exists()


def _steal_lock_once_locked(db: Path) -> None:
    """Play another receiver: replace the lock token as Service Bus would after the lock moved."""
    conn = sqlite3.connect(db, isolation_level=None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if conn.execute("UPDATE messages SET lock_token = 'someone-else' WHERE lock_token IS NOT NULL").rowcount:
            break
        time.sleep(0.05)
    conn.close()


@pytest.mark.parametrize(
    ("program", "drain_timeout_s", "completed", "abandoned"),
    [
        pytest.param("import time; time.sleep(1)", 20.0, 1, 0, id="job-finishes-within-drain"),
        pytest.param("import time; time.sleep(60)", 0.5, 0, 1, id="job-abandoned-at-drain-deadline"),
    ],
)
def test_sigterm_drains(queue, lake, tmp_path, program, drain_timeout_s, completed, abandoned) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"), lake.job("j2"))
    worker = make_worker(queue, tmp_path, program, drain_timeout_s=drain_timeout_s)
    _when_busy(queue, worker.request_stop)
    stats = worker.run()
    assert (stats.completed, stats.abandoned) == (completed, abandoned)
    remaining = queue.receive(max_wait_s=0.5)
    assert remaining is not None  # j2 was never taken (and j1 is back if it was abandoned)


def _when_busy(queue: sqlite_queue.SqliteJobQueue, action: Callable[[], None]) -> None:
    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not queue.read_depth().in_flight:
            time.sleep(0.02)
        action()

    threading.Thread(target=watch, daemon=True).start()


def test_heartbeats_report_busy_then_idle(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    submit(queue, lake.job("j1"))
    seen: list[tuple[base.WorkerState, str | None]] = []

    class Recording:
        def beat(self, hb: base.Heartbeat) -> None:
            seen.append((hb.state, hb.job_id))
            beats.beat(hb)

        def read_all(self) -> list[base.Heartbeat]:
            return beats.read_all()

        def forget(self, instance_id: str) -> None:
            beats.forget(instance_id)

        def publish_hint(self, hint: base.FleetHint) -> None:
            beats.publish_hint(hint)

        def read_hint(self) -> base.FleetHint | None:
            return beats.read_hint()

        def close(self) -> None:
            beats.close()

    make_worker(queue, tmp_path, "import time; time.sleep(0.5)", heartbeats=Recording()).run()
    assert (base.WorkerState.BUSY, "j1") in seen
    assert seen.index((base.WorkerState.BUSY, "j1")) < seen.index((base.WorkerState.IDLE, None), 1)
    assert seen[-1] == (base.WorkerState.DRAINING, None), "retired once idle"
    (last,) = beats.read_all()
    assert (last.instance_id, last.state) == ("test-1", base.WorkerState.DRAINING)


@pytest.mark.parametrize(
    ("deleted_by_controller", "self_destroyed"),
    [
        pytest.param(False, True, id="nobody-deletes-it-so-it-deletes-itself"),
        pytest.param(True, False, id="controller-deletes-it-first"),
    ],
)
def test_idle_worker_retires(queue, tmp_path, deleted_by_controller, self_destroyed) -> None:  # type: ignore[no-untyped-def]
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    calls: list[str] = []
    worker = make_worker(
        queue,
        tmp_path,
        OK_PROGRAM,
        heartbeats=beats,
        on_idle=lambda: calls.append("self-destroy"),
        retire_wait_s=5.0,
    )

    def controller() -> None:  # plays the controller: deletes the instance once it reports retired
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(hb.state is base.WorkerState.DRAINING and hb.job_id is None for hb in beats.read_all()):
                worker.request_stop()  # what deleting the instance does to the process (SIGTERM / VM gone)
                return
            time.sleep(0.05)

    if deleted_by_controller:
        threading.Thread(target=controller, daemon=True).start()
    worker.run()
    assert calls == (["self-destroy"] if self_destroyed else [])
    (last,) = beats.read_all()
    assert (last.state, last.job_id) == (base.WorkerState.DRAINING, None)


# --------------------------------------------------------------------------------------------- idle grace


def retiring_after(logs: list[MutableMapping[str, Any]]) -> list[object]:
    return [e["idle_timeout_s"] for e in logs if e["event"] == "worker_started"]


def test_controller_hint_replaces_the_idle_timeout(queue, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A fresh hint wins over ``idle_timeout_s`` (here far longer than the test may take)."""
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    beats.publish_hint(base.FleetHint(idle_grace_s=0.3, at=time.time()))
    worker = make_worker(queue, tmp_path, OK_PROGRAM, heartbeats=beats, idle_timeout_s=60.0, retire_wait_s=0)
    with capture_logs() as logs:
        worker.run()
    assert retiring_after(logs) == [0.3]
    assert "worker_idle_retiring" in [e["event"] for e in logs]


def test_hint_published_while_idle_is_picked_up(queue, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No hint at start (the fallback applies); the controller's hint arrives with a later heartbeat."""
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    worker = make_worker(queue, tmp_path, OK_PROGRAM, heartbeats=beats, idle_timeout_s=60.0, retire_wait_s=0)

    def controller() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not beats.read_all():
            time.sleep(0.02)
        beats.publish_hint(base.FleetHint(idle_grace_s=0.0, at=time.time()))

    threading.Thread(target=controller, daemon=True).start()
    with capture_logs() as logs:
        worker.run()
    assert retiring_after(logs) == [60.0]
    assert worker.idle_timeout_s() == 0.0


@pytest.mark.parametrize(
    "hint",
    [
        pytest.param(base.FleetHint(idle_grace_s=60.0, at=time.time() - 10 * base.HINT_MAX_AGE_S), id="stale"),
        pytest.param(base.FleetHint(idle_grace_s=float("inf"), at=time.time()), id="infinite"),
        pytest.param(None, id="never-published"),
    ],
)
def test_without_a_usable_hint_the_idle_timeout_applies(queue, tmp_path, hint) -> None:  # type: ignore[no-untyped-def]
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    if hint is not None:
        beats.publish_hint(hint)
    worker = make_worker(queue, tmp_path, OK_PROGRAM, heartbeats=beats, idle_timeout_s=0.3, retire_wait_s=0)
    with capture_logs() as logs:
        worker.run()
    assert retiring_after(logs) == [0.3]


def test_hint_keeps_a_worker_waiting_for_the_next_job(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job that arrives after ``idle_timeout_s`` but within the controller's grace is still taken."""
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    beats.publish_hint(base.FleetHint(idle_grace_s=30.0, at=time.time()))
    worker = make_worker(queue, tmp_path, OK_PROGRAM, heartbeats=beats, idle_timeout_s=0.2, retire_wait_s=0)

    def producer_then_controller() -> None:
        time.sleep(0.6)  # well past the worker's own idle_timeout_s
        submit(queue, lake.job("late"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (lake.out("late") / "_SUCCESS").exists():
            time.sleep(0.05)
        beats.publish_hint(base.FleetHint(idle_grace_s=0.0, at=time.time()))  # then: retire now

    threading.Thread(target=producer_then_controller, daemon=True).start()
    stats = worker.run()
    assert stats.completed == 1


# --------------------------------------------------------------------------------------------- settlement rules


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(
            errors.LockLostError("gone"),
            worker_job.Settlement(worker_job.Verdict.LET_GO, "", "gone"),
            id="lock-lost",
        ),
        pytest.param(
            errors.RejectJob("AnalyticsRejected", "bad ref"),
            worker_job.Settlement(worker_job.Verdict.DEAD_LETTER, "AnalyticsRejected", "bad ref"),
            id="reject",
        ),
        pytest.param(
            errors.InvalidJobError("SchemaViolation", "no inputs"),
            worker_job.Settlement(worker_job.Verdict.DEAD_LETTER, "SchemaViolation", "no inputs"),
            id="invalid-job",
        ),
        pytest.param(
            errors.SecretNotFoundError("$API_TOKEN: 'x'"),
            worker_job.Settlement(worker_job.Verdict.DEAD_LETTER, "SecretNotFound", "$API_TOKEN: 'x'"),
            id="permanent-backend-named-by-type",
        ),
        pytest.param(
            errors.StagingCancelled("draining"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "draining"),
            id="retry",
        ),
        pytest.param(
            errors.TransientStorageError("503"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "503", cause=ENVIRONMENT),
            id="transient-backend-is-the-environment",
        ),
        pytest.param(
            errors.StorageError("disk full"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "disk full", cause=ENVIRONMENT),
            id="backend-is-the-environment",
        ),
        pytest.param(
            runner.AnalyticsKilled("killed by signal 9", signum=9),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "killed by signal 9", cause=ENVIRONMENT),
            id="killed-by-a-signal-is-the-environment",
        ),
        pytest.param(
            runner.LaunchFailed("EAGAIN"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "EAGAIN", cause=ENVIRONMENT),
            id="machine-refused-launch-is-the-environment",
        ),
        pytest.param(
            runner.CommandUnusable("ENOENT"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "ENOENT", cause=worker_job.Cause.WORKER),
            id="unlaunchable-command-is-the-worker",
        ),
        pytest.param(
            runner.AnalyticsFailed("exited with 1"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "AnalyticsFailed", "exited with 1"),
            id="analytics-failure-is-the-job-dead-lettered-on-its-last-delivery",
        ),
        pytest.param(
            KeyError("k"),
            worker_job.Settlement(worker_job.Verdict.ABANDON, "WorkerError", "KeyError('k')", unexpected=True),
            id="bug",
        ),
    ],
)
def test_settlement_follows_the_error_type(exc: Exception, expected: worker_job.Settlement) -> None:
    assert worker_job.settlement_for(exc) == expected
