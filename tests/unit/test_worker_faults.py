"""What a worker does when something other than a good job arrives: a body that breaks the parser, a lock lost at
the last moment, its own command gone, a launch the job makes impossible, a killed or disk-filling analytics, an
environment that fails every job. Real embedded backends and real subprocesses; fakes only at our own seams
(a queue or store subclass that fails one call, the intake, the scratch-disk reading).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from scalebus import errors, jobs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.worker import backoff, loop, runner
from scalebus.worker import job as worker_job
from tests.unit.test_worker import OK_PROGRAM, Lake, _steal_lock_once_locked, submit


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    yield q
    q.close()


def worker_for(
    queue: base.JobQueue,
    tmp_path: Path,
    *,
    program: str = OK_PROGRAM,
    command: list[str] | None = None,
    store: base.ObjectStore | None = None,
    rules: worker_job.JobRules | None = None,
    staging: StagingSettings | None = None,
    on_idle: Callable[[], None] | None = None,
    **overrides: object,
) -> loop.Worker:
    script = tmp_path / "analytics.py"
    script.write_text(program)
    defaults: dict[str, object] = {"idle_timeout_s": 1.0, "receive_wait_s": 0.3, "heartbeat_interval_s": 0.2}
    settings = WorkerSettings(
        command=command or [sys.executable, str(script)], work_dir=str(tmp_path / "work"), **(defaults | overrides)
    )
    used = store or folder.FolderStore()
    return loop.Worker(
        loop.WorkerPorts(queue=queue, resolve=lambda _uri: used),
        instance_id="test-faults",
        settings=settings,
        staging_settings=staging or StagingSettings(min_free_bytes=0),
        on_idle=on_idle,
        rules=rules,
    )


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --------------------------------------------------------------------------------------------- intake


def test_whatever_the_intake_raises_is_a_dead_letter_and_the_worker_goes_on(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_parse = jobs.parse

    def parse(body: bytes, *, limits: jobs.Limits = jobs.DEFAULT_LIMITS) -> jobs.Job:
        if body == b"recurse":
            raise RecursionError("maximum recursion depth exceeded")
        if body == b"decode":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_parse(body, limits=limits)

    monkeypatch.setattr(jobs, "parse", parse)  # the intake is our seam: this is what a parser bug looks like
    queue.send(
        [
            base.OutgoingMessage("m-recurse", b"recurse"),
            base.OutgoingMessage("m-decode", b"decode"),
            base.OutgoingMessage("m-deep", b"[" * 200_000),
            base.OutgoingMessage("m-bytes", b"\xff\xfe{}"),
        ]
    )
    submit(queue, lake.job("good"))
    stats = worker_for(queue, tmp_path).run()
    dead = {d.message_id: (d.reason, d.description) for d in queue.peek_dead_letters(max_count=10)}
    assert dead["m-recurse"] == ("MalformedBody", "the body could not be read (RecursionError)")
    assert dead["m-decode"] == ("MalformedBody", "the body could not be read (UnicodeDecodeError)")
    assert dead["m-deep"][0] == "TooDeep" and dead["m-bytes"][0] == "NotUtf8"
    assert stats.completed == 1 and stats.dead_lettered == 4


# --------------------------------------------------------------------------------------------- settling


class StealingStore(folder.FolderStore):
    """Plays another receiver taking the lock right after this delivery wrote its commit marker."""

    def __init__(self, db: Path) -> None:
        super().__init__()
        self._db = db

    def write_bytes(self, data: bytes, uri: str) -> None:
        super().write_bytes(data, uri)
        if uri.endswith("/_SUCCESS"):
            _steal_lock_once_locked(self._db)


def test_lock_lost_after_publishing_lets_go_and_the_worker_goes_on(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    submit(queue, lake.job("j1"), lake.job("j2"))
    stats = worker_for(queue, tmp_path, store=StealingStore(tmp_path / "q.db")).run()
    assert stats.lock_lost >= 1
    assert (lake.out("j1") / "_SUCCESS").exists() and (lake.out("j2") / "_SUCCESS").exists()


class FlakyQueue(sqlite_queue.SqliteJobQueue):
    """Fails ``keep_locked`` once with ``error``: a bug, or a failure of the settle path itself."""

    error: BaseException = RuntimeError("renewer could not start")
    failed = False

    def keep_locked(
        self, message: base.ReceivedMessage, *, on_lost: Callable[[BaseException], None]
    ) -> base.LockKeeper:
        if not self.failed:
            self.failed = True
            raise self.error
        return super().keep_locked(message, on_lost=on_lost)


def test_an_unexpected_failure_handling_a_message_is_logged_abandoned_and_survived(
    lake: Lake, tmp_path: Path
) -> None:
    queue = FlakyQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=3)
    submit(queue, lake.job("j1"))
    with capture_logs() as logs:
        stats = worker_for(queue, tmp_path).run()
    queue.close()
    (failed,) = events(logs, "job_handling_failed")
    assert "renewer could not start" in str(failed["error"]) and failed["exc_info"] is True
    assert (stats.handling_failed, stats.abandoned, stats.completed) == (1, 1, 1)


def test_keyboard_interrupt_still_ends_the_worker(lake: Lake, tmp_path: Path) -> None:
    queue = FlakyQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=3)
    queue.error = KeyboardInterrupt()
    submit(queue, lake.job("j1"))
    with pytest.raises(KeyboardInterrupt):
        worker_for(queue, tmp_path).run()
    queue.close()


# --------------------------------------------------------------------------------------------- environment


def test_analytics_gets_only_the_allow_listed_environment(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "c2VjcmV0LWFjY291bnQta2V5LTEyMzQ1Njc4OTA="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", f"DefaultEndpointsProtocol=https;AccountKey={key}")
    monkeypatch.setenv("SOME_WORKER_SETTING", "not-for-the-analytics")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LANG", "C.UTF-8")
    submit(queue, lake.job("j1", params={"greeting": "hi"}))
    worker = worker_for(queue, tmp_path, command=["printenv"], pass_env=["OMP_NUM_THREADS", "UNSET_VARIABLE"])
    assert worker.run().completed == 1
    printed = (lake.out("j1") / "stdout.txt").read_text()
    env = dict(line.split("=", 1) for line in printed.splitlines())
    assert set(env) == {
        "PATH",
        "HOME",
        "LANG",
        "OMP_NUM_THREADS",
        "SCALEBUS_JOB_ID",
        "SCALEBUS_INPUT_DIR",
        "SCALEBUS_OUTPUT_DIR",
        "SCALEBUS_PARAM_GREETING",
    }
    assert env["OMP_NUM_THREADS"] == "3" and env["PATH"] == os.environ["PATH"]
    assert env["HOME"] == str(Path(env["SCALEBUS_INPUT_DIR"]).parent), "HOME is the job's scratch folder"
    assert key not in printed


# --------------------------------------------------------------------------------------------- launch


def _not_executable(tmp_path: Path) -> list[str]:
    path = tmp_path / "tool.sh"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    return [str(path)]


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        pytest.param(lambda _t: ["/nonexistent/bin/analytics"], "does not exist", id="missing-path"),
        pytest.param(lambda _t: ["no-such-analytics-tool"], "is not found on PATH", id="not-on-path"),
        pytest.param(_not_executable, "is not an executable file", id="not-executable"),
    ],
)
def test_a_worker_whose_command_cannot_launch_takes_no_job(
    queue: sqlite_queue.SqliteJobQueue,
    lake: Lake,
    tmp_path: Path,
    command: Callable[[Path], list[str]],
    problem: str,
) -> None:
    submit(queue, lake.job("j1"))
    with pytest.raises(errors.ConfigError, match=problem) as raised:
        worker_for(queue, tmp_path, command=command(tmp_path)).run()
    assert raised.value.key == "worker.command"
    untouched = queue.receive(max_wait_s=0.5)
    assert untouched is not None and untouched.delivery_count == 1


def test_worker_run_with_a_missing_command_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {
        "SCALEBUS_QUEUE__URL": f"sqlite:///{tmp_path}/q.db?queue=jobs",
        "SCALEBUS_SCALE_SET__STATE_PATH": f"{tmp_path}/pool.db",
        "SCALEBUS_WORKER__COMMAND": '["/nonexistent/bin/analytics"]',
        "SCALEBUS_WORKER__SELF_DESTROY": "false",
        "SCALEBUS_WORKER__WORK_DIR": str(tmp_path / "work"),
        "SCALEBUS_LOG__FORMAT": "json",
    }
    ran = subprocess.run(
        [sys.executable, "-m", "scalebus", "worker", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )
    assert ran.returncode == 2, ran.stderr
    assert "worker.command" in ran.stderr and "Traceback" not in ran.stderr


def test_a_job_too_large_to_launch_is_dead_lettered_with_the_reason(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    """Limits raised past what Linux can launch (one variable over MAX_ARG_STRLEN): the job's own fault."""
    limits = jobs.Limits(max_body_bytes=1_000_000, max_param_value_bytes=400_000, max_params_bytes=500_000)
    raw = lake.job("big").model_dump(by_alias=True, exclude_none=True) | {"params": {"blob": "x" * 200_000}}
    job = jobs.validate(raw, limits=limits)
    queue.send([base.OutgoingMessage("big", job.to_json())])
    stats = worker_for(queue, tmp_path, rules=worker_job.JobRules(limits=limits)).run()
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert dead.reason == "LaunchRefused" and "SCALEBUS_PARAM_BLOB" in dead.description
    assert str(jobs.MAX_ARG_STRLEN) in dead.description
    assert stats.abandoned == 0


