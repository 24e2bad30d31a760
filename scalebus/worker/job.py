"""One message, start to settlement: validate → secrets → stage → run → publish → settle.

The job path is where a message's fate is decided, so its rules live here and nowhere else:

* **Nothing a body holds can stop the worker.** Every body goes through :func:`scalebus.jobs.parse`, the intake
  ``submit`` uses too; whatever it raises ends as a dead letter with a readable reason. Any other failure while
  one message is handled is logged with its traceback and the message abandoned; only ``KeyboardInterrupt`` and
  ``SystemExit`` end the worker.
* **Settlement follows the error's type** (:func:`settlement_for`, pure). An invalid job or ``RejectJob`` is
  dead-lettered with its reason, a permanent backend failure with the failure's name; ``RetryJob``, a transient
  backend failure or an unexpected error abandons the message (the queue dead-letters it after its max
  delivery count). On the last delivery a failure of the job's own is dead-lettered here with its real cause
  (the analytics' exit, the full disk, its stderr) rather than left to end as ``MaxDeliveryCountExceeded``.
* **Whose fault.** A failure of the environment — storage or the scratch disk unavailable, the analytics killed
  by a signal the worker did not send, a launch refused by the machine — is not the job's: the message is held
  for a growing delay (:mod:`scalebus.worker.backoff`) before it goes back, so an outage does not burn the
  queue. A ``worker.command`` that cannot be launched is the worker's own fault: the job goes back at once and,
  once the command is found broken (or fails three times running), the worker takes no more work.
* **A missing secret is permanent.** A secret of ``worker.secret_env`` that does not exist dead-letters the job
  with reason ``SecretNotFound`` naming the secret, before anything is staged: abandoning would redeliver at
  once and end in the dead-letter queue anyway, as ``MaxDeliveryCountExceeded``, the cause lost.
* **A lost lock ends the job here.** The analytics are stopped and nothing is published or settled: the job
  belongs to whoever holds it now. Found at the final check, after publishing, it is the same: the next
  delivery finds the committed outputs and completes the message.
* **Outputs are committed once, by their job.** A job whose own ``_SUCCESS`` marker already exists (an earlier
  delivery published, then crashed before completing) is just completed; a marker that names another job is an
  ``OutputConflict`` dead letter, never taken as this job's. Publishing is fenced by the lock: before every
  upload and the marker it checks that this delivery still holds the job (:mod:`scalebus.transfer.publish`).
* **A released job is given back.** When the instance is being evicted (:mod:`scalebus.worker.liveness`) the
  job stops at its next checkpoint and is abandoned, nothing published.

Other threads reach a running job only through :class:`Interrupts`; the job tells its caller when it starts and
ends through ``on_job``, and what the eviction policy needs through :meth:`JobRunner.running`.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import structlog

from scalebus import errors, jobs, logs
from scalebus.backends import base
from scalebus.observability import recorder
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import download, kit, publish, stage
from scalebus.worker import backoff, eviction, recovery, runner
from scalebus.worker.secrets import SecretEnv

log = structlog.get_logger(__name__)

JOB_REPORT = "_scalebus_job.json"
MAX_LAUNCH_FAILURES = 3
"""Consecutive launches failing for the worker's own reasons after which it takes no more work."""


@dataclass(slots=True)
class WorkerStats:
    """What this worker did with the messages it received, counted by settlement."""

    completed: int = 0
    dead_lettered: int = 0
    abandoned: int = 0
    released: int = 0
    """Given back with a delay for a failure of the environment (their delivery count not spent)."""
    lock_lost: int = 0
    bytes_staged: int = 0
    staging_seconds: float = 0.0
    handling_failed: int = 0
    """Messages whose handling itself failed (a bug, a settlement the queue refused): logged, abandoned."""


@dataclass(frozen=True, slots=True)
class JobReport:
    """Written next to the outputs (``_scalebus_job.json``): who ran the job and how staging went."""

    job_id: str
    instance_id: str
    delivery_count: int
    files_staged: int
    bytes_staged: int
    staging_seconds: float
    run_seconds: float
    exit_code: int | None
    cache_hits: int = 0
    """Input files placed from the VM's input cache instead of downloaded (counted in ``files_staged``)."""
    cache_bytes_saved: int = 0


@dataclass(frozen=True, slots=True)
class JobPorts:
    """What the job path talks to. ``secrets``: the analytics' secrets (``None``: it maps none). ``cache``: the
    VM's input cache staging asks first (``None``: every input is downloaded)."""

    queue: base.JobQueue
    resolve: Callable[[str], base.ObjectStore]
    secrets: SecretEnv | None = None
    cache: kit.InputCache | None = None


