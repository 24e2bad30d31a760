"""One controller round: observe → decide → apply, with the clock and the ports passed in.

The same :class:`ControllerStep` runs in production (``controller/loop.py`` calls it on a timer) and in the
simulator (``simulator/ports.py`` puts a simulated fleet behind the same ports), so what the benchmark measures
is what production runs. All judgement lives in :mod:`scalebus.controller.policy`; this module gathers the
observation (queue depth, the scale set's target capacity and instances, worker heartbeats), applies the decision
(named deletions first, then at most one capacity write), keeps ``protectFromScaleIn`` on the busy instances when
asked, tells the workers the decided idle grace (a :class:`~scalebus.backends.base.FleetHint` in the heartbeat
store, rewritten when it changes by more than ``_HINT_CHANGE`` or gets old) and logs each decision with its reason.

Writes never stall the round. A capacity write or a deletion is a long-running ARM operation (minutes while
VMs are created), so the step *starts* it on a :class:`WriteRunner` (a one-thread pool in production, simulated
time in the simulator) and keeps observing while it runs; the policy is told a write is in flight and starts no
second one. A thread was chosen over a begin/poll split of the ``ScaleSet`` port: every adapter keeps its
simple blocking call (the Azure SDK's ``begin_*().result()``, the local pool's direct call) and one place owns
the concurrency. A failing deletion (409, 403) does not stop the capacity write that follows it (the target is
raised by the deletions that did not happen, so VMSS never removes instances of its choosing), and is logged and
counted; the instances back off before the next attempt.

Given a :class:`~scalebus.controller.budget.PoolGate` (one controller running several pools), the step asks it
how many writes the budget shared with the other pools on the subscription allows before it writes; when that is
fewer than the decision makes, the policy decides again within that allowance (it knows which write matters
most) and the pool waits for its turn. A failed write that came with a ``Retry-After`` holds back every pool.

Reading the depth or the scale set failing raises our ``BackendError`` out of :meth:`ControllerStep.run_round`;
the loop backs off. A failing heartbeat store does not stop scaling: the policy then deletes no one for
silence. Each kind of failure keeps a streak (:attr:`ControllerStep.failure_streak`) that only a success of the
same kind ends, so failing rounds alternating with rounds that try nothing still add up. Publishing the hint is
best effort: workers fall back to their own ``idle_timeout_s`` without it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import budget, policy
from scalebus.settings import ControllerSettings

_log = structlog.get_logger(__name__)

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
    delete_failures: int = 0
    fenced_writes: int = 0
    """Writes not made because this controller no longer held the lease when it was about to make them."""
    capacity_failures: int = 0
    heartbeat_failures: int = 0
    last_error: str = ""
    peak_instances: int = 0
    first_scale_request_at: float | None = None
    decisions: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What one started write did: the deletions and capacity write that failed, with their errors."""

    deleted: tuple[str, ...] = ()
    delete_error: errors.BackendError | None = None
    not_deleted: tuple[str, ...] = ()
    capacity: int | None = None
    capacity_error: errors.BackendError | None = None
    fenced: bool = False
    """A call was not made: this controller had stopped leading (what is not in ``deleted``/``capacity``)."""


class PendingWrite(Protocol):
    """A write started on a :class:`WriteRunner` (``concurrent.futures.Future`` is one)."""

    def done(self) -> bool: ...

    def result(self) -> WriteOutcome: ...


class WriteRunner(Protocol):
    """Runs the step's scale-set writes off the round, one at a time."""

    def submit(self, write: Callable[[], WriteOutcome]) -> PendingWrite: ...

    def close(self) -> None:
        """Wait for the write in flight; safe to call twice."""


