"""Crash-only recovery: what dead deliveries leave on the scratch disk is swept when a worker starts, and an
analytics never outlives the worker that launched it. Real processes, real ``flock`` and ``/proc``."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebus.backends.local import sqlite_queue
from scalebus.worker import recovery, runner
from tests.unit.test_worker import OK_PROGRAM, make_worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, prctl and flock semantics")


def gone(pid: int, *, within_s: float = 5.0) -> bool:
    """Whether ``pid`` ended (a zombie nobody has reaped yet counts as ended)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def sleeper(started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    started.append(proc)
    return proc


def stale_dir(work: Path, name: str, *, orphan: int | None = None, start_time: int | None = None) -> Path:
    root = work / name
    (root / "input").mkdir(parents=True)
    (root / "input" / "big.bin").write_bytes(b"x" * 1000)
    (root / recovery.OWNER_FILE).touch()
    if orphan is not None:
        recorded = start_time if start_time is not None else runner.process_start_time(orphan)
        (root / runner.PID_FILE).write_text(f"{orphan} {recorded}\n")
    return root


def test_a_starting_worker_sweeps_dead_deliveries_and_kills_their_analytics(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    work = tmp_path / "work"
    orphan = sleeper(sleepers)
    reused = sleeper(sleepers)  # its pid file says another start time: the number was reused
    dead = dead_pid()
    swept = stale_dir(work, f"j1.1.{dead}", orphan=orphan.pid)
    decoy = stale_dir(work, f"j2.3.{dead}", orphan=reused.pid, start_time=1)
    owner = _owning_process(work / "j3.1.0")  # a live delivery of another worker on this disk
    live = work / f"j3.1.{owner.pid}"
    foreign = work / "not-ours"
    foreign.mkdir()
    try:
        queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="q", lock_duration_s=5, max_delivery_count=1)
        make_worker(queue, tmp_path, OK_PROGRAM, idle_timeout_s=0.2).run()
        queue.close()
        assert not swept.exists() and not decoy.exists()
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert reused.poll() is None, "a process that reused the pid is left alone"
        assert live.exists() and foreign.exists()
    finally:
        owner.kill()
        owner.wait()
        assert owner.stdout is not None
        owner.stdout.close()


def _owning_process(template: Path) -> subprocess.Popen[str]:
    """Another worker's live delivery: a process that creates its folder, holds the owner lock and sleeps."""
    script = textwrap.dedent(
        f"""
        import fcntl, os, pathlib, sys, time
        root = pathlib.Path({str(template.parent)!r}) / f"j3.1.{{os.getpid()}}"
        root.mkdir(parents=True)
        fd = os.open(root / {recovery.OWNER_FILE!r}, os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_job_dir_names_its_owner_and_is_locked_while_held(tmp_path: Path) -> None:
    dirs = recovery.JobDir.claim(str(tmp_path), "j1", 2)
    assert dirs.root.name == f"j1.2.{os.getpid()}" and dirs.input.is_dir()
    fd = os.open(dirs.root / recovery.OWNER_FILE, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    dirs.release()
    assert not dirs.root.exists()


def test_the_analytics_dies_with_a_killed_worker(tmp_path: Path) -> None:
    pid_file = tmp_path / "analytics.pid"
    worker = textwrap.dedent(
        f"""
        import pathlib, sys, threading
        from scalebus.worker import runner
        here = pathlib.Path({str(tmp_path)!r})
        program = ("import os, pathlib, time; "
                   "pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)")
        runner.run([sys.executable, "-c", program], cwd=here, env={{}}, output_dir=here / "out", timeout_s=60,
                   cancel=threading.Event(), pid_file=here / "pid")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", worker])
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        analytics = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert gone(analytics), "the death signal killed the analytics with its worker"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_what_the_analytics_left_running_is_killed_when_it_exits(tmp_path: Path) -> None:
    straggler_file = tmp_path / "straggler.pid"
    result = runner.run(
        ["sh", "-c", f"sleep 60 & echo $! > {straggler_file}; echo bye >&2; exit 0"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        output_dir=tmp_path / "out",
        timeout_s=30,
        cancel=threading.Event(),
        pid_file=tmp_path / runner.PID_FILE,
    )
    assert result.ok and result.stderr_tail == "bye"
    assert gone(int(straggler_file.read_text()))
    recorded_pid, _, started = (tmp_path / runner.PID_FILE).read_text().partition(" ")
    assert int(recorded_pid) > 0 and int(started) > 0


def test_a_cancelled_analytics_is_stopped_with_its_group(tmp_path: Path) -> None:
    straggler_file = tmp_path / "straggler.pid"
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    result = runner.run(
        ["sh", "-c", f"sleep 60 & echo $! > {straggler_file}; wait"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        output_dir=tmp_path / "out",
        timeout_s=30,
        cancel=cancel,
        pid_file=tmp_path / runner.PID_FILE,
    )
    assert result.cancelled and result.exit_code is None
    assert gone(int(straggler_file.read_text()))
