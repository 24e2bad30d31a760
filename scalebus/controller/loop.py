"""The controller process: run :class:`~scalebus.controller.step.ControllerStep` on a timer until told to stop.

Everything one round does lives in ``controller/step.py``; this module only repeats it. The sleep between rounds is
interruptible (a ``threading.Event``), so SIGTERM stops the controller at once. A round whose backend fails with
our ``BackendError`` is logged, counted and retried with exponential back-off; the loop gives up after
``max_consecutive_failures`` failed rounds in a row, or as many failures of one kind of write or heartbeat read
with no success of that kind in between (:attr:`ControllerStep.failure_streak`: rounds that try nothing do not end
a streak). A write still running when the loop stops is waited for. With ``exit_when_drained`` it ends once the
queue and the fleet are empty.

Given a :class:`~scalebus.backends.base.Lease`, any number of controllers may run: each round starts only while
this one leads (:mod:`scalebus.controller.leadership`), the others stand by and try to acquire the lease each
poll, and the step checks :meth:`Leadership.still_leader` right before every write. Stopping releases the lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import leadership, policy, step
from scalebus.controller.step import ControllerStats
from scalebus.observability import recorder
from scalebus.settings import ControllerSettings

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 60.0

__all__ = ["Controller", "ControllerStats"]


class Controller:
    """Sizes one scale set for one queue, round after round."""

    def __init__(
        self,
        *,
        depth: base.QueueDepth,
        scale_set: base.ScaleSet,
        heartbeats: base.HeartbeatStore,
        settings: ControllerSettings,
        clock: Callable[[], float] = time.time,
        max_consecutive_failures: int = 30,
        protect_busy: bool = False,
        metrics: recorder.ControllerMetrics = recorder.NO_CONTROLLER_METRICS,
        lease: base.Lease | None = None,
        holder: str = "",
    ) -> None:
        self._settings = settings
        self.leadership = leadership.Leadership(lease, holder=holder) if lease is not None else None
        self._metrics = metrics
        self._max_failures = max_consecutive_failures
        self._step = step.ControllerStep(
            depth=depth,
            scale_set=scale_set,
            heartbeats=heartbeats,
            settings=settings,
            clock=clock,
            protect_busy=protect_busy,
            still_leader=self.leadership.still_leader if self.leadership is not None else None,
        )

    @property
    def stats(self) -> ControllerStats:
        return self._step.stats

    def run(self, stop: threading.Event) -> ControllerStats:
        """Loop until ``stop`` is set (or, with ``exit_when_drained``, until nothing is left to do)."""
        log.info("controller_started", max_instances=self._settings.max_instances)
        try:
            self._loop(stop)
        finally:
            self._step.close()
            if self.leadership is not None:
                self.leadership.close()
        return self.stats

    def _loop(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            if self.leadership is not None and not self.leadership.lead():
                self._metrics.standing_by(next_in_s=self._settings.poll_interval_s)
                stop.wait(self._settings.poll_interval_s)
                continue
            try:
                obs, decision = self._step.run_round()
                failures = 0
            except errors.BackendError as exc:
                failures += 1
                self.stats.failures += 1
                log.warning("controller_round_failed", error=str(exc), transient=exc.transient, failures=failures)
                if failures >= self._max_failures:
                    raise
                backoff_s = min(_MAX_BACKOFF_S, self._settings.poll_interval_s * 2**failures)
                self._metrics.round_failed(exc, next_in_s=backoff_s)
                stop.wait(backoff_s)
                continue
            self._metrics.round_done(obs, decision, next_in_s=self._settings.poll_interval_s)
            if self._step.failure_streak >= self._max_failures:
                raise errors.BackendError(
                    f"{self._step.failure_streak} failures in a row without a success of the same kind; "
                    f"last: {self.stats.last_error}"
                )
            if self._settings.exit_when_drained and _drained(obs) and not self._step.write_in_flight:
                log.info("controller_drained", rounds=self.stats.rounds)
                break
            stop.wait(self._settings.poll_interval_s)


def _drained(obs: policy.Observation) -> bool:
    """Nothing waiting, running or due later (a job given back with a delay counts as scheduled), no instance."""
    depth = obs.depth
    return depth.active == 0 and not depth.in_flight and not depth.scheduled and not obs.instances
