"""A rollout's retire list in the fleet hint, as the worker acts on it: take no more work, finish the job held."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus.backends import base
from scalebus.backends.local import pool, sqlite_queue
from tests.unit.test_worker import OK_PROGRAM, Lake, make_worker, submit

SLOW_PROGRAM = "import time\ntime.sleep(1.5)\n" + OK_PROGRAM


@pytest.fixture
def queue(tmp_path: Path) -> sqlite_queue.SqliteJobQueue:
    return sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.mark.parametrize(
    ("retire", "taken"),
    [
        pytest.param(("test-1",), False, id="named-retires-at-once"),
        pytest.param(("local-9",), True, id="others-named-works-on"),
        pytest.param((), True, id="empty-list-works-on"),
    ],
)
def test_an_idle_worker_named_for_retirement_takes_no_job(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path, retire: tuple[str, ...], taken: bool
) -> None:
    """The hint's age does not matter for the list (``at`` is the epoch here): a rollout is no forecast."""
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    beats.publish_hint(base.FleetHint(idle_grace_s=0.0, at=0.0, retire_instance_ids=retire))
    submit(queue, lake.job("j1"))
    worker = make_worker(queue, tmp_path, OK_PROGRAM, heartbeats=beats, idle_timeout_s=0.5, retire_wait_s=0)

    with capture_logs() as logs:
        stats = worker.run()

    assert stats.completed == (1 if taken else 0)
    assert queue.read_depth().active == (0 if taken else 1)
    assert "worker_idle_retiring" in [e["event"] for e in logs]
    assert beats.read_all()[0].state is base.WorkerState.DRAINING, "reported retired for the controller"


def test_a_busy_worker_named_for_retirement_finishes_its_job_and_takes_no_other(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    submit(queue, lake.job("j1"), lake.job("j2"))
    worker = make_worker(queue, tmp_path, SLOW_PROGRAM, heartbeats=beats, idle_timeout_s=30.0, retire_wait_s=0)

    def rollout() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(hb.state is base.WorkerState.BUSY for hb in beats.read_all()):
                beats.publish_hint(
                    base.FleetHint(idle_grace_s=30.0, at=time.time(), retire_instance_ids=("test-1",))
                )
                return
            time.sleep(0.02)

    threading.Thread(target=rollout, daemon=True).start()
    started = time.monotonic()
    stats = worker.run()

    assert stats.completed == 1, "the job held was finished"
    assert (lake.out("j1") / "_SUCCESS").exists() or (lake.out("j2") / "_SUCCESS").exists()
    assert queue.read_depth().active == 1, "the other job stays queued for a new-model worker"
    assert time.monotonic() - started < 20, "retired without waiting for the idle timeout"


def test_the_controllers_hint_keeps_the_list_a_rollout_stored(tmp_path: Path) -> None:
    """The controller rewrites the idle grace without knowing the list: ``None`` keeps it, ``()`` clears it."""
    beats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
    beats.publish_hint(base.FleetHint(idle_grace_s=5.0, at=1.0, retire_instance_ids=("local-1", "local-2")))
    beats.publish_hint(base.FleetHint(idle_grace_s=9.0, at=2.0))
    hint = beats.read_hint()
    assert hint == base.FleetHint(idle_grace_s=9.0, at=2.0, retire_instance_ids=("local-1", "local-2"))
    beats.publish_hint(base.FleetHint(idle_grace_s=9.0, at=3.0, retire_instance_ids=()))
    cleared = beats.read_hint()
    assert cleared is not None and cleared.retire_instance_ids == ()


def test_the_heartbeat_threads_log_lines_carry_the_ids_bound_where_it_started() -> None:
    import structlog
    import structlog.contextvars
    import structlog.testing

    from scalebus import errors
    from scalebus.worker import liveness

    class Failing:
        def beat(self, heartbeat: object) -> None:
            raise errors.TransientBackendError("down")

        def read_hint(self) -> None:
            return None

    reporter = liveness.HeartbeatReporter(Failing(), instance_id="vm-1", interval_s=0.01)  # type: ignore[arg-type]
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        with structlog.contextvars.bound_contextvars(pool="long", instance_id="vm-1"):
            reporter.start()
        try:
            deadline = time.monotonic() + 5
            while not any(e["event"] == "heartbeat_failed" for e in events) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            reporter.stop()
    failed = [e for e in events if e["event"] == "heartbeat_failed"]
    assert failed and all(e.get("pool") == "long" and e.get("instance_id") == "vm-1" for e in failed)
