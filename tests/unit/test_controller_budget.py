"""The write budget shared by a controller's pools: turns, starvation, throttling, with plain values.

The pure functions are driven round by round as the loop drives them (each pool asks, writes what it is allowed,
settles); then two real controller steps over in-memory ports share one :class:`budget.SharedBudget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import budget, step
from scalebus.settings import ControllerSettings

NOW = 10_000.0


def one_round(
    state: budget.BudgetState, pool: str, *, now: float, limit: int, wants: int = 1
) -> tuple[budget.BudgetState, int]:
    """What the step does for a pool wanting ``wants`` writes: ask, spend what is allowed, settle."""
    allowed = budget.allowance(state, pool, now=now, limit=limit)
    spent = wants if allowed is None else min(wants, allowed)
    return budget.settle(state, pool, now=now, spent=spent, satisfied=spent >= wants), spent


def test_two_pools_that_both_want_writes_take_alternate_turns() -> None:
    """One write a window (the limit is 1 and each window passes after a round of both pools): the pool asked
    second in each pass gets every other turn, not none."""
    state = budget.BudgetState()
    granted = []
    now = NOW
    for _ in range(6):
        for pool in ("a", "b"):  # the loop always asks "a" first
            state, spent = one_round(state, pool, now=now, limit=1)
            if spent:
                granted.append(pool)
        now += budget.WINDOW_S
    assert granted == ["a", "b", "a", "b", "a", "b"]


def test_a_busy_pool_cannot_starve_a_quiet_one() -> None:
    """The busy pool wants a write every round and is asked first; the quiet one wants one write once. It gets
    the next write after at most one of the busy pool's."""
    state = budget.BudgetState()
    now = NOW
    for _ in range(3):  # the busy pool spends the budget (2 a minute), rounds every 10 s
        state, _ = one_round(state, "busy", now=now, limit=2)
        now += 10
    quiet_wrote_at = None
    busy_writes_meanwhile = 0
    for _ in range(30):
        state, spent = one_round(state, "busy", now=now, limit=2)
        if quiet_wrote_at is None:
            busy_writes_meanwhile += spent
            state, quiet = one_round(state, "quiet", now=now, limit=2)
            if quiet:
                quiet_wrote_at = now
        now += 10
    assert quiet_wrote_at is not None
    assert busy_writes_meanwhile <= 1


def test_room_for_every_waiting_pool_lets_all_of_them_write() -> None:
    state = budget.BudgetState()
    state, _ = one_round(state, "a", now=NOW, limit=1)
    state, spent_b = one_round(state, "b", now=NOW, limit=1)
    assert spent_b == 0 and [name for name, _ in state.waiting] == ["b"]
    assert budget.allowance(state, "a", now=NOW + budget.WINDOW_S, limit=3) == 2, "one kept back for b"
    assert budget.allowance(state, "b", now=NOW + budget.WINDOW_S, limit=3) == 3


def test_a_pool_that_stops_asking_loses_its_place() -> None:
    state = budget.BudgetState()
    state, _ = one_round(state, "a", now=NOW, limit=1)
    state, _ = one_round(state, "gone", now=NOW, limit=1)  # held back, then its rounds fail for good
    later = NOW + budget.WAIT_STALE_S + 1
    assert budget.allowance(state, "a", now=later, limit=1) == 1


def test_without_a_cap_only_throttling_holds_writes_back() -> None:
    state = budget.BudgetState()
    assert budget.allowance(state, "a", now=NOW, limit=0) is None
    state = budget.throttled(state, now=NOW, retry_after_s=30)
    assert budget.allowance(state, "a", now=NOW + 29, limit=0) == 0
    assert budget.allowance(state, "b", now=NOW + 29, limit=5) == 0
    assert budget.allowance(state, "a", now=NOW + 30, limit=0) is None
    state = budget.throttled(state, now=NOW + 30, retry_after_s=None)
    assert budget.available(state, now=NOW + 30 + budget.THROTTLE_BACKOFF_S - 1, limit=0) == 0