@dataclass(frozen=True, slots=True)
class JobRules:
    """What the worker knows of the queue and the intake. ``max_deliveries``: the queue's max delivery count
    (``None``: unknown, failures are always abandoned). ``limits``: the intake's bounds and confinement."""

    limits: jobs.Limits = jobs.DEFAULT_LIMITS
    max_deliveries: int | None = None


@dataclass(slots=True)
class Interrupts:
    """How other threads interrupt the worker: a drain, an eviction notice, a lost lock.

    ``stop``: take no new work. ``cancel``: stop the running staging or analytics now. ``release``: give the
    running job back (the instance ends before it could); ``eviction`` is the notice that said so.
    """

    stop: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    eviction: base.Notice | None = None

    def release_job(self) -> None:
        self.release.set()
        self.cancel.set()

    def raise_if_released(self) -> None:
        if self.release.is_set():
            notice = self.eviction
            raise errors.RetryJob(f"instance being evicted ({notice.kind if notice else '?'}): job released")

    def rearm(self) -> None:
        """Between jobs: a fresh ``cancel`` for the next one, unless draining (then nothing else may start)."""
        self.cancel.clear()
        if self.stop.is_set():
            self.cancel.set()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a drain, a cancellation or a release ends it early."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not (self.stop.is_set() or self.cancel.is_set()):
            self.cancel.wait(min(left, 0.1))


class Verdict(enum.Enum):
    COMPLETE = "complete"
    DEAD_LETTER = "dead_letter"
    ABANDON = "abandon"
    LET_GO = "let_go"
    """The lock moved to another receiver: settle nothing, the job is theirs."""


