"""A chaos run on the embedded default: real controller, workers and analytics, and the faults a fleet meets.

One run submits N jobs, then, while they are worked through: SIGKILLs workers at random moments, takes the lake
away for a few seconds, freezes a worker (SIGSTOP) right after its analytics ended (so, publishing) until its lock
has expired and thaws it, and kills a controller in the middle of starting a worker (the pool's spawn-pause fault
hook holds it there), then starts another. When the queue and the pool are empty it checks what a user would
need: every job committed once and consistently, nothing dead-lettered, no job dirs, temp files or analytics
left behind.

The outage must work as root (CI runs as root, where ``chmod 000`` stops nothing): the lake folder is renamed away
and a plain file put in its place, so every read fails with ``ENOTDIR`` (storage unavailable). A folder simply
missing would read as "not found", which is the job's own fault (a wrong input), not an outage.

``python -m tests.e2e._chaos --jobs 400 --kills 50`` runs a long version and prints its figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ANALYTICS = """
import os, pathlib, random, time
job = os.environ["SCALEBUS_JOB_ID"]
root = pathlib.Path(os.environ["E2E_ROOT"])
token = os.urandom(8).hex()
with open(root / "runs.log", "a") as log:
    log.write(f"{job} {token}\\n")
time.sleep(random.uniform(0.1, 0.6))
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
src = pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"])
total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
for name in ("a.txt", "b.txt"):
    (out / name).write_text(f"{token} {total}")
"""

SPAWN_PAUSE_ENV = "SCALEBUS_FAULT_SPAWN_PAUSE_S"  # the pool's fault hook (scalebus.backends.local.pool)
LOCK_S = 5.0
BOOTED_S = 3.0
"""Workers younger than this are not killed (see :meth:`Chaos.kill_a_worker`)."""
INPUT_BYTES = 2000


@dataclass
class Figures:
    """What a run did and what it found."""

    jobs: int
    committed: int = 0
    analytics_runs: int = 0
    worker_kills: int = 0
    outage_s: float = 0.0
    frozen_publishers: int = 0
    controllers_killed_mid_spawn: int = 0
    controller_starts: int = 0
    dead_lettered: int = 0
    max_delivery_count: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


class Chaos:
    """One system folder and the faults injected into it."""

    def __init__(
        self, root: Path, *, jobs: int, kills: int, outage_s: float, seed: int, max_instances: int
    ) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.job_ids = [f"job{i:04d}" for i in range(jobs)]
        self.kills = kills
        self.outage_s = outage_s
        self.figures = Figures(jobs=jobs)
        self.config = root / "scalebus.toml"
        self.env = {**os.environ, "E2E_ROOT": str(root), "SCALEBUS_LOG__FORMAT": "json"}
        self.env.pop(SPAWN_PAUSE_ENV, None)
        self._controller: subprocess.Popen[bytes] | None = None
        self.killed_pids: list[int] = []
        self.frozen_pids: list[int] = []
        self._logs = open(root / "controller.log", "ab")  # noqa: SIM115  (closed in close())
        self._write_system(max_instances)

    # ------------------------------------------------------------------ set-up

    def _write_system(self, max_instances: int) -> None:
        root = self.root
        (root / "analytics.py").write_text(ANALYTICS)
        self.config.write_text(f"""
