"""The worker loop: receive → validate → stage → run → publish → settle; self-destroy when idle.

Settlement follows the error's type (STYLE.md pattern 4): an invalid job or ``RejectJob`` is dead-lettered with
its reason; ``RetryJob``, a transient backend failure or an unexpected error abandons the message (the queue
dead-letters it after its max delivery count). A secret of ``worker.secret_env`` that does not exist is permanent:
the job is dead-lettered with reason ``SecretNotFound`` naming the secret, before anything is staged (abandoning
would redeliver at once and end in the dead-letter queue anyway, as ``MaxDeliveryCountExceeded``, the cause lost);
the worker's start-up check keeps a fleet with a wrong mapping from taking jobs at all. If the lock is lost while
the job runs, the analytics are stopped and nothing is published or settled: the job belongs to whoever holds it
now. Outputs are committed once: a job whose ``_SUCCESS`` marker already exists (an earlier delivery published,
then crashed before completing) is just completed. On SIGTERM the worker takes no new work and lets the running
job finish within ``drain_timeout_s``, then abandons it. Idle for the idle grace, it reports itself retired and
waits for the controller to delete it (in a batch), deleting itself after ``retire_wait_s`` if nobody did.
A Spot eviction or deletion notice (``worker/eviction.py``) stops it taking work, releases a job that cannot end
in time (abandoned at once, nothing published) and ends it without self-destroy: the platform is deleting it.

The idle grace is the controller's: the policy weighs the expected next arrival against a boot and publishes the
answer as a :class:`~scalebus.backends.base.FleetHint` in the heartbeat store, which the worker re-reads with each
heartbeat. The worker's own ``idle_timeout_s`` is the fallback, used while there is no hint younger than
``base.HINT_MAX_AGE_S`` (no controller, a controller that died, no heartbeat store). The hint is not capped by
``idle_timeout_s``: the controller's ``idle_grace_max_s`` bounds it, and a cap here would undo prewarming (a worker
booted to wait minutes for a periodic job).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from scalebus import errors, jobs
from scalebus.backends import base
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import staging
from scalebus.worker import eviction, runner
from scalebus.worker.secrets import SecretEnv

log = structlog.get_logger(__name__)

SUCCESS_MARKER = "_SUCCESS"
JOB_REPORT = "_scalebus_job.json"


@dataclass(slots=True)
class WorkerStats:
    completed: int = 0
    dead_lettered: int = 0
    abandoned: int = 0
    lock_lost: int = 0
    bytes_staged: int = 0
    staging_seconds: float = 0.0


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


class Worker:
    """One worker process. ``on_idle`` is the self-destroy routine (``None``: just exit when idle)."""

    def __init__(
        self,
        *,
        queue: base.JobQueue,
        resolve: Callable[[str], base.ObjectStore],
        heartbeats: base.HeartbeatStore | None,
        instance_id: str,
        settings: WorkerSettings,
        staging_settings: StagingSettings,
        on_idle: Callable[[], None] | None = None,
        secrets: SecretEnv | None = None,
        notices: base.NoticeSource | None = None,
    ) -> None:
        self._queue = queue
        self._resolve = resolve
        self._heartbeats = heartbeats
        self._instance_id = instance_id
        self._settings = settings
        self._staging = staging_settings
        self._on_idle = on_idle
        self._secrets = secrets
        self._notices = notices
        self._eviction: base.Notice | None = None
        self._release = threading.Event()  # an eviction notice: give the running job back now
        self._job_ends_by = math.inf
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._stop_requested_at: float | None = None
        self._state = base.WorkerState.IDLE
        self._job_id: str | None = None
        self._hint: base.FleetHint | None = None
        self.stats = WorkerStats()

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """SIGTERM: take no new work; the running job gets ``drain_timeout_s`` to finish."""
        if self._stop_requested_at is not None:
            return
        self._stop.set()
        self._stop_requested_at = time.monotonic()
        self._set_state(base.WorkerState.DRAINING, self._job_id)
        timer = threading.Timer(self._settings.drain_timeout_s, self._cancel.set)
        timer.daemon = True
        timer.start()
        log.info("worker_draining", drain_timeout_s=self._settings.drain_timeout_s)

    def run(self) -> WorkerStats:
        structlog.contextvars.bind_contextvars(instance_id=self._instance_id)
        if self._secrets is not None:
            self._secrets.check()
        beat_stop = threading.Event()
        self._read_hint()
        beater = threading.Thread(target=self._beat_forever, args=(beat_stop,), name="heartbeat", daemon=True)
        beater.start()
        watch = self._watch_notices()
        try:
            idle_for = self._loop()
            if self._eviction is not None and watch is not None:
                watch.acknowledge_released()  # no job held any more
                log.info("worker_evicted", event_id=self._eviction.event_id, completed=self.stats.completed)
            elif idle_for is not None:
                self._retire(idle_for)
        finally:
            if watch is not None:
                watch.stop()
            beat_stop.set()
            beater.join()
        return self.stats

    @property
    def evicted_by(self) -> base.Notice | None:
        """The notice that ended this worker (its instance is being evicted or deleted), if any."""
        return self._eviction

    def _watch_notices(self) -> eviction.EvictionWatch | None:
        if self._notices is None or self._settings.eviction_poll_s <= 0:
            return None
        watch = eviction.EvictionWatch(
            self._notices,
            instance_id=self._instance_id,
            poll_s=self._settings.eviction_poll_s,
            acknowledge=self._settings.eviction_acknowledge,
            job=self._running_job,
            on_decision=self._on_eviction,
        )
        watch.start()
        return watch

    def _running_job(self) -> eviction.RunningJob | None:
        job_id = self._job_id
        return eviction.RunningJob(job_id, self._job_ends_by) if job_id is not None else None

    def _on_eviction(self, decision: eviction.EvictionDecision) -> None:
        """From the watch thread: stop taking work; release the job if it cannot end before the instance does."""
        if self._eviction is None and decision.eviction is not None:
            self._eviction = decision.eviction
            self._stop.set()  # no drain timer: the decision says whether the job may finish
            self._state = base.WorkerState.DRAINING
            self._beat()
        if decision.release_job and not self._release.is_set():
            log.warning("eviction_releasing_job", instance_id=self._instance_id, job_id=self._job_id)
            self._release.set()
            self._cancel.set()

    def idle_timeout_s(self) -> float:
        """How long to wait for work before retiring: the controller's fresh hint, else ``idle_timeout_s``."""
        hint = self._hint
        fresh = hint is not None and abs(time.time() - hint.at) <= base.HINT_MAX_AGE_S  # either way: clock skew
        if hint is None or not fresh or not (math.isfinite(hint.idle_grace_s) and hint.idle_grace_s >= 0):
            return self._settings.idle_timeout_s
        return hint.idle_grace_s

    def _retire(self, idle_for: float) -> None:
        """Idle: stop taking work and say so (DRAINING, no job). The controller deletes retired instances in
        batches, which spares the ARM delete budget; if it has not within ``retire_wait_s``, delete myself."""
        log.info("worker_idle_retiring", idle_s=round(idle_for, 1), completed=self.stats.completed)
        self._set_state(base.WorkerState.DRAINING, None)
        if self._on_idle is None or self._stop.wait(self._settings.retire_wait_s):
            return
        self._on_idle()

    def _loop(self) -> float | None:
        """Take jobs until stopped (returns ``None``) or idle for the idle grace (returns the idle time)."""
        idle_since = time.monotonic()
        log.info("worker_started", idle_timeout_s=self.idle_timeout_s())
        while not self._stop.is_set():
            idle_for = time.monotonic() - idle_since
            timeout = self.idle_timeout_s()
            if idle_for >= timeout:
                return idle_for
            wait = min(self._settings.receive_wait_s, max(0.1, timeout - idle_for))
            message = self._queue.receive(max_wait_s=wait)
            if message is not None and self._eviction is not None:  # received as the notice came: give it back
                self._queue.abandon(message)
                self.stats.abandoned += 1
                log.warning("job_abandoned", delivery_count=message.delivery_count, why="instance being evicted")
            elif message is not None:
                self.handle(message)
                idle_since = time.monotonic()
        return None

    # ------------------------------------------------------------------ one job

    def handle(self, message: base.ReceivedMessage) -> None:
        with structlog.contextvars.bound_contextvars(message_id=message.message_id):
            try:
                job = jobs.parse_job(message.body)
            except errors.InvalidJobError as exc:
                self._dead_letter(message, exc.reason, exc.description)
                return
            with structlog.contextvars.bound_contextvars(job_id=job.job_id):
                self._handle_job(message, job)

    def _handle_job(self, message: base.ReceivedMessage, job: jobs.Job) -> None:
        self._job_ends_by = math.inf  # unbounded until the analytics starts (staging has no timeout)
        self._set_state(base.WorkerState.BUSY, job.job_id)
        keeper = self._queue.keep_locked(message, on_lost=self._on_lock_lost)
        try:
            self._settle(message, job, keeper)
        finally:
            keeper.stop()
            self._cancel.clear()
            if self._stop.is_set():
                self._cancel.set()  # draining: nothing else may start
            self._set_state(base.WorkerState.DRAINING if self._stop.is_set() else base.WorkerState.IDLE, None)

    def _settle(self, message: base.ReceivedMessage, job: jobs.Job, keeper: base.LockKeeper) -> None:
        try:
            self._execute(message, job, keeper)
        except errors.LockLostError as exc:
            self.stats.lock_lost += 1
            log.warning("job_lock_lost", error=str(exc))
            return
        except (errors.RejectJob, errors.InvalidJobError) as exc:
            keeper.stop()
            self._dead_letter(message, exc.reason, exc.description)
            return
        except errors.PermanentBackendError as exc:
            keeper.stop()
            self._dead_letter(message, type(exc).__name__.removesuffix("Error"), str(exc))
            return
        except (errors.RetryJob, errors.BackendError) as exc:
            self._abandon(message, keeper, str(exc))
            return
        except Exception as exc:  # a bug or an unforeseen failure: give the job back, keep the evidence
            log.exception("job_crashed", error=repr(exc))
            self._abandon(message, keeper, repr(exc))
            return
        keeper.stop()
        _raise_if_lost(keeper)
        self._queue.complete(message)
        self.stats.completed += 1
        log.info("job_completed", delivery_count=message.delivery_count)

    def _execute(self, message: base.ReceivedMessage, job: jobs.Job, keeper: base.LockKeeper) -> None:
        output_uri = jobs.output_uri_for(job)
        store = self._resolve(output_uri)
        if store.exists(output_uri + SUCCESS_MARKER):
            log.info("job_already_published", output=output_uri)
            return
        # absolute: the analytics runs with cwd = job_dir, so relative SCALEBUS_*_DIR paths would point nowhere
        job_dir = Path(self._settings.work_dir).absolute() / f"{job.job_id}.{message.delivery_count}"
        try:
            report = self._stage_and_run(message, job, job_dir, keeper)
            out_dir = job_dir / "output"
            (out_dir / JOB_REPORT).write_text(json.dumps(asdict(report), indent=2))
            _raise_if_lost(keeper)
            self._raise_if_released()
            published = staging.publish(self._resolve, out_dir, output_uri, self._staging)
            log.info("job_published", output=output_uri, files=published.files, bytes=published.bytes)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _stage_and_run(
        self, message: base.ReceivedMessage, job: jobs.Job, job_dir: Path, keeper: base.LockKeeper
    ) -> JobReport:
        in_dir, out_dir = job_dir / "input", job_dir / "output"
        shutil.rmtree(job_dir, ignore_errors=True)
        in_dir.mkdir(parents=True)
        secret_env = self._secrets.resolve() if self._secrets is not None else {}
        try:
            staged = staging.stage_in(self._resolve, job.inputs, in_dir, self._staging, cancel=self._cancel)
        except errors.StagingCancelled:
            _raise_if_lost(keeper)
            self._raise_if_released()
            raise
        self.stats.bytes_staged += staged.bytes
        self.stats.staging_seconds += staged.seconds
        log.info(
            "job_staged",
            files=staged.files,
            bytes=staged.bytes,
            seconds=round(staged.seconds, 2),
            mb_per_s=round(staged.mb_per_s, 1),
            processes=staged.processes,
        )
        _raise_if_lost(keeper)
        self._raise_if_released()
        timeout_s = job.timeout_s or self._settings.job_timeout_s
        self._job_ends_by = time.time() + timeout_s
        result = runner.run(
            self._settings.command,
            cwd=job_dir,
            env=runner.job_env(job_id=job.job_id, input_dir=in_dir, output_dir=out_dir, params=job.params)
            | secret_env,
            output_dir=out_dir,
            timeout_s=timeout_s,
            cancel=self._cancel,
        )
        _raise_if_lost(keeper)
        self._raise_if_released()
        _check_result(result, out_dir, mask=self._secrets.mask if self._secrets is not None else str)
        log.info("job_ran", seconds=round(result.seconds, 2))
        return JobReport(
            job.job_id,
            self._instance_id,
            message.delivery_count,
            staged.files,
            staged.bytes,
            round(staged.seconds, 3),
            round(result.seconds, 3),
            result.exit_code,
        )

    def _raise_if_released(self) -> None:
        if self._release.is_set():
            notice = self._eviction
            raise errors.RetryJob(f"instance being evicted ({notice.kind if notice else '?'}): job released")

    def _on_lock_lost(self, exc: BaseException) -> None:
        log.warning("job_lock_renewal_failed", error=str(exc))
        self._cancel.set()

    # ------------------------------------------------------------------ settlement

    def _dead_letter(self, message: base.ReceivedMessage, reason: str, description: str) -> None:
        self._queue.dead_letter(message, reason=reason, description=description[:1000])
        self.stats.dead_lettered += 1
        log.warning("job_dead_lettered", reason=reason, description=description[:300])

    def _abandon(self, message: base.ReceivedMessage, keeper: base.LockKeeper, why: str) -> None:
        keeper.stop()
        if keeper.lost is not None:
            self.stats.lock_lost += 1
            log.warning("job_lock_lost", error=str(keeper.lost))
            return
        self._queue.abandon(message)
        self.stats.abandoned += 1
        log.warning("job_abandoned", delivery_count=message.delivery_count, why=why[:300])

    # ------------------------------------------------------------------ liveness

    def _set_state(self, state: base.WorkerState, job_id: str | None) -> None:
        self._state, self._job_id = state, job_id
        self._beat()

    def _beat(self) -> None:
        if self._heartbeats is None:
            return
        try:
            self._heartbeats.beat(base.Heartbeat(self._instance_id, self._state, time.time(), self._job_id))
        except errors.BackendError as exc:
            log.warning("heartbeat_failed", error=str(exc))

    def _beat_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self._settings.heartbeat_interval_s):
            self._beat()
            self._read_hint()

    def _read_hint(self) -> None:
        if self._heartbeats is None:
            return
        try:
            hint = self._heartbeats.read_hint()
        except errors.BackendError as exc:
            log.warning("fleet_hint_read_failed", error=str(exc))  # keep the last one; it ages out
            return
        if hint is not None and (self._hint is None or hint.idle_grace_s != self._hint.idle_grace_s):
            log.debug("fleet_hint", idle_grace_s=round(hint.idle_grace_s, 1))
        self._hint = hint


def _raise_if_lost(keeper: base.LockKeeper) -> None:
    if keeper.lost is not None:
        raise errors.LockLostError(f"job lock lost: {keeper.lost}")


def _check_result(result: runner.RunResult, out_dir: Path, *, mask: Callable[[str], str]) -> None:
    if result.ok:
        return
    stderr = mask(runner.tail(out_dir / "stderr.txt", max_bytes=500))  # the analytics may print a secret
    if result.timed_out:
        raise errors.RetryJob(f"analytics timed out after {result.seconds:.0f} s")
    if result.cancelled:
        raise errors.RetryJob("analytics stopped: worker draining or lock lost")
    if result.exit_code == runner.EXIT_REJECT:
        raise errors.RejectJob("AnalyticsRejected", stderr or "the analytics refused this job (exit 3)")
    raise errors.RetryJob(f"analytics exited with {result.exit_code}: {stderr}")