def test_a_nul_byte_in_the_environment_refuses_the_launch(tmp_path: Path) -> None:
    with pytest.raises(errors.RejectJob, match="null byte") as raised:
        runner.run(
            ["true"],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "SCALEBUS_PARAM_X": "a\0b"},
            output_dir=tmp_path / "out",
            timeout_s=10,
            cancel=threading.Event(),
            pid_file=tmp_path / "pid",
        )
    assert raised.value.reason == "LaunchRefused"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(OSError(errno.E2BIG, "Argument list too long"), errors.RejectJob, id="e2big-is-the-job"),
        pytest.param(ValueError("embedded null byte"), errors.RejectJob, id="nul-is-the-job"),
        pytest.param(FileNotFoundError(errno.ENOENT, "No such file"), runner.CommandUnusable, id="enoent-worker"),
        pytest.param(PermissionError(errno.EACCES, "Denied"), runner.CommandUnusable, id="eacces-worker"),
        pytest.param(OSError(errno.EAGAIN, "Resource unavailable"), runner.LaunchFailed, id="eagain-machine"),
    ],
)
def test_launch_failures_are_classified_by_whose_fault(error: OSError | ValueError, expected: type) -> None:
    assert type(runner.launch_failure(error, "/opt/tool")) is expected


class RemovingStore(folder.FolderStore):
    """Removes the analytics' binary once the first job has started (a broken upgrade, a wiped disk)."""

    def __init__(self, binary: Path) -> None:
        super().__init__()
        self._binary = binary

    def exists(self, uri: str) -> bool:
        self._binary.unlink(missing_ok=True)
        return super().exists(uri)


