"""What the end-to-end tests share: a system folder (config, analytics, CLI) and the checks on its outcome.

The analytics program appends a line to ``runs.log`` per execution, so "exactly once" is counted, not assumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    """A config, an analytics program and the CLI, in one folder. ``queue_table`` is the body of ``[queue]``."""

    def __init__(self, root: Path, *, queue_table: str, environ: dict[str, str] | None = None) -> None:
        self.root = root
        self.config = root / "scalebus.toml"
        (root / "analytics.py").write_text(ANALYTICS)
        self.config.write_text(f"""
[queue]
{queue_table}
[scale_set]
state_path = "{root}/pool.db"
[controller]
max_instances = 3
poll_interval_s = 0.5
heartbeat_timeout_s = 10
exit_when_drained = true
[worker]
command = ["{sys.executable}", "{root}/analytics.py"]
pass_env = ["E2E_ROOT"]
work_dir = "{root}/work"
idle_timeout_s = 2
retire_wait_s = 1
receive_wait_s = 0.5
heartbeat_interval_s = 0.5
[staging]
min_free_bytes = 0
[storage]
local_roots = ["{root}"]
""")
        self.env = {**os.environ, **(environ or {}), "E2E_ROOT": str(root), "SCALEBUS_LOG__FORMAT": "json"}

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
        """The only pool's ``status -o json`` record, with the fleet's ``leader`` and ``read_at``."""
        result = self.cli("status", "-o", "json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        (pool,) = data["pools"]
        return {**pool, "leader": data["leader"], "read_at": data["read_at"]}


def finish(controller: subprocess.Popen[str], timeout_s: float = 90) -> tuple[str, str]:
    try:
        out, err = controller.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        controller.kill()
        out, err = controller.communicate()
        pytest.fail(f"controller did not drain in {timeout_s} s:\n{err[-3000:]}")
    assert controller.returncode == 0, err[-3000:]
    return out, err


def events(stderr: str) -> list[str]:
    """Event names from JSON log lines. Workers share the controller's stderr, so a long line from one process
    can be split by another's; those are skipped."""
    events = []
    for line in stderr.splitlines():
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue
    return events


def assert_outputs_exactly_once(system: System, job_ids: list[str]) -> None:
    assert sorted(system.runs()) == sorted(job_ids), "each job's analytics ran exactly once"
    for job_id in job_ids:
        out_dir = system.root / "out" / job_id
        marker = json.loads((out_dir / "_SUCCESS").read_text())
        assert marker, "commit marker lists the outputs"
        assert int((out_dir / "size.txt").read_text()) == 1000 + len(job_id)
        assert not [p for p in out_dir.rglob("*") if p.name.endswith(".part")]