class ThreadWriteRunner:
    """Production's runner: one worker thread, so the round keeps observing while ARM works."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalebus-write")

    def submit(self, write: Callable[[], WriteOutcome]) -> PendingWrite:
        return self._pool.submit(write)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class InlineWriteRunner:
    """Runs the write inside the round: for scale sets whose writes return at once (the embedded process pool)
    and for tests that look at the write right after the round."""

    def submit(self, write: Callable[[], WriteOutcome]) -> PendingWrite:
        future: concurrent.futures.Future[WriteOutcome] = concurrent.futures.Future()
        future.set_result(write())
        return future

    def close(self) -> None:
        """Nothing runs in the background."""


class ControllerStep:
    """Sizes one scale set for one queue, one round per :meth:`run_round`; remembers the policy state between."""

    def __init__(
        self,
        *,
        depth: base.QueueDepth,
        scale_set: base.ScaleSet,
        heartbeats: base.HeartbeatStore,
        settings: ControllerSettings,
        clock: Callable[[], float],
        protect_busy: bool = False,
        writes: WriteRunner | None = None,
        still_leader: Callable[[], bool] | None = None,
        gate: budget.PoolGate | None = None,
        log: structlog.typing.FilteringBoundLogger = _log,
    ) -> None:
        self._depth = depth
        self._scale_set = scale_set
        self._heartbeats = heartbeats
        self._settings = settings
        self._clock = clock
        self._protect_busy = protect_busy
        self._still_leader = still_leader if still_leader is not None else _always
        """The fence: asked right before each scale-set write (the controllers' lease still held)."""
        self._gate = gate
        """The write budget shared with the controller's other pools (``None``: this pool's own alone)."""
        self._waiting = False
        """Whether the shared budget holds back a write this pool wants."""
        self._log = log
        self._state = policy.initial_state()
        self._hint: base.FleetHint | None = None
        """The last hint published."""
        self._writes = writes if writes is not None else ThreadWriteRunner()
        self._pending: PendingWrite | None = None
        self._streaks = {"delete": 0, "capacity": 0, "heartbeats": 0}
        self.stats = ControllerStats()

    @property
    def failure_streak(self) -> int:
        """The longest run of failures of one kind (deletes, capacity writes, heartbeat reads) not yet ended by
        a success of that kind."""
        return max(self._streaks.values())

    @property
    def write_in_flight(self) -> bool:
        return self._pending is not None

    def close(self) -> None:
        """Wait for the write in flight and collect it."""
        self._writes.close()
        self._collect()

    def observe(self) -> policy.Observation:
        """Read the ports. The target capacity is read before the listing, so an instance created in between is
        listed rather than missed (the policy takes the larger of the two)."""
        depth = self._depth.read_depth()
        capacity = self._scale_set.get_capacity()
        instances = self._scale_set.list_instances()
        beats, heartbeats_ok = self._read_heartbeats()
        if heartbeats_ok:
            instances = _with_views(self._scale_set, instances, beats, now=self._clock(), settings=self._settings)
        views = tuple(_view(instance, beats.get(instance.instance_id)) for instance in instances)
        return policy.Observation(
            now=self._clock(),
            depth=depth,
            capacity=capacity,
            instances=views,
            heartbeats_ok=heartbeats_ok,
            write_in_flight=self._pending is not None,
        )

    def _read_heartbeats(self) -> tuple[dict[str, base.Heartbeat], bool]:
        try:
            beats = {hb.instance_id: hb for hb in self._heartbeats.read_all()}
        except errors.BackendError as exc:
            self._failed("heartbeats", exc)
            self.stats.heartbeat_failures += 1
            return {}, False
        self._streaks["heartbeats"] = 0
        return beats, True

    def run_round(self) -> tuple[policy.Observation, policy.Decision]:
        """One round: collect a finished write, observe, decide, start the write (if any)."""
        self._collect()
        obs = self.observe()
        decision, state = policy.decide(obs, self._state, self._settings)
        if self._gate is not None:
            obs, decision, state = self._share(obs, decision, state)
        self._state = state
        self._apply(obs, decision)
        if self._protect_busy:
            self._protect(obs, set(decision.delete))
        self._publish_hint(obs.now, decision.idle_grace_s)
        self.stats.rounds += 1
        self.stats.peak_instances = max(self.stats.peak_instances, len(obs.instances))
        return obs, decision

    def _share(
        self, obs: policy.Observation, decision: policy.Decision, state: policy.PolicyState
    ) -> tuple[policy.Observation, policy.Decision, policy.PolicyState]:
        """Ask the shared budget for the writes this decision makes; when it allows fewer, decide again within
        what it allows (the policy stays the one judge of which write matters most) and wait for a turn."""
        assert self._gate is not None
        wanted = _write_count(obs, decision)
        allowed = self._gate.allowance() if wanted else None
        if allowed is not None and allowed < wanted:
            obs = replace(obs, write_allowance=allowed)
            decision, state = policy.decide(obs, self._state, self._settings)
        spent = _write_count(obs, decision)
        self._gate.settle(spent=spent, satisfied=spent >= wanted)
        if (spent < wanted) != self._waiting:  # logged as the wait starts and ends, not every round
            self._waiting = spent < wanted
            self._log.info("shared_write_budget", waiting=self._waiting, wanted=wanted, allowed=allowed)
        return obs, decision, state

    def _apply(self, obs: policy.Observation, decision: policy.Decision) -> None:
        delete, capacity = _planned(obs, decision)
        if not delete and capacity is None:
            return
        if capacity is not None and self.stats.first_scale_request_at is None:
            self.stats.first_scale_request_at = obs.now
        self.stats.decisions.append(decision.reason)
        self._log.info(
            "scale_decision",
            capacity_from=obs.capacity,
            capacity_to=decision.capacity,
            delete=list(delete[:50]),
            deletes=len(delete),
            active=obs.depth.active,
            in_flight=obs.depth.in_flight,
            reason=decision.reason,
        )
        self._pending = self._writes.submit(lambda: self._write(delete, capacity))
        self._collect()  # a write that returned at once is booked in its own round

    def _write(self, delete: tuple[str, ...], capacity: int | None) -> WriteOutcome:
        """Runs on the write runner: the deletions, then the capacity write, whatever the deletions did."""
        delete_error = None
        if delete and not self._still_leader():
            return WriteOutcome(fenced=True)
        if delete:
            try:
                self._scale_set.delete_instances(delete)
            except errors.BackendError as exc:
                delete_error = exc
        if capacity is None:
            return WriteOutcome(deleted=delete, delete_error=delete_error)
        target = capacity + len(delete) if delete_error is not None else capacity
        if not self._still_leader():
            return WriteOutcome(delete, delete_error, fenced=True)
        try:
            self._scale_set.set_capacity(target)
        except errors.BackendError as exc:
            return WriteOutcome(delete, delete_error, capacity=target, capacity_error=exc)
        return WriteOutcome(delete, delete_error, capacity=target)

    def _collect(self) -> None:
        """Book a finished write: counts, streaks, and the deletions to back off."""
        pending = self._pending
        if pending is None or not pending.done():
            return
        self._pending = None
        outcome = pending.result()
        if outcome.fenced:
            self.stats.fenced_writes += 1
            self._log.warning("write_fenced", deleted=len(outcome.deleted))
        if outcome.deleted:
            if outcome.delete_error is None:
                self.stats.deletes += len(outcome.deleted)
                self._streaks["delete"] = 0
            else:
                self.stats.delete_failures += 1
                self._failed("delete", outcome.delete_error, instances=list(outcome.deleted[:50]))
                self._state = policy.note_delete_failed(self._state, outcome.deleted, now=self._clock())
        if outcome.capacity is not None:
            if outcome.capacity_error is None:
                self.stats.capacity_writes += 1
                self._streaks["capacity"] = 0
            else:
                self.stats.capacity_failures += 1
                self._failed("capacity", outcome.capacity_error, capacity=outcome.capacity)

    def _failed(self, kind: str, exc: errors.BackendError, **context: object) -> None:
        if self._gate is not None and isinstance(exc, errors.TransientScaleSetError) and exc.retry_after_s:
            self._gate.throttled(retry_after_s=exc.retry_after_s)  # ARM said when: every pool on it waits
        self._streaks[kind] += 1
        self.stats.failures += 1
        self.stats.last_error = f"{kind}: {exc}"
        self._log.warning(
            f"{kind}_failed", error=str(exc), transient=exc.transient, streak=self._streaks[kind], **context
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
            self._log.warning("idle_grace_publish_failed", error=str(exc), transient=exc.transient)
            return
        self._hint = hint
        self.stats.hints_published += 1
        if last is None or last.idle_grace_s != idle_grace_s:
            self._log.info("idle_grace_published", idle_grace_s=round(idle_grace_s, 1))

    def _protect(self, obs: policy.Observation, deleted: set[str]) -> None:
        """Keep ``protectFromScaleIn`` on exactly the busy instances (busy by the policy's freshness rule), for
        fleets where Azure's own autoscale (which removes instances of its choosing) is also attached. An
        instance being deleted this round is left alone."""
        for view in obs.instances:
            if view.state is not base.InstanceState.RUNNING or view.instance_id in deleted:
                continue
            busy = policy.is_busy(view, obs.now, self._settings)
            if busy != view.protected and self._still_leader():
                self._scale_set.set_protection(view.instance_id, protected=busy)
                self.stats.protection_writes += 1
                self._log.info(
                    "instance_protection", instance_id=view.instance_id, protected=busy, job_id=view.job_id
                )


def _with_views(
    scale_set: base.ScaleSet,
    instances: list[base.Instance],
    beats: dict[str, base.Heartbeat],
    *,
    now: float,
    settings: ControllerSettings,
) -> list[base.Instance]:
    """Where the listing is cheap but coarse (VMSS without instance views), ask for the detailed state of the
    instances without a fresh heartbeat only: a fresh heartbeat is health whatever the scale set says. Optional:
    a failure leaves the listed states."""
    if not isinstance(scale_set, base.InstanceViews):
        return instances
    quiet = [
        i.instance_id
        for i in instances
        if i.state is not base.InstanceState.DELETING
        and ((beat := beats.get(i.instance_id)) is None or now - beat.at >= settings.heartbeat_timeout_s)
    ]
    if not quiet:
        return instances
    try:
        states = scale_set.instance_states(quiet)
    except errors.BackendError as exc:
        _log.warning("instance_views_failed", error=str(exc), transient=exc.transient)
        return instances
    return [replace(i, state=states[i.instance_id]) if i.instance_id in states else i for i in instances]


def _always() -> bool:
    return True


def _planned(obs: policy.Observation, decision: policy.Decision) -> tuple[tuple[str, ...], int | None]:
    """The deletions and the capacity write a decision makes (a target equal to the current one is no write)."""
    delete = decision.delete
    current = obs.capacity - len(delete)
    capacity = decision.capacity if decision.capacity is not None and decision.capacity != current else None
    return delete, capacity


def _write_count(obs: policy.Observation, decision: policy.Decision) -> int:
    """ARM writes the decision makes: one for the deletions, one for the capacity write."""
    delete, capacity = _planned(obs, decision)
    return int(bool(delete)) + int(capacity is not None)


def _view(instance: base.Instance, beat: base.Heartbeat | None) -> policy.InstanceView:
    return policy.InstanceView(
        instance_id=instance.instance_id,
        state=instance.state,
        created_at=instance.created_at or None,
        worker=beat.state if beat else None,
        last_beat_at=beat.at if beat else None,
        job_id=beat.job_id if beat else None,
        protected=instance.protected,
    )