def test_a_shorter_retry_after_never_shortens_a_hold() -> None:
    state = budget.throttled(budget.BudgetState(), now=NOW, retry_after_s=60)
    state = budget.throttled(state, now=NOW + 1, retry_after_s=5)
    assert state.closed_until == NOW + 60


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("local://", budget.LOCAL_KEY),
        (
            "/subscriptions/SUB-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/a",
            "subscription:sub-1",
        ),
        (
            "/subscriptions/sub-1/resourcegroups/other/providers/microsoft.compute/virtualmachinescalesets/b",
            "subscription:sub-1",
        ),
        (
            "/subscriptions/sub-2/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/a",
            "subscription:sub-2",
        ),
    ],
    ids=["local", "subscription", "same-subscription-other-case", "other-subscription"],
)
def test_the_budget_key_is_the_subscription(url: str, key: str) -> None:
    assert budget.budget_key(url) == key


# ------------------------------------------------------------------------------------------- two real steps


@dataclass
class Depth:
    active: int

    def read_depth(self) -> base.DepthSample:
        return base.DepthSample(self.active, 0, 0, sampled_at=NOW)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class ScaleSet:
    """A scale set at our port seam that records its capacity writes (and can fail them as ARM does)."""

    capacity: int = 0
    writes: list[int] = field(default_factory=list)
    fail: errors.BackendError | None = None

    def get_capacity(self) -> int:
        return self.capacity

    def list_instances(self) -> list[base.Instance]:
        return []

    def set_capacity(self, capacity: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(capacity)
        self.capacity = capacity

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        raise AssertionError("nothing is broken")

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Not asked for."""

    def close(self) -> None:
        """Nothing to release."""


class Heartbeats:
    def read_all(self) -> list[base.Heartbeat]:
        return []

    def beat(self, heartbeat: base.Heartbeat) -> None:
        raise AssertionError("the controller never beats")

    def forget(self, instance_id: str) -> None:
        """Nothing stored."""

    def publish_hint(self, hint: base.FleetHint) -> None:
        """Not read here."""

    def read_hint(self) -> base.FleetHint | None:
        return None

    def close(self) -> None:
        """Nothing to release."""


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def two_steps(
    *, limit: int, clock: Clock
) -> tuple[dict[str, ScaleSet], dict[str, Depth], list[step.ControllerStep]]:
    shared = budget.SharedBudget(limit=limit, clock=clock)
    settings = ControllerSettings(max_instances=50, max_writes_per_minute=10)
    sets, depths, steps = {}, {}, []
    for name in ("a", "b"):
        sets[name], depths[name] = ScaleSet(), Depth(0)
        steps.append(
            step.ControllerStep(
                depth=depths[name],
                scale_set=sets[name],
                heartbeats=Heartbeats(),
                settings=settings,
                clock=clock,
                writes=step.InlineWriteRunner(),
                gate=shared.gate(name, key="subscription:s"),
            )
        )
    return sets, depths, steps


def test_two_steps_on_one_subscription_share_its_cap_in_turns() -> None:
    """Both queues keep growing; the shared cap (one write a minute) binds: the writes alternate between the
    pools, and no minute holds two."""
    clock = Clock()
    sets, depths, steps = two_steps(limit=1, clock=clock)
    order: list[str] = []
    for _ in range(24):  # rounds every 10 s: four minutes
        for name, the_step in zip(("a", "b"), steps, strict=True):
            depths[name].active += 1
            before = len(sets[name].writes)
            the_step.run_round()
            order += [name] * (len(sets[name].writes) - before)
        clock.now += 10
    assert order[:4] == ["a", "b", "a", "b"]
    assert abs(order.count("a") - order.count("b")) <= 1
    assert len(order) <= 24 * 10 / budget.WINDOW_S + 1


def test_a_retry_after_seen_by_one_pool_holds_the_other_pools_writes() -> None:
    clock = Clock()
    sets, depths, steps = two_steps(limit=0, clock=clock)
    sets["a"].fail = errors.TransientScaleSetError("HTTP 429 TooManyRequests", retry_after_s=30)
    depths["a"].active = depths["b"].active = 3
    for _ in range(2):  # the noise filter confirms the rise, then a's write fails with its Retry-After
        for the_step in steps[:1]:
            the_step.run_round()
        clock.now += 3
    assert steps[0].stats.capacity_failures == 1
    steps[1].run_round()
    clock.now += 3
    _, decision = steps[1].run_round()
    assert sets["b"].writes == [], decision.reason
    assert "shared with other pools" in decision.reason
    clock.now += 30
    steps[1].run_round()
    assert sets["b"].writes == [3], "the hold ends with the Retry-After"
