"""Faults of what the controller observes never turn into kills, and counts mean what their source means.

Pure policy cases use plain values; step cases use small fakes at our own port seam (``backends/base.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import loop, policy, step
from scalebus.settings import ControllerSettings

NOW = 100_000.0
S = base.InstanceState
W = base.WorkerState
CFG = ControllerSettings(max_instances=50)


def view(
    iid: str,
    worker: base.WorkerState | None = W.IDLE,
    *,
    state: base.InstanceState = S.RUNNING,
    beat_age: float | None = 1.0,
    job: str | None = None,
    created_at: float | None = NOW - 900,
) -> policy.InstanceView:
    beat = None if beat_age is None else NOW - beat_age
    return policy.InstanceView(
        iid, state, created_at, worker=worker if beat else None, last_beat_at=beat, job_id=job
    )


def busy(iid: str, *, beat_age: float = 1.0) -> policy.InstanceView:
    return view(iid, W.BUSY, beat_age=beat_age, job=f"job-{iid}")


def admin(active: int, *, age: float = 0.0, now: float = NOW) -> base.DepthSample:
    """What Service Bus's admin API returns: locked messages counted as active, no in-flight count."""
    return base.DepthSample(active, None, 0, sampled_at=now - age, active_includes_locked=True)


def obs(
    depth: base.DepthSample, instances: Sequence[policy.InstanceView], *, now: float = NOW, **extra: bool
) -> policy.Observation:
    return policy.Observation(now=now, depth=depth, capacity=len(instances), instances=tuple(instances), **extra)


def decide(
    o: policy.Observation, state: policy.PolicyState | None = None
) -> tuple[policy.Decision, policy.PolicyState]:
    return policy.decide(o, state or policy.initial_state(), CFG)


# ------------------------------------------------------------------------------------------- counts


def test_ten_running_none_waiting_admin_count_asks_for_no_more() -> None:
    """The admin count of 10 is the 10 locked messages of the 10 busy workers: nothing waits."""
    fleet = [busy(f"b{n}") for n in range(10)]
    decision, _ = decide(obs(admin(10), fleet))
    assert decision.capacity is None, decision.reason
    assert decision.demand == 10


def test_admin_count_above_the_busy_jobs_is_waiting_work() -> None:
    fleet = [busy(f"b{n}") for n in range(10)]
    decision, _ = decide(obs(admin(13), fleet))
    assert decision.capacity == 13, decision.reason


def test_a_lagged_monitor_sample_counts_locked_jobs_once() -> None:
    """A sample from 2 minutes ago: 10 jobs locked then and still running, 2 waiting."""
    fleet = [busy(f"b{n}") for n in range(10)]
    _, state = decide(obs(admin(10, now=NOW - 200), fleet, now=NOW - 200))
    unfiltered = policy.Tunables(confirm_s=0.0)
    decision, _ = policy.decide(obs(admin(12, age=120), fleet), state, CFG, tunables=unfiltered)
    assert decision.capacity == 12, decision.reason


def test_a_sample_hours_old_is_not_scaled_out_on() -> None:
    decision, _ = decide(obs(admin(40, age=3 * 3600), []))
    assert decision.capacity is None
    assert "not trusted" in decision.reason


# ------------------------------------------------------------------------------------------- deletions


def test_many_workers_silent_together_are_not_deleted() -> None:
    """A heartbeat-store outage or clock skew makes every worker look silent at once."""
    fleet = [busy(f"b{n}", beat_age=120) for n in range(10)]
    decision, _ = decide(obs(admin(10), fleet))
    assert decision.delete == ()
    assert "silent together" in decision.reason


def test_silent_deletions_are_bounded_per_round() -> None:
    fleet = [view(f"ok{n}") for n in range(25)] + [view(f"mute{n}", beat_age=120) for n in range(5)]
    decision, _ = decide(obs(admin(0), fleet))
    assert len(decision.delete) == 3, "10 % of 30 listed"
    assert "wait" in decision.reason


def test_no_deletion_for_silence_when_the_heartbeat_store_failed() -> None:
    fleet = [view(f"i{n}", beat_age=None) for n in range(5)]
    decision, _ = decide(obs(admin(5), fleet, heartbeats_ok=False))
    assert decision.delete == ()
    assert decision.capacity is None, "every running instance may hold one of the 5 counted messages"


def test_a_failed_provisioning_state_with_a_fresh_heartbeat_is_healthy() -> None:
    """A VM extension failed: ARM says Failed, the worker runs and beats."""
    decision, _ = decide(obs(admin(0), [view("ext-failed", W.IDLE, state=S.FAILED)]))
    assert decision.delete == ()


@pytest.mark.parametrize("created_at", [None, 0.0], ids=["none", "zero"])
def test_a_missing_creation_time_never_ages_an_instance(created_at: float | None) -> None:
    fresh = view("new", None, beat_age=None, created_at=created_at)
    decision, state = decide(obs(admin(1), [fresh]))
    assert decision.delete == (), "first listed just now: not a never-booted instance of 1970"
    later = NOW + CFG.boot_timeout_s + 1
    decision, _ = policy.decide(obs(admin(1, now=later), [fresh], now=later), state, CFG)
    assert decision.delete == ("new",), "aged from when it was first listed"


