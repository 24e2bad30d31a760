"""Run the analytics for one job as a subprocess: an argv list (never a shell), bounded in time, cancellable.

**What it sees.** The job's params reach the program as ``SCALEBUS_PARAM_<NAME>`` variables, with
``SCALEBUS_INPUT_DIR``, ``SCALEBUS_OUTPUT_DIR`` and ``SCALEBUS_JOB_ID``. Its environment is an allow-list
(:func:`analytics_env`): those variables, ``worker.secret_env``, the names in ``worker.pass_env``, and ``PATH``,
``HOME`` (the job's scratch folder, so tools that cache credentials under ``~`` find none of the worker's) and
``LANG``. Nothing else of the worker's environment — a storage connection string, a cloud credential — reaches
it. Its stdout goes to ``stdout.txt`` in the output folder; its stderr goes to ``stderr.txt`` through a pipe the
worker reads, which also keeps the last :data:`STDERR_TAIL_BYTES` in memory: a scratch disk the analytics filled
cannot take away the reason it failed.

**What it may not outlive.** The program runs in its own session (its own process group), so one signal reaches
everything it started. On every exit path the worker kills that group: after a normal exit (stragglers it left),
on timeout or cancellation (SIGTERM, then SIGKILL), and when the worker itself dies: on Linux the program is
started with ``PR_SET_PDEATHSIG`` = SIGKILL, so the kernel kills it when the thread that launched it ends (the
worker launches from its main thread, so that is when the worker process ends). Grandchildren are not covered by
the death signal; the pid file (:data:`PID_FILE`, pid and start time) lets the next worker on this disk kill the
whole orphaned group (:mod:`scalebus.worker.recovery`).

**Why a launch fails.** A job too large to launch (``E2BIG``: see :func:`scalebus.jobs.launch_size_problem`) or
with bytes no environment can carry (NUL) is the job's fault: ``RejectJob``. A program that is missing or not
executable is the worker's (:class:`CommandUnusable`); :func:`check_command` finds that before any job is taken.

Exit codes: 0 is success; ``EXIT_REJECT`` (3) means "this job can never succeed" (dead-letter it); anything else
is a failure worth another attempt (abandon). A program killed by a signal the worker did not send is reported
with the signal's number and name.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from scalebus import errors, jobs

EXIT_REJECT = 3
STDERR_TAIL_BYTES = 64 * 1024
"""How much of the analytics' stderr the worker keeps in memory for the failure reason."""
PID_FILE = ".analytics.pid"
"""In the job's scratch folder (not its outputs): ``<pid> <start time>`` of the running analytics."""
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The analytics' ``PATH`` when the worker has none."""
FULL_DISK_BYTES = 1024 * 1024
"""Below this much free space the scratch disk counts as full when a run failed."""
_POLL_S = 0.05
_KILL_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_OWN_FAULT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP})


class CommandUnusable(errors.RetryJob):
    """``worker.command`` cannot be launched for the worker's own reasons (missing, not executable): no job's
    fault, and no job this worker takes will run."""


class LaunchFailed(errors.RetryJob):
    """The launch failed for a reason of the machine (no memory, too many processes): not the job's fault."""


class AnalyticsFailed(errors.RetryJob):
    """The analytics exited non-zero (not 3): another attempt may succeed."""


class AnalyticsTimedOut(errors.RetryJob):
    """The analytics ran past the job's timeout and was stopped."""