class Cause(enum.Enum):
    """Whose fault a failure is: it decides the back-off and whether the worker keeps taking work."""

    JOB = "job"
    ENVIRONMENT = "environment"
    """Storage, the disk, the machine: held back before it goes back (:mod:`scalebus.worker.backoff`)."""
    WORKER = "worker"
    """This worker cannot run the analytics at all."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """What becomes of a message: the verdict and, for a dead letter, the reason the queue records."""

    verdict: Verdict
    reason: str = ""
    """Dead letter: the reason sent. Abandon: the reason to dead-letter with on the last delivery (``""``:
    leave it to the queue)."""
    description: str = ""
    """Dead letter: the description sent with it. Abandon and let-go: why, for the log."""
    unexpected: bool = False
    """The error is none of ours: a bug or an unforeseen failure, logged with its traceback."""
    cause: Cause = Cause.JOB


COMPLETED = Settlement(Verdict.COMPLETE)


def settlement_for(exc: Exception) -> Settlement:
    """What to do with a message whose job raised ``exc``: the whole rule, by type."""
    if isinstance(exc, errors.LockLostError):
        return Settlement(Verdict.LET_GO, description=str(exc))
    if isinstance(exc, (errors.RejectJob, errors.InvalidJobError)):
        return Settlement(Verdict.DEAD_LETTER, exc.reason, exc.description)
    if isinstance(exc, errors.PermanentBackendError):
        return Settlement(Verdict.DEAD_LETTER, type(exc).__name__.removesuffix("Error"), str(exc))
    if isinstance(exc, errors.LocalDiskError):  # this machine's disk: on the last delivery, say so
        return Settlement(Verdict.ABANDON, "LocalDiskError", str(exc), cause=Cause.ENVIRONMENT)
    if isinstance(exc, runner.CommandUnusable):
        return Settlement(Verdict.ABANDON, description=str(exc), cause=Cause.WORKER)
    if isinstance(exc, (runner.AnalyticsKilled, runner.LaunchFailed, errors.BackendError)):
        return Settlement(Verdict.ABANDON, description=str(exc), cause=Cause.ENVIRONMENT)
    if isinstance(exc, (runner.AnalyticsFailed, runner.AnalyticsTimedOut)):
        return Settlement(Verdict.ABANDON, type(exc).__name__, str(exc))
    if isinstance(exc, errors.RetryJob):  # given back on purpose (drain, eviction): never the last word
        return Settlement(Verdict.ABANDON, description=str(exc))
    return Settlement(Verdict.ABANDON, "WorkerError", repr(exc), unexpected=True)


def intake_settlement(exc: Exception) -> Settlement:
    """A body the intake refused: a dead letter, whatever the intake raised."""
    if isinstance(exc, errors.InvalidJobError):
        return settlement_for(exc)
    return Settlement(Verdict.DEAD_LETTER, "MalformedBody", f"the body could not be read ({type(exc).__name__})")


def final_settlement(
    settlement: Settlement,
    *,
    delivery_count: int,
    max_deliveries: int | None,
    lock_lost: BaseException | None,
    released: int = 0,
) -> Settlement:
    """The settlement to apply: a lock gone by now lets go of what would complete or abandon; a failure of the
    job's own on its last delivery is dead-lettered with its cause (an environment failure that will be
    released spends no delivery, so it is never the last)."""
    if lock_lost is not None and settlement.verdict in (Verdict.COMPLETE, Verdict.ABANDON):
        return Settlement(Verdict.LET_GO, description=f"job lock lost: {lock_lost}")
    last = max_deliveries is not None and delivery_count >= max_deliveries
    if settlement.cause is Cause.ENVIRONMENT and backoff.releasable(released):
        last = False
    if settlement.verdict is Verdict.ABANDON and settlement.reason and last:
        return replace(settlement, verdict=Verdict.DEAD_LETTER)
    return settlement


class JobRunner:
    """Runs one message at a time to its settlement and counts what happened in :attr:`stats`.

    ``on_job`` is called with the job id once a valid job is taken and with ``None`` once it is settled.
    :attr:`cannot_run` says why this worker should take no more work (its command cannot be launched).
    """

    def __init__(
        self,
        ports: JobPorts,
        *,
        instance_id: str,
        settings: WorkerSettings,
        staging_settings: StagingSettings,
        interrupts: Interrupts,
        on_job: Callable[[str | None], None],
        rules: JobRules | None = None,
        metrics: recorder.WorkerMetrics = recorder.NO_WORKER_METRICS,
    ) -> None:
        self._metrics = metrics
        self._ports = ports
        self._instance_id = instance_id
        self._settings = settings
        self._staging = staging_settings
        self._interrupts = interrupts
        self._on_job = on_job
        self._rules = rules or JobRules()
        self._running: eviction.RunningJob | None = None
        self._launch_failures = 0
        self.cannot_run: str | None = None
        self.stats = WorkerStats()

    def running(self) -> eviction.RunningJob | None:
        """The job held right now and how late its analytics can still run (called from other threads)."""
        return self._running

    def handle(self, message: base.ReceivedMessage) -> Settlement:
        with structlog.contextvars.bound_contextvars(message_id=message.message_id):
            try:
                return self._handle(message)
            except Exception as exc:  # one message must never end the worker; the traceback is logged
                return self._handling_failed(message, exc)

    def give_back(self, message: base.ReceivedMessage, *, why: str) -> None:
        """Abandon a message this worker will not start (it received it as the instance began to go)."""
        try:
            self._ports.queue.abandon(message)
        except errors.BackendError as exc:  # its lock expires and it is delivered again
            log.warning("job_abandon_failed", error=str(exc))
            return
        self.stats.abandoned += 1
        log.warning("job_abandoned", delivery_count=message.delivery_count, why=why)

    def _handle(self, message: base.ReceivedMessage) -> Settlement:
        try:
            job = jobs.parse(message.body, limits=self._rules.limits)
        except Exception as exc:  # the intake raises InvalidJobError only; whatever else escapes is the body's
            settlement = intake_settlement(exc)
            self._dead_letter(message, settlement)
            return settlement
        with structlog.contextvars.bound_contextvars(job_id=job.job_id):
            return self._handle_job(message, job)

    def _handling_failed(self, message: base.ReceivedMessage, exc: Exception) -> Settlement:
        log.exception("job_handling_failed", error=logs.redact(repr(exc))[:300])
        self.stats.handling_failed += 1
        self.give_back(message, why="the worker failed handling it")
        return Settlement(Verdict.ABANDON, description=repr(exc), unexpected=True)

    # ------------------------------------------------------------------ one job

    def _handle_job(self, message: base.ReceivedMessage, job: jobs.Job) -> Settlement:
        self._running = eviction.RunningJob(job.job_id)  # unbounded until the analytics starts
        keeper: base.LockKeeper | None = None
        try:
            self._on_job(job.job_id)
            keeper = self._ports.queue.keep_locked(message, on_lost=self._on_lock_lost)
            return self._settle(message, keeper, self._outcome(message, job, keeper))
        finally:
            if keeper is not None:
                keeper.stop()
            self._interrupts.rearm()
            self._running = None
            self._on_job(None)

    def _outcome(self, message: base.ReceivedMessage, job: jobs.Job, keeper: base.LockKeeper) -> Settlement:
        try:
            self._execute(message, job, keeper)
        except Exception as exc:
            settlement = settlement_for(exc)
            if settlement.unexpected:  # keep the evidence
                log.exception("job_crashed", error=logs.redact(settlement.description)[:300])
            return settlement
        return COMPLETED

    def _execute(self, message: base.ReceivedMessage, job: jobs.Job, keeper: base.LockKeeper) -> None:
        output_uri = jobs.output_uri_for(job)
        commit = publish.Commit(job.job_id, message.message_id, message.delivery_count)
        if publish.committed(self._ports.resolve(output_uri), output_uri, commit):
            log.info("job_already_published", output=output_uri)
            return
        dirs = recovery.JobDir.claim(self._settings.work_dir, job.job_id, message.delivery_count)
        try:
            report = self._stage_and_run(message, job, dirs, keeper)
            self._publish(report, dirs.output, output_uri, keeper, commit=commit)
        finally:
            dirs.release()

    def _stage_and_run(
        self, message: base.ReceivedMessage, job: jobs.Job, dirs: recovery.JobDir, keeper: base.LockKeeper
    ) -> JobReport:
        secrets = self._ports.secrets
        secret_env = secrets.resolve() if secrets is not None else {}  # before staging: a missing one is final
        staged = self._stage(job, dirs.input, keeper)
        result = self._run_analytics(job, dirs, secret_env, keeper)
        return JobReport(
            job.job_id,
            self._instance_id,
            message.delivery_count,
            staged.files,
            staged.bytes,
            round(staged.seconds, 3),
            round(result.seconds, 3),
            result.exit_code,
            cache_hits=staged.cached_files,
            cache_bytes_saved=staged.cached_bytes,
        )

    def _stage(self, job: jobs.Job, in_dir: Path, keeper: base.LockKeeper) -> kit.StageStats:
        try:
            staged = stage.stage_in(
                self._ports.resolve,
                job.inputs,
                in_dir,
                self._staging,
                cancel=self._interrupts.cancel,
                cache=self._ports.cache,
            )
        except errors.StagingCancelled:
            self._checkpoint(keeper)  # say why it was cancelled, when we know
            raise
        self.stats.bytes_staged += staged.bytes
        self.stats.staging_seconds += staged.seconds
        self._metrics.job_staged(files=staged.files, size_bytes=staged.bytes, seconds=staged.seconds)
        log.info(
            "job_staged",
            files=staged.files,
            bytes=staged.bytes,
            seconds=round(staged.seconds, 2),
            mb_per_s=round(staged.mb_per_s, 1),
            processes=staged.processes,
            cache_hits=staged.cached_files,
            cache_bytes_saved=staged.cached_bytes,
        )
        self._checkpoint(keeper)
        return staged

    def _run_analytics(
        self, job: jobs.Job, dirs: recovery.JobDir, secret_env: dict[str, str], keeper: base.LockKeeper
    ) -> runner.RunResult:
        timeout_s = job.timeout_s or self._settings.job_timeout_s
        self._running = eviction.RunningJob(job.job_id, time.time() + timeout_s)
        job_vars = runner.job_env(
            job_id=job.job_id, input_dir=dirs.input, output_dir=dirs.output, params=job.params
        )
        env = runner.analytics_env(
            job_vars, secret_env=secret_env, pass_env=self._settings.pass_env, environ=os.environ, home=dirs.root
        )
        result = runner.run(
            self._settings.command,
            cwd=dirs.root,
            env=env,
            output_dir=dirs.output,
            timeout_s=timeout_s,
            cancel=self._interrupts.cancel,
            pid_file=dirs.pid_file,
        )
        self._metrics.job_ran(seconds=result.seconds)
        self._checkpoint(keeper)
        secrets = self._ports.secrets
        _check_result(result, dirs.root, mask=secrets.mask if secrets is not None else str)
        log.info("job_ran", seconds=round(result.seconds, 2))
        return result

    def _publish(
        self, report: JobReport, out_dir: Path, output_uri: str, keeper: base.LockKeeper, *, commit: publish.Commit
    ) -> None:
        report_path = out_dir / JOB_REPORT
        with download.local_io(report_path):
            report_path.write_text(json.dumps(asdict(report), indent=2))
        self._checkpoint(keeper)
        published = publish.publish(
            self._ports.resolve,
            out_dir,
            output_uri,
            self._staging,
            commit=commit,
            check=lambda: _raise_if_lost(keeper),
        )
        log.info("job_published", output=output_uri, files=published.files, bytes=published.bytes)

    def _checkpoint(self, keeper: base.LockKeeper) -> None:
        """Between steps: stop if the lock is gone or the job was released."""
        _raise_if_lost(keeper)
        self._interrupts.raise_if_released()

    def _on_lock_lost(self, exc: BaseException) -> None:
        log.warning("job_lock_renewal_failed", error=str(exc))
        self._interrupts.cancel.set()

    # ------------------------------------------------------------------ settlement

    def _settle(
        self, message: base.ReceivedMessage, keeper: base.LockKeeper, settlement: Settlement
    ) -> Settlement:
        """Apply ``settlement`` to the message; returns what was done (an abandon whose lock is gone lets go)."""
        self._note_launch(settlement)
        keeper.stop()
        settlement = final_settlement(
            settlement,
            delivery_count=message.delivery_count,
            max_deliveries=self._rules.max_deliveries,
            lock_lost=keeper.lost,
            released=message.released,
        )
        try:
            self._apply(message, settlement)
        except errors.LockLostError as exc:  # found at the last moment: the job is someone else's now
            settlement = Settlement(Verdict.LET_GO, description=str(exc))
            self._let_go(settlement.description)
        return settlement

    def _apply(self, message: base.ReceivedMessage, settlement: Settlement) -> None:
        match settlement.verdict:
            case Verdict.COMPLETE:
                self._ports.queue.complete(message)
                self.stats.completed += 1
                log.info("job_completed", delivery_count=message.delivery_count)
            case Verdict.DEAD_LETTER:
                self._dead_letter(message, settlement)
            case Verdict.ABANDON if settlement.cause is Cause.ENVIRONMENT and backoff.releasable(message.released):
                delay = backoff.release_delay(message.released, cap_s=self._settings.env_backoff_max_s)
                self._ports.queue.release_later(message, delay_s=delay)
                self.stats.released += 1
                log.warning(
                    "job_released",
                    delay_s=delay,
                    released=message.released + 1,
                    why=_shown(settlement.description),
                )
            case Verdict.ABANDON:
                self._ports.queue.abandon(message)
                self.stats.abandoned += 1
                log.warning(
                    "job_abandoned",
                    delivery_count=message.delivery_count,
                    cause=settlement.cause.value,
                    why=_shown(settlement.description),
                )
            case Verdict.LET_GO:
                self._let_go(settlement.description)

    def _note_launch(self, settlement: Settlement) -> None:
        """Count launches that failed for this worker's own reasons; decide whether it can go on at all."""
        if settlement.cause is not Cause.WORKER:
            self._launch_failures = 0
            return
        self._launch_failures += 1
        try:
            runner.check_command(
                self._settings.command, path=runner.analytics_path(self._settings.pass_env, os.environ)
            )
        except errors.ConfigError as exc:
            self.cannot_run = str(exc)
            return
        if self._launch_failures >= MAX_LAUNCH_FAILURES:
            self.cannot_run = f"{self._launch_failures} launches failed in a row: {settlement.description}"

    def _dead_letter(self, message: base.ReceivedMessage, settlement: Settlement) -> None:
        reason, description = settlement.reason, logs.redact(settlement.description)
        self._ports.queue.dead_letter(message, reason=reason, description=description[:1000])
        self.stats.dead_lettered += 1
        log.warning("job_dead_lettered", reason=reason, description=description[:300])

    def _let_go(self, why: str) -> None:
        self.stats.lock_lost += 1
        log.warning("job_lock_lost", error=why)


