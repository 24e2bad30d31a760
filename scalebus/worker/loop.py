"""The worker process: take messages while there is work, drain on SIGTERM, retire when idle.

:class:`Worker` is the receive loop and nothing more; one message's pipeline and its settlement are
:mod:`scalebus.worker.job`, the heartbeat, the controller's hint and the eviction watch are
:mod:`scalebus.worker.liveness`. The loop decides only when to take work and when to stop:

* **Drain.** On SIGTERM (:meth:`Worker.request_stop`) it takes no new work and lets the running job finish
  within ``drain_timeout_s``; then the job is cancelled and abandoned.
* **Retire.** Idle for the idle grace (the controller's hint, else ``idle_timeout_s``), it reports itself
  retired (draining, no job) and waits for the controller to delete it: the controller deletes retired
  instances in batches, which spares the scale set's delete budget. If nobody has within ``retire_wait_s``,
  it deletes itself (``on_idle``).
* **Replaced.** Once the controller's hint names this instance for retirement (a rollout: its image is
  the old model), it takes no more work and retires as if idle; a job it holds is finished first.
* **Evicted.** Once a notice says the instance is going, a message received meanwhile is given back at once, and
  the worker ends without self-destroy, acknowledging the event when it holds no job.
* **Backing off.** After a job failed for the environment's reasons (storage or the disk unavailable) the
  worker waits a doubling delay before it takes another (:class:`scalebus.worker.backoff.Backoff`), so a fleet
  does not hammer a store that is down; the job itself went back with a delay of its own.
* **Unable.** Before taking any work it checks that ``worker.command`` can be launched (else ``ConfigError``:
  one line, exit 2) and sweeps what dead deliveries left in ``worker.work_dir`` (:mod:`scalebus.worker.recovery`);
  it sweeps again as it leaves, since workers sharing a work dir may have died after the last one started.
  If the command stops being launchable later (the binary removed), it takes no more work and retires.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.observability import recorder
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import kit
from scalebus.worker import backoff, job, liveness, recovery, runner
from scalebus.worker.secrets import SecretEnv

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerPorts:
    """What a worker talks to; whoever builds it opens these and closes them after :meth:`Worker.run`.

    ``heartbeats``: where the fleet learns this worker's state (``None``: nowhere). ``secrets``: the analytics'
    secrets (``None``: it maps none). ``notices``: where eviction notices come from (``None``: not watched).
    ``cache``: the VM's input cache (``None``: off).
    """

    queue: base.JobQueue
    resolve: Callable[[str], base.ObjectStore]
    heartbeats: base.HeartbeatStore | None = None
    secrets: SecretEnv | None = None
    notices: base.NoticeSource | None = None
    cache: kit.InputCache | None = None

    def for_jobs(self) -> job.JobPorts:
        return job.JobPorts(queue=self.queue, resolve=self.resolve, secrets=self.secrets, cache=self.cache)


class Worker:
    """One worker process. ``on_idle`` is the self-destroy routine (``None``: just exit when idle); ``rules``
    the intake's limits and the queue's max delivery count (``None``: the defaults, count unknown)."""

    def __init__(
        self,
        ports: WorkerPorts,
        *,
        instance_id: str,
        settings: WorkerSettings,
        staging_settings: StagingSettings,
        on_idle: Callable[[], None] | None = None,
        rules: job.JobRules | None = None,
        metrics: recorder.WorkerMetrics = recorder.NO_WORKER_METRICS,
    ) -> None:
        self._metrics = metrics
        self._ports = ports
        self._instance_id = instance_id
        self._settings = settings
        self._on_idle = on_idle
        self._interrupts = job.Interrupts()
        self._drain_timer: threading.Timer | None = None
        self._pause = backoff.Backoff(cap_s=settings.env_backoff_max_s)
        self._heartbeat = liveness.HeartbeatReporter(
            ports.heartbeats, instance_id=instance_id, interval_s=settings.heartbeat_interval_s
        )
        self._jobs = job.JobRunner(
            ports.for_jobs(),
            instance_id=instance_id,
            settings=settings,
            staging_settings=staging_settings,
            interrupts=self._interrupts,
            on_job=self._on_job,
            rules=rules,
            metrics=metrics,
        )
        self._eviction = liveness.EvictionResponse(
            self._interrupts, heartbeat=self._heartbeat, running=self._jobs.running, instance_id=instance_id
        )

    @property
    def stats(self) -> job.WorkerStats:
        return self._jobs.stats

    @property
    def evicted_by(self) -> base.Notice | None:
        """The notice that ended this worker (its instance is being evicted or deleted), if any."""
        return self._interrupts.eviction

    def request_stop(self) -> None:
        """SIGTERM: take no new work; the running job gets ``drain_timeout_s`` to finish."""
        if self._drain_timer is not None:
            return
        self._interrupts.stop.set()
        self._drain_timer = threading.Timer(self._settings.drain_timeout_s, self._interrupts.cancel.set)
        self._heartbeat.report_draining()
        self._drain_timer.daemon = True
        self._drain_timer.start()
        log.info("worker_draining", drain_timeout_s=self._settings.drain_timeout_s)

    def run(self) -> job.WorkerStats:
        structlog.contextvars.bind_contextvars(instance_id=self._instance_id)
        self._check_can_run()
        self._heartbeat.start()
        watch = self._eviction.watch(self._ports.notices, settings=self._settings)
        try:
            idle_for = self._loop()
            recovery.sweep(self._settings.work_dir)  # the last worker out leaves no dead delivery's folder
            notice = self._interrupts.eviction
            if notice is not None and watch is not None:
                watch.acknowledge_released()  # no job held any more
                log.info("worker_evicted", event_id=notice.event_id, completed=self.stats.completed)
            elif idle_for is not None:
                self._retire(idle_for)
        finally:
            if watch is not None:
                watch.stop()
            self._heartbeat.stop()
        return self.stats

    def handle(self, message: base.ReceivedMessage) -> job.Settlement:
        """Run one received message to its settlement."""
        return self._jobs.handle(message)

    def idle_timeout_s(self) -> float:
        """How long to wait for work before retiring: the controller's fresh hint, else ``idle_timeout_s``."""
        return self._heartbeat.idle_timeout_s(fallback=self._settings.idle_timeout_s)

    def _loop(self) -> float | None:
        """Take jobs until stopped (returns ``None``) or idle for the idle grace (returns the idle time)."""
        idle_since = time.monotonic()
        log.info("worker_started", idle_timeout_s=self.idle_timeout_s())
        while not self._interrupts.stop.is_set():
            idle_for = time.monotonic() - idle_since
            timeout = self.idle_timeout_s()
            if idle_for >= timeout or self._heartbeat.retire_requested():
                return idle_for
            wait = min(self._settings.receive_wait_s, max(0.1, timeout - idle_for))
            self._metrics.loop_tick(next_in_s=wait)
            message = self._receive(wait)
            if message is None:
                continue
            self._metrics.job_received(message)
            if self._interrupts.eviction is not None:  # received as the notice came: give it back
                self._jobs.give_back(message, why="instance being evicted")
                self._metrics.job_settled(verdict="given_back", reason="", cause="environment", seconds=0.0)
                continue
            self._back_off(self._handle_counted(message))
            idle_since = time.monotonic()
            if self._jobs.cannot_run is not None:
                log.error("worker_cannot_run_analytics", error=self._jobs.cannot_run)
                return 0.0
        return None

    def _handle_counted(self, message: base.ReceivedMessage) -> job.Settlement:
        started = time.monotonic()
        settlement = self._jobs.handle(message)
        self._metrics.job_settled(
            verdict=settlement.verdict.value,
            reason=settlement.reason,
            cause=settlement.cause.value,
            seconds=time.monotonic() - started,
        )
        return settlement

    def _back_off(self, settlement: job.Settlement) -> None:
        """Wait before the next job when this one failed for the environment (interrupted by SIGTERM)."""
        environment = settlement.verdict is job.Verdict.ABANDON and settlement.cause is job.Cause.ENVIRONMENT
        delay = self._pause.after(environment=environment)
        if delay > 0:
            log.warning("worker_backing_off", seconds=delay, failures=self._pause.failures)
            self._interrupts.stop.wait(delay)

    def _receive(self, wait: float) -> base.ReceivedMessage | None:
        try:
            return self._ports.queue.receive(max_wait_s=wait)
        except errors.TransientBackendError as exc:
            log.warning("queue_receive_failed", error=str(exc))
            self._interrupts.stop.wait(wait)
            return None

    def _check_can_run(self) -> None:
        """Refuse to start a worker that could run no job; clear what dead deliveries left behind."""
        if self._ports.secrets is not None:
            self._ports.secrets.check()
        settings = self._settings
        program = runner.check_command(settings.command, path=runner.analytics_path(settings.pass_env, os.environ))
        log.debug("worker_command_found", program=program)
        recovery.sweep(settings.work_dir)

    def _on_job(self, job_id: str | None) -> None:
        if job_id is not None:
            self._heartbeat.report(base.WorkerState.BUSY, job_id)
        elif self._interrupts.stop.is_set():
            self._heartbeat.report(base.WorkerState.DRAINING, None)
        else:
            self._heartbeat.report(base.WorkerState.IDLE, None)

    def _retire(self, idle_for: float) -> None:
        log.info("worker_idle_retiring", idle_s=round(idle_for, 1), completed=self.stats.completed)
        self._heartbeat.report(base.WorkerState.DRAINING, None)
        if self._on_idle is None or self._interrupts.stop.wait(self._settings.retire_wait_s):
            return
        self._on_idle()