[queue]
url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = {LOCK_S}
max_delivery_count = 5
[scale_set]
state_path = "{root}/pool.db"
[controller]
max_instances = {max_instances}
poll_interval_s = 0.5
heartbeat_timeout_s = 10
boot_timeout_s = 30
exit_when_drained = true
[worker]
command = ["{sys.executable}", "{root}/analytics.py"]
pass_env = ["E2E_ROOT"]
work_dir = "{root}/work"
idle_timeout_s = 3
retire_wait_s = 1
receive_wait_s = 0.5
heartbeat_interval_s = 0.5
env_backoff_max_s = 2
[staging]
min_free_bytes = 0
[storage]
local_roots = ["{root}"]
""")
        lines = []
        for job_id in self.job_ids:
            folder = root / "lake" / job_id
            folder.mkdir(parents=True)
            (folder / "reads.fq").write_bytes(os.urandom(INPUT_BYTES))
            job = {"job_id": job_id, "inputs": [folder.as_uri() + "/"], "output": (root / "out" / job_id).as_uri()}
            lines.append(json.dumps(job | {"output": job["output"] + "/"}))
        (root / "jobs.jsonl").write_text("\n".join(lines))
        submitted = self._cli("submit", "-f", str(root / "jobs.jsonl"))
        if submitted.returncode != 0:
            raise RuntimeError(f"submit failed: {submitted.stderr[-2000:]}")

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scalebus", *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def start_controller(self, *, spawn_pause_s: float = 0.0) -> None:
        env = dict(self.env)
        if spawn_pause_s:
            env[SPAWN_PAUSE_ENV] = str(spawn_pause_s)
        self._controller = subprocess.Popen(
            [sys.executable, "-m", "scalebus", "controller", "run", "--config", str(self.config), "-o", "json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._logs,
        )
        self.figures.controller_starts += 1

    # ------------------------------------------------------------------ what is going on

    def _query(self, db: str, sql: str) -> int:
        path = self.root / db
        if not path.exists():
            return 0
        with sqlite3.connect(path, timeout=30) as conn:
            try:
                return int(conn.execute(sql).fetchone()[0])
            except sqlite3.OperationalError:  # the table is not there yet
                return 0

    def waiting(self) -> int:
        return self._query("queue.db", "SELECT COUNT(*) FROM messages WHERE dead = 0")

    def instances(self) -> int:
        return self._query("pool.db", "SELECT COUNT(*) FROM instances")

    def committed(self) -> int:
        return sum(1 for j in self.job_ids if (self.root / "out" / j / "_SUCCESS").exists())

    def workers(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "worker" in cmdline and "run" in cmdline and str(self.config) in cmdline:
                found.append(proc)
        return found

    def analytics(self) -> list[psutil.Process]:
        script = str(self.root / "analytics.py")
        return [p for p in psutil.process_iter(["cmdline"]) if script in (p.info["cmdline"] or [])]

    # ------------------------------------------------------------------ faults

    def kill_a_worker(self) -> None:
        """SIGKILL a worker that has been up for a while: killing workers before their first heartbeat looks to
        the controller like an image that cannot boot, and it backs off starting new ones (as it should)."""
        workers = [w for w in self.workers() if time.time() - w.create_time() > BOOTED_S]
        if workers:
            victim = self.rng.choice(workers)
            try:
                victim.send_signal(signal.SIGKILL)
                self.figures.worker_kills += 1
                self.killed_pids.append(victim.pid)
            except psutil.Error:
                pass

    def kill_controller_mid_spawn(self, *, timeout_s: float = 30.0) -> None:
        """Start a controller whose spawns pause, SIGKILL it while a row has no worker yet, start a normal one."""
        self.start_controller(spawn_pause_s=5.0)
        deadline = time.monotonic() + timeout_s
        while self._query("pool.db", "SELECT COUNT(*) FROM instances WHERE pid IS NULL") == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the controller never started spawning")
            time.sleep(0.05)
        assert self._controller is not None
        self._controller.kill()
        self._controller.wait()
        self.figures.controllers_killed_mid_spawn += 1
        self.start_controller()

    def outage(self) -> None:
        """The lake unreadable for ``outage_s``: renamed away, a plain file in its place."""
        lake, away = self.root / "lake", self.root / "lake.away"
        lake.rename(away)
        lake.write_text("the lake is unavailable")
        time.sleep(self.outage_s)
        lake.unlink()
        away.rename(lake)
        self.figures.outage_s = self.outage_s

    def freeze_a_publisher(self, *, timeout_s: float = 20.0) -> None:
        """SIGSTOP a worker right after its analytics ended (it is publishing) until its lock expired."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker in self.workers():
                try:
                    running = [c for c in worker.children(recursive=True) if c in self.analytics()]
                except psutil.Error:
                    continue
                if running and self._stop_when_gone(worker, running[0]):
                    self.frozen_pids.append(worker.pid)
                    time.sleep(LOCK_S + 2.0)
                    with contextlib.suppress(psutil.Error):
                        worker.send_signal(signal.SIGCONT)
                    self.figures.frozen_publishers += 1
                    return
            time.sleep(0.05)

    def _stop_when_gone(self, worker: psutil.Process, child: psutil.Process) -> bool:
        try:
            child.wait(timeout=5)
            worker.send_signal(signal.SIGSTOP)
            return True
        except (psutil.Error, psutil.TimeoutExpired):
            return False

    # ------------------------------------------------------------------ the run

    def run(self, *, deadline_s: float) -> Figures:
        started = time.monotonic()
        jobs = len(self.job_ids)
        kill_at = sorted(int(jobs * self.rng.uniform(0.05, 0.6)) for _ in range(self.kills))
        self.kill_controller_mid_spawn()
        faults = [
            (int(jobs * 0.25), threading.Thread(target=self.outage, name="outage")),
            (int(jobs * 0.4), threading.Thread(target=self.freeze_a_publisher, name="freeze")),
        ]
        try:
            while True:
                if time.monotonic() - started > deadline_s:
                    self.figures.problems.append(f"not drained within {deadline_s} s")
                    break
                done = self.committed()
                if kill_at and done >= kill_at[0]:  # one a round at most: kills land at separate moments
                    kill_at.pop(0)
                    self.kill_a_worker()
                for at, thread in faults:
                    if done >= at and thread.ident is None:
                        thread.start()
                if self._drained() and not any(t.is_alive() for _, t in faults):
                    break
                time.sleep(0.1)
        finally:
            for _, thread in faults:
                if thread.ident is not None:
                    thread.join()
            self._stop()
        self.figures.wall_s = round(time.monotonic() - started, 1)
        self._check()
        return self.figures

    def _drained(self) -> bool:
        assert self._controller is not None
        if self._controller.poll() is None:
            return False
        if self.waiting() == 0 and self.instances() == 0 and not self.workers():
            return True
        self.start_controller()  # it exited with work left (all of it waiting out a release delay)
        return False

    def _stop(self) -> None:
        if self._controller is not None and self._controller.poll() is None:
            self._controller.kill()
            self._controller.wait()
        for worker in self.workers():
            with contextlib.suppress(psutil.Error):
                worker.send_signal(signal.SIGCONT)

    # ------------------------------------------------------------------ the verdict

    def _check(self) -> None:
        figures, problems = self.figures, self.figures.problems
        runs = [line.split() for line in (self.root / "runs.log").read_text().splitlines()]
        figures.analytics_runs = len(runs)
        figures.committed = self.committed()
        figures.dead_lettered = self._query("queue.db", "SELECT COUNT(*) FROM messages WHERE dead = 1")
        tokens = {(job, token) for job, token in runs}
        for job_id in self.job_ids:
            problems.extend(self._check_output(job_id, tokens))
        if figures.committed != len(self.job_ids):
            problems.append(f"lost: {len(self.job_ids) - figures.committed} jobs have no commit marker")
        if figures.dead_lettered:
            problems.append(f"dead-lettered: {figures.dead_lettered}")
        left = [p.name for p in (self.root / "work").iterdir()] if (self.root / "work").exists() else []
        if left:
            problems.append(
                f"job dirs left in the work dir: {left[:5]} (killed {self.killed_pids}, "
                f"states {[_state(pid) for pid in self.killed_pids]}, frozen {self.frozen_pids})"
            )
        if self.analytics():
            problems.append(f"orphan analytics: {[p.pid for p in self.analytics()]}")
        if self.waiting() or self.instances():
            problems.append(f"not drained: {self.waiting()} messages, {self.instances()} instances")

    def _check_output(self, job_id: str, tokens: set[tuple[str, str]]) -> list[str]:
        out = self.root / "out" / job_id
        if not (out / "_SUCCESS").exists():
            return []
        problems = []
        seen = {(out / name).read_text() for name in ("a.txt", "b.txt") if (out / name).exists()}
        if len(seen) != 1:
            problems.append(f"{job_id}: outputs of {len(seen)} executions mixed (committed twice?)")
        elif (token := next(iter(seen)).split()[0]) and (job_id, token) not in tokens:
            problems.append(f"{job_id}: output from an execution never recorded")
        elif next(iter(seen)).split()[1] != str(INPUT_BYTES):
            problems.append(f"{job_id}: wrong output")
        strays = [p.name for p in out.rglob("*") if p.name.endswith(".part") or p.name.startswith(".scalebus")]
        if strays:
            problems.append(f"{job_id}: temp files in the output: {strays}")
        report = out / "_scalebus_job.json"
        if report.exists():
            count = int(json.loads(report.read_text()).get("delivery_count", 0))
            self.figures.max_delivery_count = max(self.figures.max_delivery_count, count)
        return problems

    def close(self) -> None:
        self._stop()
        self._logs.close()


def _state(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{proc.status()} ppid {proc.ppid()}"
    except psutil.Error:
        return "gone"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--max-instances", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=1800.0)
    parser.add_argument("--root", type=Path, required=True, help="an empty folder for the run")
    args = parser.parse_args()
    args.root = args.root.absolute()
    args.root.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(
        args.root,
        jobs=args.jobs,
        kills=args.kills,
        outage_s=args.outage_s,
        seed=args.seed,
        max_instances=args.max_instances,
    )
    try:
        figures = chaos.run(deadline_s=args.deadline_s)
    finally:
        chaos.close()
    print(json.dumps(asdict(figures), indent=2))
    sys.exit(1 if figures.problems else 0)


if __name__ == "__main__":
    main()
