"""Live reaction benchmark: enqueue → scale request on the embedded default, with default settings.

Each trial starts the real ``scalebus controller run`` (default ``[controller]`` settings: a 2 s poll, the local
pool) against an empty, scaled-to-zero pool, waits a random offset (so the job lands at a random phase of the
poll), enqueues one job through the real producer, and measures how long until the scale request: the instance
row the controller's capacity write inserts in the pool database (its ``created_at``, on the same clock as the
enqueue). The worker's command is trivial; once its job is done the worker retires and deletes itself, the pool
is empty again, and the controller is stopped (SIGTERM).

A fresh controller per trial keeps the trials independent: a long-running controller would learn the arrival
rate and keep a worker waiting for the next job (so there would be no scale request to measure), and trials
closer than ARM's write budget (4 a minute) would measure the budget, not the reaction.

Writes the ``## Live reaction (embedded default)`` section of bench/README.md (other sections are left as they
are) and prints it. Reproduce with ``make bench-reaction`` (``.venv/bin/python bench/reaction.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _readme  # noqa: E402  (bench/ is on sys.path when a benchmark runs as a script)

from scalebus import jobs  # noqa: E402  (after the path set-up, as a script)
from scalebus.backends.local import sqlite_queue  # noqa: E402
from scalebus.settings import ControllerSettings  # noqa: E402

HEADING = "## Live reaction (embedded default)"
TARGET_P95_S = 10.0
POLL_S = 0.005
"""How often the bench looks for the instance row (the measured time comes from the row itself)."""


@dataclass(frozen=True, slots=True)
class Trial:
    offset_s: float
    """Wait between the controller's first round and the enqueue."""
    reaction_s: float
    """Enqueue → the instance row (the scale request)."""
    settled_s: float
    """Enqueue → job done and the pool empty again."""


class Rig:
    """Paths and config of one benchmark run; every trial reuses them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue_db = root / "queue.db"
        self.pool_db = root / "pool.db"
        self.config = root / "scalebus.toml"
        (root / "lake" / "in").mkdir(parents=True)
        (root / "lake" / "in" / "reads.txt").write_text("ACGT\n")
        # [controller] is left out on purpose: its defaults are what is measured.
        self.config.write_text(
            f"""
[queue]
url = "sqlite:///{self.queue_db}?queue=jobs"
[scale_set]
state_path = "{self.pool_db}"
[worker]
command = {json.dumps([sys.executable, "-c", "pass"])}
work_dir = "{root / "work"}"
idle_timeout_s = 0.5
retire_wait_s = 0
receive_wait_s = 0.5
heartbeat_interval_s = 0.5
[staging]
min_free_bytes = 0
[log]
format = "json"
"""
        )
        self.queue = sqlite_queue.SqliteJobQueue(
            self.queue_db, queue="jobs", lock_duration_s=30.0, max_delivery_count=5
        )

    def instances(self) -> list[float]:
        """``created_at`` of the pool's instance rows (none before the controller first opens the pool)."""
        if not self.pool_db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.pool_db}?mode=ro", uri=True, timeout=5.0)
        try:
            return [row[0] for row in conn.execute("SELECT created_at FROM instances")]
        except sqlite3.OperationalError:  # the schema is being created
            return []
        finally:
            conn.close()

    def job(self, n: int) -> jobs.Job:
        return jobs.validate(
            {
                "job_id": f"reaction-{n}",
                "inputs": [(self.root / "lake" / "in").as_uri() + "/"],
                "output": (self.root / "lake" / "out" / f"reaction-{n}").as_uri() + "/",
            }
        )

    def drained(self) -> bool:
        depth = self.queue.read_depth()
        return depth.active == 0 and not depth.in_flight and not self.instances()


