"""The controller sizing a VM scale set through ``VmssScaleSet`` and the ARM fake, inside ARM's write budget.

Depth comes from the embedded SQLite queue and heartbeats from the pool's SQLite store; the scale set is the real
``azure-mgmt-compute`` client against the ARM fake over TLS. Capacity writes are counted at the fake, per decision
and per minute; minutes pass on an injected clock, so the test takes seconds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.azure import compute
from scalebus.backends.local import pool, sqlite_queue
from scalebus.controller import step
from scalebus.settings import ControllerSettings
from tests.fakes.arm_compute import ArmComputeFake

ROUND_S = 10.0
"""Six decisions a minute against a budget of four writes: the budget binds."""
BURST_ROUNDS = 12
"""Two minutes of a queue that grows every round."""
SETTLE_ROUNDS = 7
"""Seventy seconds more: the budget frees up and the next write takes the whole remaining step."""
JOBS_PER_ROUND = 1
BUDGET = ControllerSettings(max_instances=100, max_writes_per_minute=4, poll_interval_s=ROUND_S)
LIST_KIND = {"Uniform": "GET instances", "Flexible": "GET vms"}
_ids = itertools.count()


class ManualClock:
    """The controller's clock; the test moves it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Rig:
    """A controller over a fresh scale set in the ARM fake, a SQLite queue and a heartbeat store."""

    def __init__(
        self, tmp_path: Path, arm: ArmComputeFake, scale_set: compute.VmssScaleSet, scale_set_id: str
    ) -> None:
        self.arm = arm
        self.scale_set = scale_set
        self.scale_set_id = scale_set_id
        self.clock = ManualClock()
        self.queue = sqlite_queue.SqliteJobQueue(
            tmp_path / "queue.db", queue="jobs", lock_duration_s=30, max_delivery_count=5
        )
        self.heartbeats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
        self.controller = step.ControllerStep(
            depth=self.queue,
            scale_set=scale_set,
            heartbeats=self.heartbeats,
            settings=BUDGET,
            clock=self.clock,
            writes=step.InlineWriteRunner(),
        )

    def enqueue(self, count: int) -> None:
        self.queue.send([base.OutgoingMessage(f"job-{next(_ids)}", b"{}") for _ in range(count)])

    def workers_report_idle(self) -> None:
        """Every booted instance's worker says it is alive (so none looks broken)."""
        for instance_id in self.arm.instance_ids(self.scale_set_id):
            self.heartbeats.beat(base.Heartbeat(instance_id, base.WorkerState.IDLE, at=self.clock()))

    def round(self) -> int:
        """One decision; returns the capacity writes ARM received for it."""
        before = self.arm.count("PATCH scaleset")
        self.controller.run_round()
        return self.arm.count("PATCH scaleset") - before


@pytest.fixture(params=["Uniform", "Flexible"])
def rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    arm_fake: ArmComputeFake,
    vmss_adapter_factory: Callable[..., compute.VmssScaleSet],
) -> Iterator[Rig]:
    scale_set_id = arm_fake.create_scale_set(mode=request.param)
    rig = Rig(tmp_path, arm_fake, vmss_adapter_factory(scale_set_id), scale_set_id)
    yield rig
    rig.queue.close()


def most_in_any_window(times: list[float], window_s: float) -> int:
    return max((sum(1 for t in times if start <= t < start + window_s) for start in times), default=0)


def test_a_burst_stays_within_one_write_per_decision_and_the_minute_budget(rig: Rig) -> None:
    write_times: list[float] = []
    for n in range(BURST_ROUNDS + SETTLE_ROUNDS):
        if n < BURST_ROUNDS:
            rig.enqueue(JOBS_PER_ROUND)
        rig.workers_report_idle()
        writes = rig.round()
        assert writes <= 1, f"round {n}: {writes} capacity writes for one decision"
        write_times.extend([rig.clock()] * writes)
        rig.clock.advance(ROUND_S)

    assert most_in_any_window(write_times, 60.0) <= BUDGET.max_writes_per_minute
    # the budget was the binding limit, and the writes it allowed coalesced the whole burst
    assert len(write_times) < BURST_ROUNDS
    assert len(rig.arm.instance_ids(rig.scale_set_id)) == BURST_ROUNDS * JOBS_PER_ROUND
    assert rig.scale_set.get_capacity() == BURST_ROUNDS * JOBS_PER_ROUND
    assert rig.arm.count("POST delete") == 0

    stats = rig.scale_set.stats
    assert stats.calls == rig.arm.count(), "every request ARM saw is counted"
    assert stats.writes == rig.arm.writes() == len(write_times)
    assert (stats.throttled, stats.server_errors) == (0, 0)


@pytest.mark.parametrize("rig", ["Uniform"], indirect=True)
def test_throttled_calls_are_waited_out_within_one_decision_and_counted(rig: Rig) -> None:
    rig.enqueue(3)
    rig.arm.inject(LIST_KIND[rig.scale_set.orchestration_mode], 429, retry_after_s=0.5)
    rig.arm.inject("PATCH scaleset", 429, retry_after_s=1)

    requests = rig.round()

    rejected, accepted = rig.arm.request_times("PATCH scaleset")
    assert requests == 2, "one throttled attempt, one accepted write"
    assert accepted - rejected >= 1.0, "the write was sent again before Retry-After had passed"
    assert rig.controller.stats.capacity_writes == 1
    assert rig.scale_set.get_capacity() == 3
    assert rig.scale_set.stats.throttled == 2, "the throttled read and the throttled write"
    assert rig.scale_set.stats.calls == rig.arm.count()
    assert rig.round() == 0, "the next decision sees the capacity written and does not write again"


def test_protect_busy_keeps_protection_on_exactly_the_busy_instances(
    tmp_path: Path, arm_fake: ArmComputeFake, vmss_adapter_factory: Callable[..., compute.VmssScaleSet]
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode="Uniform")
    rig = Rig(tmp_path, arm_fake, vmss_adapter_factory(scale_set_id), scale_set_id)
    rig.controller = step.ControllerStep(
        depth=rig.queue,
        scale_set=rig.scale_set,
        heartbeats=rig.heartbeats,
        settings=BUDGET,
        clock=rig.clock,
        protect_busy=True,
        writes=step.InlineWriteRunner(),
    )
    rig.enqueue(2)
    rig.round()
    rig.workers_report_idle()
    busy, idle = rig.arm.instance_ids(scale_set_id)[:2]
    rig.heartbeats.beat(base.Heartbeat(busy, base.WorkerState.BUSY, at=rig.clock(), job_id="job-x"))
    rig.clock.advance(ROUND_S)
    rig.controller.run_round()
    protected = {i.instance_id: i.protected for i in rig.scale_set.list_instances()}
    assert (protected[busy], protected[idle]) == (True, False)
    rig.heartbeats.beat(base.Heartbeat(busy, base.WorkerState.IDLE, at=rig.clock()))
    rig.clock.advance(ROUND_S)
    rig.controller.run_round()
    assert not any(i.protected for i in rig.scale_set.list_instances())
    assert rig.controller.stats.protection_writes == 2
    rig.queue.close()
