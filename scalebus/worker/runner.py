"""Run the analytics for one job as a subprocess: an argv list (never a shell), bounded in time, cancellable.

The job's params reach the program as ``SCALEBUS_PARAM_<NAME>`` variables, with ``SCALEBUS_INPUT_DIR``,
``SCALEBUS_OUTPUT_DIR`` and ``SCALEBUS_JOB_ID``. Its stdout and stderr go to files in the output folder, so they
are published with the outputs. Exit codes: 0 is success; ``EXIT_REJECT`` (3) means "this job can never
succeed" (dead-letter it); anything else is a failure worth another attempt (abandon).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_REJECT = 3
_POLL_S = 0.2
_KILL_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int | None
    """``None`` when the program was stopped (timeout or cancellation)."""
    seconds: float
    timed_out: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def resolve_argv(command: Sequence[str]) -> list[str]:
    """``python`` as the first word means the interpreter running scalebus (the venv's, on a worker VM)."""
    argv = list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def job_env(*, job_id: str, input_dir: Path, output_dir: Path, params: Mapping[str, str]) -> dict[str, str]:
    env = {
        "SCALEBUS_JOB_ID": job_id,
        "SCALEBUS_INPUT_DIR": str(input_dir),
        "SCALEBUS_OUTPUT_DIR": str(output_dir),
    }
    env.update({f"SCALEBUS_PARAM_{name.upper()}": value for name, value in params.items()})
    return env


def run(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    output_dir: Path,
    timeout_s: float,
    cancel: threading.Event,
) -> RunResult:
    """Run to completion, timeout, or until ``cancel`` is set (lock lost, drain deadline)."""
    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "stdout.txt").open("wb") as out, (output_dir / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(
            resolve_argv(command),
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            return _wait(proc, started=started, timeout_s=timeout_s, cancel=cancel)
        finally:
            if proc.poll() is None:
                _stop(proc)


def _wait(
    proc: subprocess.Popen[bytes], *, started: float, timeout_s: float, cancel: threading.Event
) -> RunResult:
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(timeout=_POLL_S)
            return RunResult(code, time.monotonic() - started)
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            _stop(proc)
            return RunResult(None, elapsed, timed_out=True)
        if cancel.is_set():
            _stop(proc)
            return RunResult(None, elapsed, cancelled=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the program's process group, SIGKILL it if it lingers."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, *, max_bytes: int = 2000) -> str:
    """The end of a log file, for an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - max_bytes))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""
