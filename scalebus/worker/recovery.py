"""Crash-only recovery of the scratch disk: each delivery's folder says who owns it, and a starting worker sweeps
what dead deliveries left behind.

A delivery's folder under ``worker.work_dir`` is named ``<job id>.<delivery count>.<worker pid>`` and holds
:data:`OWNER_FILE`, locked with ``flock`` for as long as the job runs. The lock is the proof of life: the kernel
drops it when the worker dies, however it dies (SIGKILL, OOM, power), so nothing needs to be cleaned up first.
Several workers may share one work dir (the local pool runs them on one machine).

:func:`sweep` runs when a worker starts. A folder is stale when nobody holds its lock and the pid in its name is
this process's own (a previous run with the same pid, as in a restarted container) or no longer runs. The pid
check covers the instant between creating a folder and locking it; a folder whose pid was reused by an unrelated
process waits for a later sweep. Before a stale folder is removed, the analytics it recorded (its
:data:`~scalebus.worker.runner.PID_FILE`: pid and start time) is killed with its whole process group: the analytics
outlives a SIGKILLed worker only through children the death signal does not reach, and they keep writing. A
pid whose start time differs is a new process that reused the number, and is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.worker import runner

log = structlog.get_logger(__name__)

OWNER_FILE = ".owner"
_NAME = re.compile(r"^.+\.\d+\.(?P<pid>\d+)$")


@dataclass(slots=True)
class JobDir:
    """One delivery's scratch folder, owned (locked) by this process until :meth:`release`."""

    root: Path
    _owner_fd: int | None = None

    @classmethod
    def claim(cls, work_dir: str, job_id: str, delivery_count: int) -> JobDir:
        # absolute: the analytics runs with cwd = root, so relative SCALEBUS_*_DIR paths would point nowhere
        root = Path(work_dir).absolute() / f"{job_id}.{delivery_count}.{os.getpid()}"
        try:
            shutil.rmtree(root, ignore_errors=True)  # our pid, so a previous process's: it is dead
            root.mkdir(parents=True)
            fd = os.open(root / OWNER_FILE, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            (root / "input").mkdir()
        except OSError as exc:
            raise errors.StorageError(f"{root}: cannot create the job's scratch folder ({exc.strerror})") from exc
        return cls(root, fd)

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def pid_file(self) -> Path:
        return self.root / runner.PID_FILE

    def release(self) -> None:
        """Remove the folder, then drop the lock (a sweep never sees it unlocked with content)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None


@dataclass(frozen=True, slots=True)
class Swept:
    folders: int = 0
    killed: int = 0


def sweep(work_dir: str) -> Swept:
    """Remove the folders of dead deliveries under ``work_dir`` and kill the analytics they left running."""
    root = Path(work_dir)
    folders = killed = 0
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return Swept()
    for path in entries:
        match = _NAME.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        with _unowned(path, int(match["pid"])) as stale:
            if not stale:
                continue
            killed += kill_orphan(path / runner.PID_FILE)
            shutil.rmtree(path, ignore_errors=True)
            folders += 1
    if folders:
        log.info("work_dir_swept", work_dir=str(root), folders=folders, analytics_killed=killed)
    return Swept(folders, killed)


@contextlib.contextmanager
def _unowned(path: Path, pid: int) -> Iterator[bool]:
    """Yields whether ``path`` is stale, holding its lock meanwhile so no one claims it while it is removed."""
    try:
        fd = os.open(path / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        fd = None
    except OSError:
        yield False
        return
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False  # a live delivery holds it
                return
        yield pid == os.getpid() or not _runs(pid)
    finally:
        if fd is not None:
            os.close(fd)


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return runner.process_start_time(pid) is not None


def kill_orphan(pid_file: Path) -> int:
    """Kill the process group a dead delivery's pid file names; 1 if a signal was sent, else 0."""
    try:
        pid_text, _, started_text = pid_file.read_text().partition(" ")
        pid, started = int(pid_text), int(started_text.strip() or 0)
    except (OSError, ValueError):
        return 0
    if pid <= 1:
        return 0
    now_started = runner.process_start_time(pid)
    if now_started is not None and now_started != started:
        log.info("orphan_pid_reused", pid=pid)  # the number names another process now
        return 0
    # The leader alive with its start time, or gone: a group with its pid as id can only be what it left,
    # since Linux does not hand out a pid still used as a process group id.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return 0
    log.warning("orphaned_analytics_killed", pid=pid)
    return 1