def test_repeated_identical_boot_failures_back_off_and_say_why() -> None:
    state = policy.initial_state()
    now = NOW
    for n in range(3):
        now += 40  # each round deletes and writes: 2 of the 4 writes a minute
        failed = view(f"f{n}", None, state=S.FAILED, beat_age=None, created_at=now - 10)
        decision, state = policy.decide(obs(admin(5, now=now), [failed], now=now), state, CFG)
        assert decision.delete == (f"f{n}",)
    now += 40
    decision, state = policy.decide(obs(admin(5, now=now), [], now=now), state, CFG)
    assert decision.capacity is None
    assert "failed before their first heartbeat" in decision.reason
    now += policy.DEFAULT_TUNABLES.boot_backoff_s
    decision, _ = policy.decide(obs(admin(5, now=now), [], now=now), state, CFG)
    assert decision.capacity == 5, "the back-off ends"


def test_one_spiked_sample_writes_nothing() -> None:
    state = policy.initial_state()
    writes = []
    for n, active in enumerate((0, 0, 500, 0, 0)):
        now = NOW + 2.0 * n
        decision, state = policy.decide(obs(admin(active, now=now), [], now=now), state, CFG)
        writes.append(decision.capacity)
    assert writes == [None] * 5


def test_a_sustained_rise_is_written_after_one_confirming_poll() -> None:
    state = policy.initial_state()
    writes = []
    for n, active in enumerate((0, 30, 30)):
        now = NOW + 2.0 * n
        decision, state = policy.decide(obs(admin(active, now=now), [], now=now), state, CFG)
        writes.append(decision.capacity)
    assert writes == [None, None, 30]


def test_memory_of_past_jobs_is_bounded() -> None:
    """100,000 jobs busy last round, all finished now: only the most recent ``job_memory_max`` are kept."""
    state = replace(
        policy.initial_state(), jobs={f"done-{n}": NOW - 500.0 for n in range(100_000)}, seen_at=NOW - 2
    )
    fleet = [busy(f"b{n}") for n in range(100)]
    _, state = decide(obs(admin(100), fleet), state)
    assert len(state.jobs) == 100
    assert len(state.finished) == policy.DEFAULT_TUNABLES.job_memory_max
    assert len(state.durations) <= 2 * policy.DEFAULT_TUNABLES.arrival_memory


# ------------------------------------------------------------------------------------------- the step


@dataclass
class Depth:
    active: int = 0

    def read_depth(self) -> base.DepthSample:
        return admin(self.active)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class ScaleSet:
    """Lists what it was given; a delete fails with ``delete_error`` (409 Conflict, 403 Forbidden on ARM)."""

    listed: list[base.Instance] = field(default_factory=list)
    delete_error: errors.BackendError | None = None
    capacity_writes: list[int] = field(default_factory=list)
    protection: list[tuple[str, bool]] = field(default_factory=list)

    def get_capacity(self) -> int:
        return self.capacity_writes[-1] if self.capacity_writes else len(self.listed)

    def list_instances(self) -> list[base.Instance]:
        return list(self.listed)

    def set_capacity(self, capacity: int) -> None:
        self.capacity_writes.append(capacity)

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        if self.delete_error is not None:
            raise self.delete_error
        self.listed = [i for i in self.listed if i.instance_id not in instance_ids]

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        self.protection.append((instance_id, protected))

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class Beats:
    beats: list[base.Heartbeat] = field(default_factory=list)
    error: errors.BackendError | None = None

    def beat(self, heartbeat: base.Heartbeat) -> None:
        self.beats.append(heartbeat)

    def read_all(self) -> list[base.Heartbeat]:
        if self.error is not None:
            raise self.error
        return list(self.beats)

    def forget(self, instance_id: str) -> None:
        """Nothing to forget."""

    def publish_hint(self, hint: base.FleetHint) -> None:
        """Not looked at here."""

    def read_hint(self) -> base.FleetHint | None:
        return None

    def close(self) -> None:
        """Nothing to release."""


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_step(
    scale_set: ScaleSet,
    beats: Beats,
    *,
    active: int = 0,
    clock: Callable[[], float] = lambda: NOW,
    writes: step.WriteRunner | None = None,
    protect_busy: bool = False,
) -> step.ControllerStep:
    return step.ControllerStep(
        depth=Depth(active),
        scale_set=scale_set,
        heartbeats=beats,
        settings=CFG,
        clock=clock,
        protect_busy=protect_busy,
        writes=writes or step.InlineWriteRunner(),
    )


def broken_fleet() -> tuple[ScaleSet, Beats]:
    """One healthy idle worker and one whose provisioning failed."""
    listed = [base.Instance("ok", S.RUNNING, NOW - 900), base.Instance("bad", S.FAILED, NOW - 900)]
    beats = Beats([base.Heartbeat("ok", W.IDLE, NOW - 1)])
    return ScaleSet(listed, delete_error=errors.BackendError("delete bad: 409 Conflict")), beats