class AnalyticsKilled(errors.RetryJob):
    """The analytics was killed by a signal the worker did not send (the OOM killer, an operator)."""

    def __init__(self, message: str, *, signum: int) -> None:
        self.signum = signum
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int | None
    """``None`` when the worker stopped the program (timeout or cancellation); negative: killed by a signal."""
    seconds: float
    timed_out: bool = False
    cancelled: bool = False
    stderr_tail: str = ""
    """The end of its stderr (up to :data:`STDERR_TAIL_BYTES`), decoded leniently."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def signal(self) -> int | None:
        """The signal that killed it, when the worker did not stop it itself."""
        return -self.exit_code if self.exit_code is not None and self.exit_code < 0 else None


def resolve_argv(command: Sequence[str]) -> list[str]:
    """``python`` as the first word means the interpreter running scalebus (the venv's, on a worker VM); a
    relative path is taken from the worker's folder (the analytics itself runs in the job's)."""
    argv = list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif argv and "/" in argv[0]:
        argv[0] = os.path.abspath(argv[0])
    return argv


def check_command(command: Sequence[str], *, path: str) -> str:
    """The program ``command`` would launch, or ``ConfigError`` naming why it cannot (``path``: the analytics'
    ``PATH``)."""
    argv = resolve_argv(command)
    if not argv or not argv[0]:
        raise errors.ConfigError("worker.command", "is empty", "set it to the analytics' argv list")
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=path)
    if program is None:
        raise errors.ConfigError(
            "worker.command", f"{argv[0]!r} is not found on PATH ({path})", "install it or give its absolute path"
        )
    if not os.path.exists(program):
        raise errors.ConfigError("worker.command", f"{program} does not exist", "install it or fix the path")
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        raise errors.ConfigError(
            "worker.command", f"{program} is not an executable file", "install it, or chmod +x it"
        )
    return program


def job_env(*, job_id: str, input_dir: Path, output_dir: Path, params: Mapping[str, str]) -> dict[str, str]:
    env = {
        "SCALEBUS_JOB_ID": job_id,
        "SCALEBUS_INPUT_DIR": str(input_dir),
        "SCALEBUS_OUTPUT_DIR": str(output_dir),
    }
    env.update({jobs.param_env_name(name): value for name, value in params.items()})
    return env


def analytics_env(
    job_vars: Mapping[str, str],
    *,
    secret_env: Mapping[str, str],
    pass_env: Sequence[str],
    environ: Mapping[str, str],
    home: Path,
) -> dict[str, str]:
    """The analytics' whole environment: the allow-list, nothing else of ``environ`` (the worker's)."""
    env = {"PATH": environ.get("PATH") or MINIMAL_PATH, "HOME": str(home)}
    env["LANG"] = environ.get("LANG") or "C.UTF-8"
    env.update({name: environ[name] for name in pass_env if name in environ})
    return env | dict(job_vars) | dict(secret_env)


def analytics_path(pass_env: Sequence[str], environ: Mapping[str, str]) -> str:
    """The ``PATH`` the analytics gets (what :func:`check_command` searches)."""
    return analytics_env({}, secret_env={}, pass_env=pass_env, environ=environ, home=Path("/"))["PATH"]


def run(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    output_dir: Path,
    timeout_s: float,
    cancel: threading.Event,
    pid_file: Path,
) -> RunResult:
    """Run to completion, timeout, or until ``cancel`` is set (lock lost, drain deadline). ``env`` is the whole
    environment. Raises ``RejectJob``, :class:`CommandUnusable` or :class:`LaunchFailed` when it cannot start."""
    started = time.monotonic()
    argv = resolve_argv(command)
    problem = jobs.launch_size_problem(argv, env, arg_max=_arg_max())
    if problem is not None:
        raise errors.RejectJob("LaunchRefused", f"the analytics cannot be launched for this job: {problem}")
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "stdout.txt").open("wb") as out:
        proc = _launch(argv, cwd=cwd, env=env, stdout=out)
        assert proc.stderr is not None
        pump = _StderrPump(proc.stderr, output_dir / "stderr.txt")
        try:
            write_pid_file(pid_file, proc.pid)
            result = _wait(proc, started=started, timeout_s=timeout_s, cancel=cancel)
        finally:
            _end_group(proc)  # every exit path: nothing it started outlives the job
            tail = pump.finish()
    return RunResult(result.exit_code, result.seconds, result.timed_out, result.cancelled, tail)


def launch_failure(exc: OSError | ValueError, program: str) -> errors.JobError:
    """Whose fault a failed launch is, as the error that settles the job."""
    if isinstance(exc, ValueError):  # an argument or variable holds a NUL byte
        return errors.RejectJob("LaunchRefused", f"the analytics cannot be launched for this job: {exc}")
    name = errno.errorcode.get(exc.errno or 0, "?")
    if exc.errno == errno.E2BIG:
        return errors.RejectJob(
            "LaunchRefused",
            "the analytics cannot be launched for this job: its arguments and environment are too large (E2BIG)",
        )
    if exc.errno in _OWN_FAULT_ERRNOS:
        return CommandUnusable(f"worker.command {program} cannot be launched: {exc.strerror} ({name})")
    return LaunchFailed(f"the analytics could not be started: {exc.strerror} ({name})")


def _launch(argv: list[str], *, cwd: Path, env: Mapping[str, str], stdout: BinaryIO) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # Only prctl and getppid run in the child, through a function resolved before the fork.
            preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509
        )
    except (OSError, ValueError) as exc:
        raise launch_failure(exc, argv[0]) from exc


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the launching thread ends (``None`` elsewhere).
    libc is looked up here, before the fork, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the worker died before the death signal was armed
            os._exit(137)

    return preexec


def _arg_max() -> int:
    try:
        return os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        return 2 * 1024 * 1024


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or ``None`` if it is gone
    or unreadable: with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def write_pid_file(path: Path, pid: int) -> None:
    with contextlib.suppress(OSError):  # best effort: a full disk only costs the orphan sweep its evidence
        path.write_text(f"{pid} {process_start_time(pid) or 0}\n")


def _wait(
    proc: subprocess.Popen[bytes], *, started: float, timeout_s: float, cancel: threading.Event
) -> RunResult:
    while True:
        if _has_exited(proc.pid):
            _kill_group(proc.pid)  # the exited leader is not reaped yet, so its pid still names its group
            return RunResult(proc.wait(), time.monotonic() - started)
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            return RunResult(None, elapsed, timed_out=True)
        if cancel.wait(_POLL_S):
            return RunResult(None, elapsed, cancelled=True)


def _has_exited(pid: int, timeout_s: float = 0.0) -> bool:
    """Whether child ``pid`` has exited, without reaping it (a zombie keeps its pid from being reused)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the program's group if it still runs, SIGKILL whatever lingers, then reap it."""
    if proc.returncode is None and not _has_exited(proc.pid):
        _signal_group(proc.pid, signal.SIGTERM)
        _has_exited(proc.pid, _KILL_GRACE_S)
    if proc.returncode is None:
        _kill_group(proc.pid)
        proc.wait()


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _StderrPump:
    """Copies the analytics' stderr to a file while keeping its tail in memory; a failing file write (a full
    disk) stops the copy, never the reading."""

    def __init__(self, pipe: IO[bytes], path: Path) -> None:
        self._pipe = pipe
        self._path = path
        self._tail = bytearray()
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._pump,), name="analytics-stderr", daemon=True
        )
        self._thread.start()

    def finish(self) -> str:
        """Wait for the end of the stream (the group is dead by now) and return the tail. A process that left
        the group still holds the pipe: the reader then keeps draining (and closes it) on its own."""
        self._thread.join(timeout=_KILL_GRACE_S)
        return bytes(self._tail).decode(errors="replace").strip()

    def _pump(self) -> None:
        sink: BinaryIO | None
        try:
            sink = self._path.open("wb")
        except OSError:
            sink = None
        try:
            while chunk := os.read(self._pipe.fileno(), 65536):
                self._tail += chunk
                del self._tail[:-STDERR_TAIL_BYTES]
                sink = _write_or_drop(sink, chunk)
        except OSError:
            pass  # the read end failed: nothing more to keep
        finally:
            self._pipe.close()
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()


def _write_or_drop(sink: BinaryIO | None, chunk: bytes) -> BinaryIO | None:
    if sink is None:
        return None
    try:
        sink.write(chunk)
        return sink
    except OSError:
        with contextlib.suppress(OSError):
            sink.close()
        return None


def scratch_usage(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the disk holding ``path``; (-1, -1) if it cannot be read."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return -1, -1
    return usage.free, usage.total


def disk_note(path: Path) -> str:
    """`` (the scratch disk is full: …)`` when the disk holding ``path`` is (nearly) full, else ``""``."""
    free, total = scratch_usage(path)
    if 0 <= free < FULL_DISK_BYTES:
        return f" (the scratch disk is full: {free:,} of {total:,} bytes free)"
    return ""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def tail(path: Path, *, max_bytes: int = 2000) -> str:
    """The end of a log file, for an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - max_bytes))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""
