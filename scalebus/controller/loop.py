"""The controller process: run one :class:`~scalebus.controller.step.ControllerStep` per pool on a timer until told
to stop.

Everything one round does lives in ``controller/step.py``; this module only repeats it, for every pool of the
config (``[[pools]]``; one pool without it), each with its own ports, settings, policy state and poll interval,
all in one thread: a round mostly waits on I/O, and the writes that take minutes run on each step's own write
thread. The sleep between rounds is interruptible (a ``threading.Event``), so SIGTERM stops the controller at
once. A round whose backend fails with our ``BackendError`` is logged, counted and retried with exponential
back-off *for that pool alone*: the other pools' rounds go on. A pool gives up after ``max_consecutive_failures``
failed rounds in a row, or as many failures of one kind of write or heartbeat read with no success of that kind
in between (:attr:`ControllerStep.failure_streak`: rounds that try nothing do not end a streak); it is then
logged as failing and retried at the longest back-off, and the controller itself gives up (raises, for its
supervisor to restart it) only once every pool has. Writes still running when the loop stops are waited for.
With ``exit_when_drained`` (on every pool) it ends once every queue and fleet is empty.

The pools share ARM's per-subscription write budget (:mod:`scalebus.controller.budget`): each step asks its gate
before it writes, and a 429 seen by one pool (a ``Retry-After`` on a failed call, or the adapter's count of 429s
rising) holds back the writes of every pool on that subscription.

Given a :class:`~scalebus.backends.base.Lease`, any number of controllers may run: one lease for all pools; each
pass over the pools starts only while this one leads (:mod:`scalebus.controller.leadership`), the others stand by
and try to acquire the lease each poll, and every step checks :meth:`Leadership.still_leader` right before every
write. Stopping releases the lease.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import budget, leadership, policy, step
from scalebus.controller.step import ControllerStats
from scalebus.observability import recorder
from scalebus.settings import DEFAULT_POOL, ControllerSettings

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 60.0

__all__ = ["Controller", "ControllerStats", "Pool", "combined_stats"]


@dataclass(frozen=True, slots=True)
class Pool:
    """One pool as the composition root opened it: its ports, its settings, where it reports."""

    depth: base.QueueDepth
    scale_set: base.ScaleSet
    heartbeats: base.HeartbeatStore
    settings: ControllerSettings
    name: str = DEFAULT_POOL
    protect_busy: bool = False
    metrics: recorder.ControllerMetrics = recorder.NO_CONTROLLER_METRICS
    budget_key: str = budget.LOCAL_KEY
    """The ARM budget its scale set draws on (:func:`scalebus.controller.budget.budget_key`)."""
    throttled_count: Callable[[], int] | None = None
    """How many 429s the scale set's adapter has seen so far (it retries them itself), where it counts them."""


class _PoolRun:
    """One pool inside the loop: its step, its back-off and whether it has given up or drained."""

    def __init__(
        self, pool: Pool, step_: step.ControllerStep, *, gate: budget.PoolGate, max_failures: int
    ) -> None:
        self.pool = pool
        self.step = step_
        self.gate = gate
        self.log = log.bind(pool=pool.name)
        self._max_failures = max_failures
        self.failures = 0
        self.due_at = 0.0
        self.drained = False
        self.gave_up: errors.BackendError | None = None
        self._throttled_seen = pool.throttled_count() if pool.throttled_count is not None else 0

    def run_round(self, now: float) -> None:
        """One round of this pool, whatever it raises: a failure backs off this pool only."""
        settings = self.pool.settings
        try:
            obs, decision = self.step.run_round()
        except errors.BackendError as exc:
            self._round_failed(exc, now)
            return
        finally:
            self._note_throttling()
        self.failures = 0
        self.pool.metrics.round_done(obs, decision, next_in_s=settings.poll_interval_s)
        self.drained = settings.exit_when_drained and _drained(obs) and not self.step.write_in_flight
        self.due_at = now + settings.poll_interval_s
        if self.step.failure_streak >= self._max_failures:
            self._give_up(
                errors.BackendError(
                    f"{self.step.failure_streak} failures in a row without a success of the same kind; "
                    f"last: {self.step.stats.last_error}"
                )
            )
        elif self.gave_up is not None:
            self.log.info("pool_recovered")
            self.gave_up = None

    def _round_failed(self, exc: errors.BackendError, now: float) -> None:
        self.failures += 1
        self.step.stats.failures += 1
        self.drained = False
        self.log.warning(
            "controller_round_failed", error=str(exc), transient=exc.transient, failures=self.failures
        )
        if isinstance(exc, errors.TransientScaleSetError) and exc.retry_after_s:
            self.gate.throttled(retry_after_s=exc.retry_after_s)  # ARM throttles reads too: writes wait
        backoff_s = min(_MAX_BACKOFF_S, self.pool.settings.poll_interval_s * 2**self.failures)
        self.pool.metrics.round_failed(exc, next_in_s=backoff_s)
        self.due_at = now + backoff_s
        if self.failures >= self._max_failures:
            self._give_up(exc)

    def _give_up(self, exc: errors.BackendError) -> None:
        if self.gave_up is None:
            self.log.error("pool_failing", error=str(exc), failures=self.failures)
        self.gave_up = exc

    def _note_throttling(self) -> None:
        """The adapter retried a 429 itself: the subscription is throttled, so every pool on it holds back."""
        if self.pool.throttled_count is None:
            return
        seen = self.pool.throttled_count()
        if seen > self._throttled_seen:
            self.log.warning("arm_throttled_holding_writes", throttled=seen - self._throttled_seen)
            self.gate.throttled(retry_after_s=None)
        self._throttled_seen = seen


