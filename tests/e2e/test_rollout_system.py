"""Image rollout and a unit-style stop, as real processes on the embedded default.

The local pool's model is what its workers are started with (``SCALEBUS_MODEL`` in their environment, booked per
instance), so a rollout here is the same three writes as on Azure: the model, capacity ahead, the hint. Each
job's report names the instance that ran it, so "new jobs run on the new image" is counted, not assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e._system import System, assert_outputs_exactly_once, events, finish
from tests.e2e.test_embedded_system import SQLITE_QUEUE, _worker_running

pytestmark = pytest.mark.slow


@pytest.fixture
def system(tmp_path: Path) -> System:
    return System(tmp_path, queue_table=SQLITE_QUEUE.format(root=tmp_path))


def _models(system: System, job_ids: list[str]) -> dict[str, str]:
    """The model each job ran under: its report names the instance, the pool booked each instance's model."""
    conn = sqlite3.connect(system.root / "pool.db")
    booked = dict(conn.execute("SELECT instance_id, image FROM instance_models").fetchall())
    conn.close()
    reports = {j: json.loads((system.root / "out" / j / "_scalebus_job.json").read_text()) for j in job_ids}
    return {j: booked[report["instance_id"]] for j, report in reports.items()}


def _start_rollout(system: System, image: str) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    """Run ``scalebus rollout`` and return its JSON once printed. The command starts pool workers (the
    replacements), which inherit its output: so a file, not a pipe (a pipe would stay open until the last of
    them exits), and the process may linger a few seconds after printing while the pool waits for them."""
    argv = [
        sys.executable,
        "-m",
        "scalebus",
        "rollout",
        "--image",
        image,
        "-o",
        "json",
        "--config",
        str(system.config),
    ]
    with (system.root / "rollout.out").open("w") as out:
        proc = subprocess.Popen(argv, env=system.env, stdout=out, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError):
            printed: dict[str, object] = json.loads((system.root / "rollout.out").read_text())
            return proc, printed
        assert proc.poll() in (None, 0), "rollout failed"
        time.sleep(0.05)
    pytest.fail("rollout printed nothing")


def test_rollout_replaces_the_fleet_without_touching_a_busy_worker(system: System) -> None:
    old_jobs = ["slow-a", "slow-b"]
    assert system.cli("submit", "-f", str(system.write_inputs(old_jobs))).returncode == 0
    controller = system.start_controller()
    try:
        for job_id in old_jobs:
            _worker_running(system.root, job_id)

        rollout, rolled = _start_rollout(system, "node-v2")
        during = system.status()["instances"]
        new_jobs = ["fast-a", "fast-b", "fast-c"]
        inputs = system.write_inputs(new_jobs)
        assert system.cli("submit", "-f", str(inputs)).returncode == 0
        _, controller_err = finish(controller, timeout_s=120)
        assert rollout.wait(timeout=30) == 0
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate()

    assert (rolled["model_before"], rolled["image"]) == ("local", "node-v2")
    assert len(rolled["busy"]) == 2, "both old workers were busy with a slow job"
    assert rolled["capacity_to"] == min(3, rolled["capacity_from"] + len(rolled["retire"]))
    assert {i["model"] for i in during} == {"local", "node-v2"}, "status shows both models mid-rollout"  # type: ignore[index]
    assert_outputs_exactly_once(system, old_jobs + new_jobs)  # no busy worker lost its job
    models = _models(system, old_jobs + new_jobs)
    assert all(models[job] == "local" for job in old_jobs), "the old workers finished their jobs"
    assert all(models[job] == "node-v2" for job in new_jobs), "no old-model worker took another job"
    assert "worker_idle_retiring" in events(controller_err)
    assert system.status()["instances"] == []


def test_a_unit_style_stop_mid_job_drains_the_job_to_its_end(system: System) -> None:
    """systemd's KillMode=mixed: SIGTERM to the worker process only (not its group, so the analytics runs on);
    the worker takes no new work, lets the job finish and publish, then exits."""
    assert system.cli("submit", "-f", str(system.write_inputs(["slow-1"]))).returncode == 0
    controller = system.start_controller()
    try:
        worker = _worker_running(system.root, "slow-1")
        analytics = worker.children(recursive=True)
        assert analytics, "the job's analytics is running"
        os.kill(worker.pid, signal.SIGTERM)  # the process, not os.killpg
        time.sleep(0.5)
        assert worker.is_running() and all(p.is_running() for p in analytics), "the job goes on while draining"
        worker.wait(timeout=60)
        stopped_at = time.monotonic()
        _, err = finish(controller)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate()

    assert_outputs_exactly_once(system, ["slow-1"])  # finished and published by the stopped worker, once
    report = json.loads((system.root / "out" / "slow-1" / "_scalebus_job.json").read_text())
    assert report["delivery_count"] == 1, "drained, not abandoned and redelivered"
    assert "worker_draining" in events(err)
    assert time.monotonic() - stopped_at < 60
