"""The controller: observe → decide → apply, on a timer, until told to stop.

All judgement lives in :mod:`scalebus.controller.policy`; this module only gathers the observation (queue depth,
scale-set instances, worker heartbeats), applies the decision (named deletions first, then at most one capacity
write), tells the workers the decided idle grace (a :class:`~scalebus.backends.base.FleetHint` in the heartbeat
store, rewritten when it changes by more than ``_HINT_CHANGE`` or gets old) and logs each decision with its
reason. A failing backend is logged, counted and retried on the next round with back-off; it never stops the loop
unless it fails ``max_consecutive_failures`` rounds in a row. Only publishing the hint is best effort: workers
fall back to their own ``idle_timeout_s`` without it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import policy
from scalebus.settings import ControllerSettings

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 60.0
_HINT_CHANGE = 0.1
"""Relative change of the idle grace worth a rewrite (a forecast's grace shrinks every round)."""
_HINT_REFRESH_S = base.HINT_MAX_AGE_S / 4
"""An unchanged hint is rewritten this often, so workers can tell a live controller's hint from a stale one."""


@dataclass(slots=True)
class ControllerStats:
    """What the controller did, for the demo summary and ``-o json``."""

    rounds: int = 0
    capacity_writes: int = 0
    deletes: int = 0
    protection_writes: int = 0
    failures: int = 0
    hints_published: int = 0
    peak_instances: int = 0
    first_scale_request_at: float | None = None
    decisions: list[str] = field(default_factory=list)


class Controller:
    """Sizes one scale set for one queue."""

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
    ) -> None:
        self._depth = depth
        self._scale_set = scale_set
        self._heartbeats = heartbeats
        self._settings = settings
        self._clock = clock
        self._max_failures = max_consecutive_failures
        self._protect_busy = protect_busy
        self._state = policy.initial_state()
        self._hint: base.FleetHint | None = None
        """The last hint published."""
        self.stats = ControllerStats()

    def observe(self) -> policy.Observation:
        depth = self._depth.read_depth()
        instances = self._scale_set.list_instances()
        beats = {hb.instance_id: hb for hb in self._heartbeats.read_all()}
        views = tuple(_view(instance, beats.get(instance.instance_id)) for instance in instances)
        capacity = sum(1 for i in instances if i.state is not base.InstanceState.DELETING)
        return policy.Observation(now=self._clock(), depth=depth, capacity=capacity, instances=views)

    def step(self) -> tuple[policy.Observation, policy.Decision]:
        """One round: observe, decide, apply."""
        obs = self.observe()
        decision, self._state = policy.decide(obs, self._state, self._settings)
        self._apply(obs, decision)
        if self._protect_busy:
            self._protect(obs)
        self._publish_hint(obs.now, decision.idle_grace_s)
        self.stats.rounds += 1
        self.stats.peak_instances = max(self.stats.peak_instances, len(obs.instances))
        return obs, decision

    def _apply(self, obs: policy.Observation, decision: policy.Decision) -> None:
        changed = bool(decision.delete) or (decision.capacity is not None and decision.capacity != obs.capacity)
        if decision.delete:
            self._scale_set.delete_instances(decision.delete)
            self.stats.deletes += len(decision.delete)
        if decision.capacity is not None and decision.capacity != obs.capacity - len(decision.delete):
            self._scale_set.set_capacity(decision.capacity)
            self.stats.capacity_writes += 1
            if self.stats.first_scale_request_at is None:
                self.stats.first_scale_request_at = obs.now
        if changed:
            self.stats.decisions.append(decision.reason)
            log.info(
                "scale_decision",
                capacity_from=obs.capacity,
                capacity_to=decision.capacity,
                delete=list(decision.delete),
                active=obs.depth.active,
                in_flight=obs.depth.in_flight,
                reason=decision.reason,
            )

    def _publish_hint(self, now: float, idle_grace_s: float | None) -> None:
        """Tell the workers the idle grace. Best effort: workers fall back to their own idle timeout, so a failed
        write is logged and retried next round, never fatal to scaling."""
        if idle_grace_s is None:
            return
        last = self._hint
        if (
            last is not None
            and abs(idle_grace_s - last.idle_grace_s) <= _HINT_CHANGE * last.idle_grace_s
            and now - last.at < _HINT_REFRESH_S
        ):
            return
        hint = base.FleetHint(idle_grace_s=idle_grace_s, at=now)
        try:
            self._heartbeats.publish_hint(hint)
        except errors.BackendError as exc:
            log.warning("idle_grace_publish_failed", error=str(exc), transient=exc.transient)
            return
        self._hint = hint
        self.stats.hints_published += 1
        if last is None or last.idle_grace_s != idle_grace_s:
            log.info("idle_grace_published", idle_grace_s=round(idle_grace_s, 1))

    def _protect(self, obs: policy.Observation) -> None:
        """Keep ``protectFromScaleIn`` on exactly the busy instances, for fleets where Azure's own autoscale
        (which removes instances of its choosing) is also attached."""
        for view in obs.instances:
            if view.state is not base.InstanceState.RUNNING:
                continue
            busy = view.worker is base.WorkerState.BUSY
            if busy != view.protected:
                self._scale_set.set_protection(view.instance_id, protected=busy)
                self.stats.protection_writes += 1
                log.info("instance_protection", instance_id=view.instance_id, protected=busy, job_id=view.job_id)

    def run(self, stop: threading.Event) -> ControllerStats:
        """Loop until ``stop`` is set (or, with ``exit_when_drained``, until nothing is left to do)."""
        failures = 0
        log.info("controller_started", max_instances=self._settings.max_instances)
        while not stop.is_set():
            try:
                obs, _ = self.step()
                failures = 0
            except errors.BackendError as exc:
                failures += 1
                self.stats.failures += 1
                log.warning("controller_round_failed", error=str(exc), transient=exc.transient, failures=failures)
                if failures >= self._max_failures:
                    raise
                stop.wait(min(_MAX_BACKOFF_S, self._settings.poll_interval_s * 2**failures))
                continue
            if self._settings.exit_when_drained and _drained(obs):
                log.info("controller_drained", rounds=self.stats.rounds)
                break
            stop.wait(self._settings.poll_interval_s)
        return self.stats


def _drained(obs: policy.Observation) -> bool:
    return obs.depth.active == 0 and not obs.depth.in_flight and not obs.instances


def _view(instance: base.Instance, beat: base.Heartbeat | None) -> policy.InstanceView:
    return policy.InstanceView(
        instance_id=instance.instance_id,
        state=instance.state,
        created_at=instance.created_at,
        worker=beat.state if beat else None,
        last_beat_at=beat.at if beat else None,
        job_id=beat.job_id if beat else None,
        protected=instance.protected,
    )
