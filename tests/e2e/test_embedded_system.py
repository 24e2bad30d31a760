"""The whole system as real processes on the embedded default: controller, worker pool, self-destroy.

Each test writes a config, submits jobs through the real CLI, runs ``scalebus controller run`` (which starts
``scalebus worker run`` processes) and checks what a user would: outputs, the queue, the pool. The analytics
program appends a line to ``runs.log`` per execution, so "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ANALYTICS = """
import os, pathlib, sys, time
job = os.environ["SCALEBUS_JOB_ID"]
root = pathlib.Path(os.environ["E2E_ROOT"])
with open(root / "runs.log", "a") as log:
    log.write(job + "\\n")
if job.startswith("slow"):
    (root / f"{job}.started").touch()
    time.sleep(4)
src = pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"])
total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
(pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"]) / "size.txt").write_text(str(total))
"""


class System:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "scalebus.toml"
        (root / "analytics.py").write_text(ANALYTICS)
        self.config.write_text(f"""
[queue]
url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = 5
max_delivery_count = 3
[scale_set]
state_path = "{root}/pool.db"
[controller]
max_instances = 3
poll_interval_s = 0.5
heartbeat_timeout_s = 10
exit_when_drained = true
[worker]
command = ["{sys.executable}", "{root}/analytics.py"]
work_dir = "{root}/work"
idle_timeout_s = 2
retire_wait_s = 1
receive_wait_s = 0.5
heartbeat_interval_s = 0.5
[staging]
min_free_bytes = 0
""")
        self.env = {**os.environ, "E2E_ROOT": str(root), "SCALEBUS_LOG__FORMAT": "json"}

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scalebus", *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def start_controller(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "scalebus", "controller", "run", "--config", str(self.config), "-o", "json"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def write_inputs(self, job_ids: list[str]) -> Path:
        lines = []
        for job_id in job_ids:
            folder = self.root / "lake" / job_id
            folder.mkdir(parents=True)
            (folder / "reads.fq").write_bytes(os.urandom(1000 + len(job_id)))
            lines.append(
                json.dumps(
                    {
                        "job_id": job_id,
                        "inputs": [folder.as_uri() + "/"],
                        "output": (self.root / "out" / job_id).as_uri() + "/",
                    }
                )
            )
        path = self.root / "jobs.jsonl"
        path.write_text("\n".join(lines))
        return path

    def runs(self) -> list[str]:
        log = self.root / "runs.log"
        return log.read_text().split() if log.exists() else []

    def status(self) -> dict[str, object]:
        result = self.cli("status", "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def system(tmp_path: Path) -> System:
    return System(tmp_path)


def _finish(controller: subprocess.Popen[str], timeout_s: float = 90) -> tuple[str, str]:
    try:
        out, err = controller.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        controller.kill()
        out, err = controller.communicate()
        pytest.fail(f"controller did not drain in {timeout_s} s:\n{err[-3000:]}")
    assert controller.returncode == 0, err[-3000:]
    return out, err


def test_jobs_run_exactly_once_poison_is_dead_lettered_and_pool_empties(system: System) -> None:
    job_ids = [f"job{i}" for i in range(6)]
    submitted = system.cli("submit", "-f", str(system.write_inputs(job_ids)))
    assert submitted.returncode == 0, submitted.stderr
    _send_poison(system.root / "queue.db")

    out, err = _finish(system.start_controller())

    assert sorted(system.runs()) == sorted(job_ids), "each job's analytics ran exactly once"
    for job_id in job_ids:
        out_dir = system.root / "out" / job_id
        marker = json.loads((out_dir / "_SUCCESS").read_text())
        assert marker, "commit marker lists the outputs"
        assert int((out_dir / "size.txt").read_text()) == 1000 + len(job_id)
        assert not [p for p in out_dir.rglob("*") if p.name.endswith(".part")]
    status = system.status()
    depth = status["depth"]
    assert (depth["active"], depth["in_flight"], depth["dead_lettered"]) == (0, 0, 1)  # type: ignore[index]
    assert status["dead_letters"][0]["message_id"] == "poison"  # type: ignore[index]
    assert status["dead_letters"][0]["reason"] == "SchemaViolation"  # type: ignore[index]
    assert status["instances"] == []
    assert json.loads(out)["peak_instances"] >= 2
    events = _events(err)
    assert "scale_decision" in events and "controller_drained" in events


def _events(stderr: str) -> list[str]:
    """Event names from JSON log lines. Workers share the controller's stderr, so a long line from one process
    can be split by another's; those are skipped."""
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue
    return events


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
        _finish(controller)
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
