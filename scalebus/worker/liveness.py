"""The worker's two background threads: telling the fleet it is alive, and hearing that its instance is going.

**Heartbeat and hint.** Every ``heartbeat_interval_s`` the worker writes its state (idle, busy with a job,
draining) to the heartbeat store, which is how the controller counts supply, and re-reads the controller's
:class:`~scalebus.backends.base.FleetHint`. The idle grace is the controller's: the policy weighs the expected
next arrival against a boot and publishes the answer in the hint. The worker's own ``idle_timeout_s`` is the
fallback, used while there is no hint younger than ``base.HINT_MAX_AGE_S`` (no controller, a controller that
died, no heartbeat store). The hint is not capped by ``idle_timeout_s``: the controller's ``idle_grace_max_s``
bounds it, and a cap here would undo prewarming (a worker booted to wait minutes for a periodic job). A hint
that names this instance in ``retire_instance_ids`` (``scalebus rollout``) makes it take no more work.

**Eviction.** A Spot eviction or deletion notice (the policy is :mod:`scalebus.worker.eviction`) stops the
worker taking work and releases a job that cannot end in time: the job is stopped and abandoned at once,
nothing published. The worker then ends without self-destroy: the platform is deleting the instance.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import WorkerSettings
from scalebus.worker import eviction
from scalebus.worker.job import Interrupts

log = structlog.get_logger(__name__)


class HeartbeatReporter:
    """Beats this worker's state to ``store`` (``None``: nowhere) from a daemon thread, reading the hint too."""

    def __init__(self, store: base.HeartbeatStore | None, *, instance_id: str, interval_s: float) -> None:
        self._store = store
        self._instance_id = instance_id
        self._interval_s = interval_s
        self._state = base.WorkerState.IDLE
        self._job_id: str | None = None
        self._hint: base.FleetHint | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._read_hint()
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._beat_forever,), name="heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self, state: base.WorkerState, job_id: str | None) -> None:
        """A new state: beat it now rather than at the next interval."""
        self._state, self._job_id = state, job_id
        self._beat()

    def report_draining(self) -> None:
        """Draining, still holding whatever job is running."""
        self.report(base.WorkerState.DRAINING, self._job_id)

    def idle_timeout_s(self, *, fallback: float) -> float:
        """How long to wait for work before retiring: the controller's fresh hint, else ``fallback``."""
        hint = self._hint
        fresh = hint is not None and abs(time.time() - hint.at) <= base.HINT_MAX_AGE_S  # either way: clock skew
        if hint is None or not fresh or not (math.isfinite(hint.idle_grace_s) and hint.idle_grace_s >= 0):
            return fallback
        return hint.idle_grace_s

    def retire_requested(self) -> bool:
        """Whether the fleet hint names this instance for retirement (a rollout's old model): take no more work.
        Honoured whatever the hint's age: the operator decided it, no forecast went stale."""
        hint = self._hint
        return hint is not None and self._instance_id in (hint.retire_instance_ids or ())

    def _beat(self) -> None:
        if self._store is None:
            return
        try:
            self._store.beat(base.Heartbeat(self._instance_id, self._state, time.time(), self._job_id))
        except errors.BackendError as exc:
            log.warning("heartbeat_failed", error=str(exc))

    def _beat_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat()
            self._read_hint()

    def _read_hint(self) -> None:
        if self._store is None:
            return
        try:
            hint = self._store.read_hint()
        except errors.BackendError as exc:
            log.warning("fleet_hint_read_failed", error=str(exc))  # keep the last one; it ages out
            return
        if hint is not None and (self._hint is None or hint.idle_grace_s != self._hint.idle_grace_s):
            log.debug("fleet_hint", idle_grace_s=round(hint.idle_grace_s, 1))
        self._hint = hint


class EvictionResponse:
    """Acts on the eviction watch's decisions: stop taking work; release the job if it cannot end in time.

    ``running`` reports the job held right now (called from the watch thread).
    """

    def __init__(
        self,
        interrupts: Interrupts,
        *,
        heartbeat: HeartbeatReporter,
        running: Callable[[], eviction.RunningJob | None],
        instance_id: str,
    ) -> None:
        self._interrupts = interrupts
        self._heartbeat = heartbeat
        self._running = running
        self._instance_id = instance_id

    def watch(
        self, source: base.NoticeSource | None, *, settings: WorkerSettings
    ) -> eviction.EvictionWatch | None:
        """Start polling ``source`` (``None``, or ``eviction_poll_s`` of 0: no watch)."""
        if source is None or settings.eviction_poll_s <= 0:
            return None
        watch = eviction.EvictionWatch(
            source,
            instance_id=self._instance_id,
            poll_s=settings.eviction_poll_s,
            acknowledge=settings.eviction_acknowledge,
            job=self._running,
            on_decision=self.on_decision,
        )
        watch.start()
        return watch

    def on_decision(self, decision: eviction.EvictionDecision) -> None:
        interrupts = self._interrupts
        if interrupts.eviction is None and decision.eviction is not None:
            interrupts.eviction = decision.eviction
            interrupts.stop.set()  # no drain timer: the decision says whether the job may finish
            self._heartbeat.report_draining()
        if decision.release_job and not interrupts.release.is_set():
            running = self._running()
            job_id = running.job_id if running is not None else None
            log.warning("eviction_releasing_job", instance_id=self._instance_id, job_id=job_id)
            interrupts.release_job()