def _shown(text: str) -> str:
    return logs.redact(text)[:300]


def _raise_if_lost(keeper: base.LockKeeper) -> None:
    if keeper.lost is not None:
        raise errors.LockLostError(f"job lock lost: {keeper.lost}")


def _check_result(result: runner.RunResult, scratch: Path, *, mask: Callable[[str], str]) -> None:
    """Turn a failed run into the error that settles it: ``RejectJob`` on exit 3; a signal the worker did not
    send is the environment's; every reason carries the stderr tail and, if so, the full scratch disk."""
    if result.ok:
        return
    stderr = logs.redact(mask(result.stderr_tail[-500:]))  # the analytics may print a secret
    if result.cancelled:
        raise errors.RetryJob("analytics stopped: worker draining or lock lost")
    disk = runner.disk_note(scratch)
    if result.timed_out:
        raise runner.AnalyticsTimedOut(f"analytics timed out after {result.seconds:.0f} s{disk}: {stderr}")
    signum = result.signal
    if signum is not None:
        raise runner.AnalyticsKilled(
            f"analytics killed by signal {signum} ({runner.signal_name(signum)}){disk}: {stderr}", signum=signum
        )
    if result.exit_code == runner.EXIT_REJECT:
        raise errors.RejectJob("AnalyticsRejected", stderr or "the analytics refused this job (exit 3)")
    raise runner.AnalyticsFailed(f"analytics exited with {result.exit_code}{disk}: {stderr}")