class Controller:
    """Sizes each pool's scale set for its queue, round after round."""

    def __init__(
        self,
        pools: Sequence[Pool],
        *,
        clock: Callable[[], float] = time.time,
        max_consecutive_failures: int = 30,
        max_writes_per_minute_total: int = 0,
        lease: base.Lease | None = None,
        holder: str = "",
    ) -> None:
        if not pools:
            raise ValueError("a controller needs at least one pool")
        self.leadership = leadership.Leadership(lease, holder=holder) if lease is not None else None
        still_leader = self.leadership.still_leader if self.leadership is not None else None
        self.budget = budget.SharedBudget(limit=max_writes_per_minute_total, clock=clock)
        self._runs = [
            self._pool_run(pool, clock=clock, still_leader=still_leader, max_failures=max_consecutive_failures)
            for pool in pools
        ]

    def _pool_run(
        self, pool: Pool, *, clock: Callable[[], float], still_leader: Callable[[], bool] | None, max_failures: int
    ) -> _PoolRun:
        gate = self.budget.gate(pool.name, key=pool.budget_key)
        the_step = step.ControllerStep(
            depth=pool.depth,
            scale_set=pool.scale_set,
            heartbeats=pool.heartbeats,
            settings=pool.settings,
            clock=clock,
            protect_busy=pool.protect_busy,
            still_leader=still_leader,
            gate=gate,
            log=log.bind(pool=pool.name),
        )
        return _PoolRun(pool, the_step, gate=gate, max_failures=max_failures)

    @property
    def pool_stats(self) -> dict[str, ControllerStats]:
        """What each pool's controller did, by pool name."""
        return {run.pool.name: run.step.stats for run in self._runs}

    @property
    def stats(self) -> ControllerStats:
        """The one pool's stats, or every pool's combined (:func:`combined_stats`)."""
        if len(self._runs) == 1:
            return self._runs[0].step.stats
        return combined_stats(self.pool_stats)

    def run(self, stop: threading.Event) -> ControllerStats:
        """Loop until ``stop`` is set (or, with ``exit_when_drained``, until nothing is left to do)."""
        log.info(
            "controller_started",
            pools=[run.pool.name for run in self._runs],
            max_instances={run.pool.name: run.pool.settings.max_instances for run in self._runs},
        )
        try:
            self._loop(stop)
        finally:
            for run in self._runs:
                run.step.close()
            if self.leadership is not None:
                self.leadership.close()
        return self.stats

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.leadership is not None and not self.leadership.lead():
                wait_s = min(run.pool.settings.poll_interval_s for run in self._runs)
                for run in self._runs:
                    run.pool.metrics.standing_by(next_in_s=wait_s)
                stop.wait(wait_s)
                continue
            for run in self._runs:
                if not stop.is_set() and run.due_at <= time.monotonic():
                    run.run_round(time.monotonic())
            if all(run.gave_up is not None for run in self._runs):
                raise self._runs[-1].gave_up  # type: ignore[misc]  # every pool has one
            if all(run.drained for run in self._runs):
                log.info("controller_drained", rounds={run.pool.name: run.step.stats.rounds for run in self._runs})
                break
            stop.wait(max(0.0, min(run.due_at for run in self._runs) - time.monotonic()))


def combined_stats(by_pool: dict[str, ControllerStats]) -> ControllerStats:
    """Every pool's stats in one: counts summed, ``peak_instances`` the sum of each pool's peak, the earliest
    first scale request, decisions prefixed with their pool."""
    total = ControllerStats()
    for name, stats in by_pool.items():
        for field in dataclasses.fields(ControllerStats):
            value = getattr(stats, field.name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(total, field.name, getattr(total, field.name) + value)
        if stats.last_error:
            total.last_error = f"{name}: {stats.last_error}"
        starts = [t for t in (total.first_scale_request_at, stats.first_scale_request_at) if t is not None]
        total.first_scale_request_at = min(starts, default=None)
        total.decisions += [f"{name}: {decision}" for decision in stats.decisions]
    return total


def _drained(obs: policy.Observation) -> bool:
    """Nothing waiting, running or due later (a job given back with a delay counts as scheduled), no instance."""
    depth = obs.depth
    return depth.active == 0 and not depth.in_flight and not depth.scheduled and not obs.instances
