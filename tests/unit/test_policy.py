"""The scaling policy as a table of situations plus the invariants that must hold for any input."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebus.backends import base
from scalebus.controller import policy
from scalebus.settings import ControllerSettings

NOW = 10_000.0
UNFILTERED = policy.Tunables(confirm_s=0.0)
"""Most cases are one round: without the noise filter, whose own tests run it over rounds."""


def decide(
    obs: policy.Observation,
    state: policy.PolicyState,
    cfg: ControllerSettings,
    *,
    tunables: policy.Tunables = UNFILTERED,
) -> tuple[policy.Decision, policy.PolicyState]:
    return policy.decide(obs, state, cfg, tunables=tunables)


S = base.InstanceState
W = base.WorkerState


def running(
    iid: str, worker: base.WorkerState | None = W.IDLE, *, beat_age: float = 1.0, job: str | None = None
) -> policy.InstanceView:
    return policy.InstanceView(
        iid, S.RUNNING, created_at=NOW - 900, worker=worker, last_beat_at=NOW - beat_age, job_id=job
    )


def busy(iid: str, job: str | None = None, *, beat_age: float = 1.0) -> policy.InstanceView:
    return running(iid, W.BUSY, beat_age=beat_age, job=job or f"job-{iid}")


def starting(iid: str, *, age: float = 30.0) -> policy.InstanceView:
    return policy.InstanceView(iid, S.STARTING, created_at=NOW - age)


def failed(iid: str) -> policy.InstanceView:
    return policy.InstanceView(iid, S.FAILED, created_at=NOW - 300)


def deleting(iid: str) -> policy.InstanceView:
    return policy.InstanceView(iid, S.DELETING, created_at=NOW - 300, worker=W.IDLE, last_beat_at=NOW - 5)


def observe(
    active: int,
    in_flight: int | None = 0,
    *,
    capacity: int | None = None,
    instances: tuple[policy.InstanceView, ...] = (),
    sample_age: float = 0.0,
    now: float = NOW,
) -> policy.Observation:
    if capacity is None:
        capacity = sum(1 for view in instances if view.state is not S.DELETING)
    depth = base.DepthSample(active=active, in_flight=in_flight, dead_lettered=0, sampled_at=now - sample_age)
    return policy.Observation(now=now, depth=depth, capacity=capacity, instances=instances)


DEFAULT = ControllerSettings(max_instances=10)

CASES = [
    pytest.param(observe(0), DEFAULT, None, (), id="empty-queue-no-fleet-no-write"),
    pytest.param(observe(7), DEFAULT, 7, (), id="burst-scales-out-in-one-write"),
    pytest.param(observe(500), DEFAULT, 10, (), id="clamped-to-max-instances"),
    pytest.param(observe(0), ControllerSettings(min_instances=2), 2, (), id="min-instances-kept-on-empty-queue"),
    pytest.param(observe(9), ControllerSettings(jobs_per_instance=4), 3, (), id="jobs-per-instance-rounds-up"),
    pytest.param(observe(3, instances=(starting("a"), starting("b"), starting("c"))), DEFAULT, None, (),
                 id="starting-instances-count-as-supply"),
    pytest.param(observe(5, instances=(starting("a"), starting("b"))), DEFAULT, 5, (),
                 id="shortfall-over-starting"),
    pytest.param(observe(4, capacity=4), DEFAULT, None, (), id="capacity-written-but-not-listed-yet"),
    pytest.param(observe(2, 3, instances=(busy("a"), busy("b"), busy("c"))), DEFAULT, 5, (),
                 id="in-flight-counts-as-demand"),
    pytest.param(observe(2, None, instances=(busy("a"), busy("b"), running("c"))), DEFAULT, 4, (),
                 id="in-flight-unknown-taken-from-busy-heartbeats"),
    pytest.param(observe(0, instances=tuple(running(f"i{n}") for n in range(5))), DEFAULT, None, (),
                 id="never-lowers-capacity-idle-workers-retire-themselves"),
    pytest.param(observe(0, capacity=12, instances=tuple(busy(f"i{n}") for n in range(12))), DEFAULT, None, (),
                 id="above-max-is-not-lowered"),
    pytest.param(observe(2, 1, instances=(busy("a"), failed("f"))), DEFAULT, 3, ("f",),
                 id="failed-deleted-and-replaced"),
    pytest.param(observe(0, instances=(starting("slow", age=601),)), DEFAULT, None, ("slow",),
                 id="starting-past-boot-timeout-deleted"),
    pytest.param(observe(1, instances=(starting("ok", age=599),)), DEFAULT, None, (),
                 id="starting-within-boot-timeout-kept"),
    pytest.param(observe(0, instances=(running("mute", beat_age=61),)), DEFAULT, None, ("mute",),
                 id="running-silent-past-heartbeat-timeout-deleted"),
    pytest.param(observe(0, instances=(running("new", None),)), DEFAULT, None, (),
                 id="running-never-heard-within-boot-timeout-kept"),
    pytest.param(observe(0, 1, instances=(busy("b", beat_age=59),)), DEFAULT, None, (),
                 id="busy-within-heartbeat-timeout-kept"),
    pytest.param(observe(0, 1, instances=(replace(busy("b"), state=S.FAILED),)), DEFAULT, None, (),
                 id="failed-but-busy-never-deleted"),
    pytest.param(observe(0, 1, instances=(replace(busy("b"), state=S.STARTING, created_at=NOW - 9999),)),
                 DEFAULT, None, (), id="starting-too-long-but-busy-never-deleted"),
    pytest.param(observe(1, instances=(deleting("d"),), capacity=0), DEFAULT, 1, (),
                 id="deleting-instances-are-not-supply"),
]  # fmt: skip


@pytest.mark.parametrize(("obs", "cfg", "capacity", "delete"), CASES)
def test_decision_table(
    obs: policy.Observation,
    cfg: ControllerSettings,
    capacity: int | None,
    delete: tuple[str, ...],
) -> None:
    decision, _ = decide(obs, policy.initial_state(), cfg)
    assert (decision.capacity, decision.delete) == (capacity, delete)
    assert decision.reason


def test_write_budget_defers_then_writes_whole_step() -> None:
    cfg = ControllerSettings(max_writes_per_minute=2, max_instances=50)
    state = policy.initial_state()
    written = []
    for step, active in enumerate((1, 2, 3, 9)):
        capacity = written[-1] if written else 0
        decision, state = decide(observe(active, capacity=capacity, now=NOW + step), state, cfg)
        written.append(decision.capacity if decision.capacity is not None else capacity)
        if step == 2:
            assert decision.capacity is None
            assert "budget" in decision.reason
    assert written == [1, 2, 2, 2]
    decision, state = decide(observe(9, capacity=2, now=NOW + 61), state, cfg)
    assert decision.capacity == 9


def test_stale_sample_does_not_count_jobs_started_since() -> None:
    """A Monitor sample from two minutes ago still shows jobs that workers have taken since."""
    state = policy.initial_state()
    idle = tuple(running(f"i{n}") for n in range(3))
    _, state = decide(observe(0, None, instances=idle, now=NOW - 100), state, DEFAULT)
    took = (busy("i0", "j1"), busy("i1", "j2"), busy("i2", "j3"))
    decision, _ = decide(observe(3, None, instances=took, sample_age=120), state, DEFAULT)
    assert decision.capacity is None, decision.reason


def test_fresh_sample_counts_everything_waiting() -> None:
    state = policy.initial_state()
    took = (busy("i0", "j1"), busy("i1", "j2"), busy("i2", "j3"))
    decision, _ = decide(observe(3, None, instances=took), state, DEFAULT)
    assert decision.capacity == 6


def test_reason_names_the_deletion() -> None:
    decision, _ = decide(observe(0, instances=(failed("vm-7"),)), policy.initial_state(), DEFAULT)
    assert "vm-7" in decision.reason


# --------------------------------------------------------------------------------------------- properties

views = st.builds(
    policy.InstanceView,
    instance_id=st.uuids().map(str),
    state=st.sampled_from(list(S)),
    created_at=st.floats(NOW - 2000, NOW),
    worker=st.none() | st.sampled_from(list(W)),
    last_beat_at=st.none() | st.floats(NOW - 200, NOW),
    job_id=st.none() | st.uuids().map(str),
)
fleets = st.lists(views, max_size=12, unique_by=lambda v: v.instance_id).map(tuple)
configs = st.builds(
    ControllerSettings,
    min_instances=st.integers(0, 5),
    max_instances=st.integers(5, 40),
    jobs_per_instance=st.integers(1, 4),
    max_writes_per_minute=st.integers(1, 6),
)
observations = st.builds(
    observe,
    active=st.integers(0, 1000),
    in_flight=st.none() | st.integers(0, 50),
    capacity=st.integers(0, 40),
    instances=fleets,
    sample_age=st.floats(0, 300),
)


@given(obs=observations, cfg=configs)
def test_capacity_within_bounds(obs: policy.Observation, cfg: ControllerSettings) -> None:
    decision, _ = decide(obs, policy.initial_state(), cfg)
    if decision.capacity is not None:
        assert cfg.min_instances <= decision.capacity <= cfg.max_instances


@given(obs=observations, cfg=configs)
def test_never_deletes_a_busy_instance(obs: policy.Observation, cfg: ControllerSettings) -> None:
    decision, _ = decide(obs, policy.initial_state(), cfg)
    for view in obs.instances:
        fresh = view.last_beat_at is not None and obs.now - view.last_beat_at < cfg.heartbeat_timeout_s
        if view.worker is W.BUSY and fresh:
            assert view.instance_id not in decision.delete


@given(obs=observations, cfg=configs, more=st.integers(0, 500))
def test_monotone_in_demand(obs: policy.Observation, cfg: ControllerSettings, more: int) -> None:
    bigger = replace(obs, depth=replace(obs.depth, active=obs.depth.active + more))
    low, _ = decide(obs, policy.initial_state(), cfg)
    high, _ = decide(bigger, policy.initial_state(), cfg)

    def after(decision: policy.Decision) -> int:
        return decision.capacity if decision.capacity is not None else obs.capacity - len(decision.delete)

    assert after(high) >= after(low)
    assert high.delete == low.delete


healthy = st.lists(st.sampled_from(["busy", "idle", "starting", "deleting"]), max_size=10).map(
    lambda kinds: tuple(
        {"busy": busy, "idle": running, "starting": starting, "deleting": deleting}[kind](f"i{n}")
        for n, kind in enumerate(kinds)
    )
)


@settings(max_examples=50)
@given(active=st.integers(0, 200), in_flight=st.none() | st.integers(0, 10), fleet=healthy, cfg=configs)
def test_no_oscillation_on_constant_input(
    active: int, in_flight: int | None, fleet: tuple[policy.InstanceView, ...], cfg: ControllerSettings
) -> None:
    """The same queue and fleet, round after round: at most one write, and capacity never goes down."""
    state = policy.initial_state()
    capacity = sum(1 for view in fleet if view.state is not S.DELETING)
    writes = []
    for step in range(30):
        obs = observe(active, in_flight, capacity=capacity, instances=fleet, now=NOW + 2.0 * step)
        decision, state = decide(obs, state, cfg)
        if decision.capacity is not None:
            assert decision.capacity >= capacity
            writes.append(decision.capacity)
            capacity = decision.capacity
    assert len(writes) <= 1


# --------------------------------------------------------------------------------------------- user knobs


def arrived_every(gap_s: float, count: int, *, last_at: float = NOW) -> policy.PolicyState:
    """A state that has seen ``count`` arrivals ``gap_s`` apart, the last one at ``last_at``."""
    return replace(policy.initial_state(), arrivals=tuple(last_at - gap_s * n for n in reversed(range(count))))


@pytest.mark.parametrize(
    ("state", "cfg", "grace"),
    [
        pytest.param(policy.initial_state(), DEFAULT, 5.0, id="nothing-seen-min-grace"),
        pytest.param(arrived_every(20, 4), DEFAULT, 30.0, id="frequent-arrivals-wait-one-and-a-half-gaps"),
        pytest.param(arrived_every(20, 4), ControllerSettings(idle_grace_min_s=60), 60.0, id="min-raises-it"),
        pytest.param(arrived_every(200, 4), ControllerSettings(idle_grace_max_s=100), 100.0, id="max-caps-it"),
        pytest.param(arrived_every(600, 3), DEFAULT, 5.0, id="gap-beyond-two-boots-retire-at-once"),
        pytest.param(arrived_every(600, 3), ControllerSettings(boot_estimate_s=400), 900.0,
                     id="slower-boot-makes-waiting-pay"),
    ],
)  # fmt: skip
def test_idle_grace_follows_the_settings(state: policy.PolicyState, cfg: ControllerSettings, grace: float) -> None:
    decision, _ = decide(observe(0), state, cfg)
    assert decision.idle_grace_s == grace


@pytest.mark.parametrize(
    ("cfg", "capacity", "grace"),
    [
        pytest.param(DEFAULT, 1, 160.0, id="periodic-job-due-boots-a-worker-to-wait-for-it"),
        pytest.param(ControllerSettings(prewarm=False), None, 5.0, id="prewarm-off"),
        pytest.param(ControllerSettings(prewarm_lead_s=60), None, 5.0, id="not-yet-within-the-lead"),
        pytest.param(ControllerSettings(idle_grace_max_s=100), 1, 100.0, id="forecast-wait-capped-by-max"),
    ],
)
def test_prewarm_for_periodic_arrivals(cfg: ControllerSettings, capacity: int | None, grace: float) -> None:
    """Jobs every 600 s, the next due in 100 s: a worker is booted ahead of it (lead 240 s by default)."""
    state = arrived_every(600, 4, last_at=NOW - 500)
    decision, _ = decide(observe(0), state, cfg)
    assert (decision.capacity, decision.idle_grace_s) == (capacity, grace)


@pytest.mark.parametrize(
    ("cfg", "capacity"),
    [
        pytest.param(DEFAULT, None, id="busy-fleet-absorbs-the-waiting-jobs"),
        pytest.param(ControllerSettings(absorb_factor=0), 8, id="absorb-off-every-job-gets-a-vm"),
        pytest.param(ControllerSettings(boot_estimate_s=10, absorb_factor=1.0), 5, id="fast-boot-absorbs-less"),
    ],
)
def test_absorb_factor(cfg: ControllerSettings, capacity: int | None) -> None:
    """Three busy workers on 10 s jobs, five jobs waiting: within a 120 s boot the busy ones start them all."""
    state = replace(policy.initial_state(), durations=(10.0,) * 5)
    fleet = (busy("a"), busy("b"), busy("c"))
    decision, _ = decide(observe(5, 3, instances=fleet), state, cfg)
    assert decision.capacity == capacity, decision.reason


def test_idle_grace_bounds_are_validated() -> None:
    from scalebus import errors
    from scalebus import settings as settings_module

    with pytest.raises(errors.ConfigError, match=r"controller\.idle_grace_max_s"):
        settings_module.load(
            environ={"SCALEBUS_CONTROLLER__IDLE_GRACE_MIN_S": "60", "SCALEBUS_CONTROLLER__IDLE_GRACE_MAX_S": "30"}
        )


@pytest.mark.parametrize(
    ("age", "capacity"),
    [
        pytest.param(290.0, None, id="jobs-about-to-end-absorb-the-waiting"),
        pytest.param(0.0, 5, id="fresh-jobs-absorb-nothing"),
        pytest.param(400.0, 5, id="older-than-all-learned-taken-as-memoryless"),
    ],
)
def test_absorb_weighs_how_long_the_busy_jobs_have_run(age: float, capacity: int | None) -> None:
    """Jobs take 300 s; three busy, two waiting, a boot is 120 s. Near their end the busy workers start the
    waiting jobs within a boot; just started (or past every duration seen) they will not: the jobs get VMs."""
    seen = {f"job-{iid}": NOW - age for iid in "abc"}
    state = replace(policy.initial_state(), durations=(300.0,) * 5, jobs=seen)
    decision, _ = decide(observe(2, 3, instances=(busy("a"), busy("b"), busy("c"))), state, DEFAULT)
    assert decision.capacity == capacity, decision.reason


@pytest.mark.parametrize(
    ("busy_count", "grace"),
    [
        pytest.param(0, 150.0, id="nothing-busy-wait-one-and-a-half-gaps"),
        pytest.param(1, 225.0, id="arrivals-outpace-completions-wait-for-the-surplus"),
        pytest.param(2, 5.0, id="surplus-arrives-too-rarely-retire"),
        pytest.param(3, 5.0, id="completions-keep-up-idle-workers-retire"),
    ],
)
def test_idle_grace_counts_the_workers_about_to_free_up(busy_count: int, grace: float) -> None:
    """A job every 100 s, jobs take 300 s: each busy worker frees up every 300 s, and an idle worker is
    needed only for the arrivals the busy ones do not take (1/100 − busy/300 per second)."""
    state = replace(arrived_every(100, 4, last_at=NOW - 100), durations=(300.0,) * 5)
    fleet = tuple(busy(f"b{n}") for n in range(busy_count))
    decision, _ = decide(observe(0, busy_count, instances=fleet), state, DEFAULT)
    assert decision.idle_grace_s == pytest.approx(grace)