def test_a_failing_delete_does_not_block_the_capacity_write_and_is_surfaced() -> None:
    scale_set, beats = broken_fleet()
    controller = make_step(scale_set, beats, active=3)
    with structlog.testing.capture_logs() as logs:
        _, decision = controller.run_round()
    assert decision.delete == ("bad",)
    assert scale_set.capacity_writes == [4], "3 jobs need 3, 1 is serving; the undeleted one stays counted"
    assert controller.stats.delete_failures == 1
    assert "409" in controller.stats.last_error
    assert any(entry["event"] == "delete_failed" for entry in logs)


def test_failing_and_idle_rounds_alternating_still_add_up() -> None:
    scale_set, beats = broken_fleet()
    clock = Clock()
    controller = make_step(scale_set, beats, clock=clock)
    controller.run_round()
    clock.now += 2
    beats.beats = [base.Heartbeat("ok", W.IDLE, clock.now - 1)]
    _, decision = controller.run_round()
    assert decision.delete == (), "the failed delete backs off"
    clock.now += 3600
    beats.beats = [base.Heartbeat("ok", W.IDLE, clock.now - 1)]
    controller.run_round()
    assert controller.failure_streak == 2


def test_the_loop_gives_up_on_a_delete_that_always_fails() -> None:
    scale_set, beats = broken_fleet()
    ticks = iter(range(10_000))
    controller = loop.Controller(
        [
            loop.Pool(
                depth=Depth(0),
                scale_set=scale_set,
                heartbeats=beats,
                settings=CFG.model_copy(update={"poll_interval_s": 0.01, "heartbeat_timeout_s": 1e9}),
            )
        ],
        clock=lambda: NOW + 3600.0 * next(ticks),
        max_consecutive_failures=2,
    )
    with pytest.raises(errors.BackendError, match="409"):
        controller.run(threading.Event())


def test_protection_follows_the_policy_freshness_and_skips_deleted_instances() -> None:
    """Busy by a heartbeat older than the timeout is not busy: its protection comes off (these four went silent
    together, so none is deleted). The retired worker deleted in this round is left alone."""
    stale = [base.Instance(f"stale{n}", S.RUNNING, NOW - 900, protected=True) for n in range(4)]
    listed = [
        *stale,
        base.Instance("busy", S.RUNNING, NOW - 900),
        base.Instance("gone", S.RUNNING, NOW - 900, protected=True),
    ]
    beats = Beats(
        [
            *(base.Heartbeat(i.instance_id, W.BUSY, NOW - 90, f"j-{i.instance_id}") for i in stale),
            base.Heartbeat("busy", W.BUSY, NOW - 1, "j2"),
            base.Heartbeat("gone", W.DRAINING, NOW - 1),
        ]
    )
    scale_set = ScaleSet(listed)
    controller = make_step(scale_set, beats, active=5, protect_busy=True)
    _, decision = controller.run_round()
    assert decision.delete == ("gone",)
    assert sorted(scale_set.protection) == [("busy", True), *((f"stale{n}", False) for n in range(4))]


class Held:
    """A write runner whose writes run but never finish (an ARM operation still in progress)."""

    def __init__(self) -> None:
        self.started = 0

    def submit(self, write: Callable[[], step.WriteOutcome]) -> step.PendingWrite:
        self.started += 1
        outcome = write()

        class Running:
            def done(self) -> bool:
                return False

            def result(self) -> step.WriteOutcome:
                return outcome

        return Running()

    def close(self) -> None:
        """Nothing to wait for."""


def test_the_round_keeps_observing_while_a_write_runs_and_never_starts_a_second() -> None:
    runner = Held()
    depth = Depth(5)
    scale_set = ScaleSet()
    clock = Clock()
    controller = step.ControllerStep(
        depth=depth, scale_set=scale_set, heartbeats=Beats(), settings=CFG, clock=clock, writes=runner
    )
    controller.run_round()
    scale_set.capacity_writes.clear()
    depth.active = 40
    for _ in range(3):
        clock.now += 2
        _, decision = controller.run_round()
        assert decision.capacity is None
        assert "still running" in decision.reason
    assert (runner.started, controller.stats.rounds) == (1, 4)


def test_a_heartbeat_store_outage_does_not_stop_the_round_or_kill_anyone() -> None:
    listed = [base.Instance(f"i{n}", S.RUNNING, NOW - 900) for n in range(4)]
    scale_set = ScaleSet(listed)
    controller = make_step(scale_set, Beats(error=errors.TransientBackendError("table storage down")), active=6)
    obs_, decision = controller.run_round()
    assert not obs_.heartbeats_ok
    assert decision.delete == ()
    assert scale_set.capacity_writes == [6], "6 counted, 4 may be running: 2 wait"
    assert controller.stats.heartbeat_failures == 1