def wait_for(what: str, check: Callable[[], object], timeout_s: float, interval_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def run_trial(rig: Rig, n: int, offset_s: float, log_path: Path) -> Trial:
    if not rig.drained():
        raise RuntimeError("the pool is not empty at the start of a trial")
    env = {**os.environ, "SCALEBUS_LOG__FORMAT": "json"}
    with log_path.open("ab") as log:
        controller = subprocess.Popen(
            [sys.executable, "-m", "scalebus", "controller", "run", "--config", str(rig.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=rig.root,
        )
    try:
        # the controller logs controller_started right before its first round
        wait_for("the controller to start", lambda: _logged(log_path, "controller_started", n), 30.0, 0.02)
        time.sleep(offset_s)
        enqueued_at = time.time()
        jobs.JobProducer(rig.queue).submit([rig.job(n)])
        wait_for("the scale request", rig.instances, 30.0)
        requested_at = min(rig.instances())
        wait_for("the job to finish and the pool to empty", rig.drained, 120.0, 0.1)
        settled_at = time.time()
    finally:
        controller.send_signal(signal.SIGTERM)
        try:
            controller.wait(timeout=30)
        except subprocess.TimeoutExpired:
            controller.kill()
            controller.wait()
    return Trial(offset_s, requested_at - enqueued_at, settled_at - enqueued_at)


def _logged(log_path: Path, event: str, count: int) -> bool:
    """True once ``event`` appears more than ``count`` times (one controller per trial shares the log)."""
    seen = 0
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            seen += json.loads(line).get("event") == event
        except (ValueError, AttributeError):
            continue
    return seen > count


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def render(trials: list[Trial], *, max_offset_s: float, seed: int, elapsed_s: float) -> str:
    reactions = [t.reaction_s for t in trials]
    p50, p95, worst = percentile(reactions, 0.5), percentile(reactions, 0.95), max(reactions)
    defaults = ControllerSettings()
    mark = "✅" if p95 <= TARGET_P95_S else "❌"
    rows = "\n".join(
        f"| {i} | {t.offset_s:.2f} | {t.reaction_s:.3f} | {t.settled_s:.1f} |" for i, t in enumerate(trials, 1)
    )
    return f"""{HEADING}

`make bench-reaction` (= `.venv/bin/python bench/reaction.py --trials {len(trials)} --seed {seed}`): the real
`scalebus controller run` with the default `[controller]` settings (poll every {defaults.poll_interval_s:g} s,
write budget {defaults.max_writes_per_minute}/min), the local pool and the SQLite queue, a worker command that does
nothing. Each of {len(trials)} trials starts a controller on an empty pool scaled to zero, waits a random
0–{max_offset_s:g} s (a random phase of the poll), enqueues one job and measures enqueue → the scale request (the
instance row the capacity write inserts in the pool database). The worker then runs the job, retires and deletes
itself, and the controller is stopped. A fresh controller per trial keeps trials independent (a running one would
learn the arrival rate and keep a worker waiting, so there would be nothing to measure). {elapsed_s:.0f} s in all
on {os.cpu_count()} cores, Python {platform.python_version()}.

| enqueue → scale request | p50 | p95 | max | target |
|---|---|---|---|---|
| seconds | {p50:.2f} | {p95:.2f} | {worst:.2f} | p95 ≤ {TARGET_P95_S:g} s {mark} |

The reaction is bounded by the poll interval: a job waits for the next round (0–{defaults.poll_interval_s:g} s),
then the round reads the depth, decides and writes the capacity in milliseconds. On Azure the same round adds the
depth source's delay (`admin`: real time, cached `depth_cache_s`; `monitor`: minutes) and the ARM write; the VM's
boot comes after the request and is not part of this number.

<details><summary>Every trial (seconds)</summary>

| trial | offset | reaction | enqueue → done, pool empty |
|---|---|---|---|
{rows}

</details>
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--max-offset-s", type=float, default=4.0, help="random wait before each enqueue")
    parser.add_argument("--no-readme", action="store_true", help="print the section, do not write it")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, databases)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="scalebus-reaction-"))
    rig = Rig(workdir)
    trials: list[Trial] = []
    try:
        for n in range(args.trials):
            trial = run_trial(rig, n, rng.uniform(0.0, args.max_offset_s), workdir / "controller.log")
            trials.append(trial)
            print(
                f"trial {n + 1}/{args.trials}: offset {trial.offset_s:.2f} s, reaction {trial.reaction_s:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        rig.queue.close()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    section = render(
        trials, max_offset_s=args.max_offset_s, seed=args.seed, elapsed_s=time.perf_counter() - started
    )
    if not args.no_readme:
        _readme.write_section(HEADING, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