def test_a_worker_whose_command_vanishes_gives_the_job_back_and_retires(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    binary = tmp_path / "tool.sh"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    submit(queue, lake.job("j1"), lake.job("j2"), lake.job("j3"))
    retired: list[str] = []
    worker = worker_for(
        queue,
        tmp_path,
        command=[str(binary)],
        store=RemovingStore(binary),
        on_idle=lambda: retired.append("self-destroy"),
        idle_timeout_s=30.0,
        retire_wait_s=0,
    )
    with capture_logs() as logs:
        stats = worker.run()
    assert (stats.abandoned, stats.completed, stats.dead_lettered) == (1, 0, 0)
    assert retired == ["self-destroy"]
    (cannot,) = events(logs, "worker_cannot_run_analytics")
    assert "worker.command" in str(cannot["error"])
    counts = sorted(m.delivery_count for m in iter(lambda: queue.receive(max_wait_s=0.2), None))
    assert counts == [1, 1, 2], "two jobs never taken, one given back once"


# --------------------------------------------------------------------------------------------- reasons


def test_an_analytics_killed_by_a_signal_is_an_environment_failure_named_by_its_signal(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    submit(queue, lake.job("j1"))
    program = "import os, signal, sys; print('allocating', file=sys.stderr, flush=True); os.kill(os.getpid(), 9)"
    with capture_logs() as logs:
        worker_for(queue, tmp_path, program=program, env_backoff_max_s=0.1).run()
    abandoned = events(logs, "job_abandoned")
    assert abandoned and all(e["cause"] == "environment" for e in abandoned)
    assert "analytics killed by signal 9 (SIGKILL)" in str(abandoned[0]["why"])
    assert "allocating" in str(abandoned[0]["why"])


def test_stderr_and_a_full_disk_survive_into_the_last_deliverys_dead_letter(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The analytics fills the scratch disk: its stderr.txt is gone, the reason is still whole."""
    monkeypatch.setattr(runner, "scratch_usage", lambda _path: (4096, 10**9))
    program = """
import os, pathlib, sys
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
print("write failed: No space left on device", file=sys.stderr, flush=True)
(out / "stderr.txt").unlink()
sys.exit(1)
"""
    submit(queue, lake.job("j1"))
    worker_for(queue, tmp_path, program=program, rules=worker_job.JobRules(max_deliveries=2)).run()
    (dead,) = queue.peek_dead_letters(max_count=10)
    assert dead.reason == "AnalyticsFailed"
    assert "the scratch disk is full: 4,096 of 1,000,000,000 bytes free" in dead.description
    assert "No space left on device" in dead.description


def test_a_preflight_disk_refusal_is_released_and_logged_with_the_bytes(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    submit(queue, lake.job("j1"))
    staging = StagingSettings(min_free_bytes=10**18)
    with capture_logs() as logs:
        worker_for(queue, tmp_path, staging=staging, env_backoff_max_s=0.1).run()
    released = events(logs, "job_released")
    assert released, "a full scratch disk is the machine's fault: the job is given back, not failed"
    assert "not enough disk space" in str(released[0]["why"]) and "bytes are free" in str(released[0]["why"])


# --------------------------------------------------------------------------------------------- back-off


def test_backoff_doubles_to_its_cap_and_resets_on_any_other_outcome() -> None:
    policy = backoff.Backoff(cap_s=5.0)
    assert [policy.after(environment=True) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.after(environment=False) == 0.0
    assert policy.after(environment=True) == 1.0
    assert backoff.Backoff(cap_s=0.0).after(environment=True) == 0.0


class DownStore(folder.FolderStore):
    """The lake unreachable: every call fails as a transient storage error."""

    def exists(self, uri: str) -> bool:
        raise errors.TransientStorageError(f"{uri}: connection reset")


def test_an_outage_releases_the_message_with_a_capped_delay_and_spends_no_delivery(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    submit(queue, lake.job("j1"))
    with capture_logs() as logs:
        stats = worker_for(queue, tmp_path, store=DownStore(), env_backoff_max_s=0.2).run()
    delays = [e["delay_s"] for e in events(logs, "job_released")]
    assert delays and all(0 < d <= 0.2 for d in delays) and stats.released == len(delays)
    assert not events(logs, "job_dead_lettered"), "an environment failure is never dead-lettered by the worker"
    for dead in queue.peek_dead_letters(max_count=10):
        assert dead.reason == "MaxDeliveryCountExceeded"


def test_a_drain_is_not_held_up_by_an_outage(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    submit(queue, lake.job("j1"))
    worker = worker_for(queue, tmp_path, store=DownStore(), env_backoff_max_s=60.0)
    threading.Timer(1.0, worker.request_stop).start()
    started = time.monotonic()
    stats = worker.run()
    assert time.monotonic() - started < 10 and stats.released >= 1


# --------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("settlement", "delivery", "lost", "expected"),
    [
        pytest.param(
            worker_job.Settlement(worker_job.Verdict.ABANDON, "AnalyticsFailed", "exit 1"),
            2,
            None,
            worker_job.Settlement(worker_job.Verdict.DEAD_LETTER, "AnalyticsFailed", "exit 1"),
            id="job-failure-on-last-delivery-dead-letters-with-its-cause",
        ),
        pytest.param(
            worker_job.Settlement(worker_job.Verdict.ABANDON, "AnalyticsFailed", "exit 1"),
            1,
            None,
            worker_job.Settlement(worker_job.Verdict.ABANDON, "AnalyticsFailed", "exit 1"),
            id="job-failure-before-last-delivery-abandons",
        ),
        pytest.param(
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "503", cause=worker_job.Cause.ENVIRONMENT),
            2,
            None,
            worker_job.Settlement(worker_job.Verdict.ABANDON, "", "503", cause=worker_job.Cause.ENVIRONMENT),
            id="environment-failure-never-dead-lettered-here",
        ),
        pytest.param(
            worker_job.COMPLETED,
            1,
            errors.LockLostError("gone"),
            worker_job.Settlement(worker_job.Verdict.LET_GO, description="job lock lost: gone"),
            id="lock-lost-before-complete-lets-go",
        ),
    ],
)
def test_final_settlement(
    settlement: worker_job.Settlement, delivery: int, lost: BaseException | None, expected: worker_job.Settlement
) -> None:
    got = worker_job.final_settlement(settlement, delivery_count=delivery, max_deliveries=2, lock_lost=lost)
    assert got == expected
