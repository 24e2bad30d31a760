"""The whole system as real processes on the embedded default: controller, worker pool, self-destroy.

Each test writes a config, submits jobs through the real CLI, runs ``scalebus controller run`` (which starts
``scalebus worker run`` processes) and checks what a user would: outputs, the queue, the pool. The analytics
program appends a line to ``runs.log`` per execution, so "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e._system import System, assert_outputs_exactly_once, events, finish

pytestmark = pytest.mark.slow

SQLITE_QUEUE = """url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = 5
max_delivery_count = 3"""


@pytest.fixture
def system(tmp_path: Path) -> System:
    return System(tmp_path, queue_table=SQLITE_QUEUE.format(root=tmp_path))


def test_jobs_run_exactly_once_poison_is_dead_lettered_and_pool_empties(system: System) -> None:
    job_ids = [f"job{i}" for i in range(6)]
    submitted = system.cli("submit", "-f", str(system.write_inputs(job_ids)))
    assert submitted.returncode == 0, submitted.stderr
    _send_poison(system.root / "queue.db")

    out, err = finish(system.start_controller())

    assert_outputs_exactly_once(system, job_ids)
    status = system.status()
    depth = status["depth"]
    assert (depth["active"], depth["in_flight"], depth["dead_lettered"]) == (0, 0, 1)  # type: ignore[index]
    assert status["dead_letters"][0]["message_id"] == "poison"  # type: ignore[index]
    assert status["dead_letters"][0]["reason"] == "SchemaViolation"  # type: ignore[index]
    assert status["instances"] == []
    assert json.loads(out)["peak_instances"] >= 2
    logged = events(err)
    assert "scale_decision" in logged and "controller_drained" in logged


def _send_poison(db: Path) -> None:
    from scalebus.backends import base
    from scalebus.backends.local import sqlite_queue

    queue = sqlite_queue.SqliteJobQueue(db, queue="jobs", lock_duration_s=5, max_delivery_count=3)
    queue.send([base.OutgoingMessage("poison", b'{"job_id": "poison", "inputs": "not-a-list"}')])
    queue.close()


def test_worker_killed_mid_job_leads_to_redelivery_and_completion(system: System) -> None:
    submitted = system.cli("submit", "-f", str(system.write_inputs(["slow1", "fast1"])))
    assert submitted.returncode == 0, submitted.stderr
    controller = system.start_controller()
    try:
        victim = _worker_running(system.root, "slow1")
        for child in victim.children(recursive=True):
            child.kill()
        victim.send_signal(signal.SIGKILL)
        finish(controller)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate()

    assert system.runs().count("slow1") == 2, "the killed attempt and the redelivered one"
    report = json.loads((system.root / "out" / "slow1" / "_scalebus_job.json").read_text())
    assert report["delivery_count"] == 2
    assert (system.root / "out" / "fast1" / "_SUCCESS").exists()
    assert system.status()["instances"] == []


def _worker_running(root: Path, job_id: str, timeout_s: float = 30) -> psutil.Process:
    """The worker process whose analytics started ``job_id`` (found through the pool's heartbeats)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (root / f"{job_id}.started").exists():
            conn = sqlite3.connect(root / "pool.db")
            row = conn.execute(
                "SELECT i.pid FROM heartbeats h JOIN instances i USING (instance_id) WHERE h.job_id = ?", (job_id,)
            ).fetchone()
            conn.close()
            if row:
                return psutil.Process(row[0])
        time.sleep(0.1)
    pytest.fail(f"no worker picked up {job_id}")
