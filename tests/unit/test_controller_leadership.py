"""The standby controller's rules over an in-memory lease and a hand-moved clock: act only while the lease is
surely held, stop before it could have run out, resume on a late renewal, stand by while another holds it, and
fence every write right before the call.

The lease is a small fake at our own seam (``base.Lease``); the real adapters pass ``tests/contract``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import leadership, loop, step
from scalebus.settings import ControllerSettings
from tests.unit.test_controller_step import NOW, FixedDepth, LaggingScaleSet, NoHeartbeats

DURATION_S = 900.0
"""Long enough that the background renewer (every quarter of it) never fires during a test."""


@dataclass
class MemoryLease:
    """``base.Lease`` in memory: one holder at a time, a token one higher per tenure, failures on request."""

    duration_s: float = DURATION_S
    held_by: str | None = None
    token: int = 0
    renew_error: errors.BackendError | None = None
    renewals: int = 0
    released: int = 0

    def acquire(self, holder: str) -> base.LeaseGrant | None:
        if self.held_by is not None:
            return None
        self.held_by, self.token = holder, self.token + 1
        return base.LeaseGrant(holder=holder, token=self.token)

    def renew(self, grant: base.LeaseGrant) -> base.LeaseGrant:
        self.renewals += 1
        if self.renew_error is not None:
            raise self.renew_error
        if (self.held_by, self.token) != (grant.holder, grant.token):
            raise errors.LeaseLostError("taken")
        return grant

    def release(self, grant: base.LeaseGrant) -> None:
        if (self.held_by, self.token) == (grant.holder, grant.token):
            self.held_by = None
            self.released += 1

    def holder(self) -> base.LeaseHolder | None:
        return None if self.held_by is None else base.LeaseHolder(self.held_by, self.token)

    def close(self) -> None:
        """Nothing to release."""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_acts_until_two_thirds_of_the_lease_without_a_renewal(clock: Clock) -> None:
    lease = MemoryLease()
    lead = leadership.Leadership(lease, holder="a", clock=clock)
    try:
        assert lead.lead() and lead.still_leader() and lead.token == 1
        clock.now += DURATION_S * 0.66
        assert lead.still_leader()
        clock.now += DURATION_S * 0.01
        assert not lead.still_leader(), "stops well before the lease could have run out"
        assert not lead.lead(), "still holds it, but acts only once a renewal lands"
        lead.renew_now()
        assert lead.still_leader() and lead.lead() and lead.token == 1
    finally:
        lead.close()
    assert lease.released == 1 and lease.held_by is None


def test_a_failing_renewal_does_not_extend_the_lease(clock: Clock) -> None:
    lease = MemoryLease(renew_error=errors.TransientLeaseError("503"))
    lead = leadership.Leadership(lease, holder="a", clock=clock)
    try:
        assert lead.lead()
        clock.now += DURATION_S * 0.5
        lead.renew_now()
        clock.now += DURATION_S * 0.2
        assert lease.renewals == 1 and not lead.still_leader()
    finally:
        lead.close()


def test_a_lease_found_taken_ends_the_tenure_and_the_controller_stands_by(clock: Clock) -> None:
    lease = MemoryLease()
    lead = leadership.Leadership(lease, holder="a", clock=clock)
    try:
        assert lead.lead()
        lease.held_by, lease.token = "b", 2  # a's lease ran out unseen and b took it
        lead.renew_now()
        assert not lead.still_leader() and lead.token is None
        assert not lead.lead(), "b holds it"
        lease.held_by = None
        assert lead.lead() and lead.token == 3, "a new tenure, a higher token"
    finally:
        lead.close()


def _scale_out(still_leader: bool) -> tuple[LaggingScaleSet, step.ControllerStep]:
    scale_set = LaggingScaleSet()
    the_step = step.ControllerStep(
        depth=FixedDepth(active=3),
        scale_set=scale_set,
        heartbeats=NoHeartbeats(),
        settings=ControllerSettings(max_instances=5),
        clock=lambda: NOW,
        writes=step.InlineWriteRunner(),
        still_leader=lambda: still_leader,
    )
    the_step.run_round()
    return scale_set, the_step


@pytest.mark.parametrize("leading", [True, False], ids=["leader-writes", "fenced"])
def test_the_capacity_write_is_fenced_right_before_the_call(leading: bool) -> None:
    scale_set, the_step = _scale_out(leading)
    assert scale_set.writes == ([3] if leading else [])
    assert (the_step.stats.capacity_writes, the_step.stats.fenced_writes) == ((1, 0) if leading else (0, 1))


def test_a_standby_runs_no_round_until_the_lease_is_free() -> None:
    lease = MemoryLease(held_by="other", token=7)
    scale_set = LaggingScaleSet()
    controller = loop.Controller(
        [
            loop.Pool(
                depth=FixedDepth(active=2),
                scale_set=scale_set,
                heartbeats=NoHeartbeats(),
                settings=ControllerSettings(max_instances=5, poll_interval_s=0.01),
            )
        ],
        clock=lambda: NOW,
        lease=lease,
        holder="me",
    )
    stop = threading.Event()
    runner = threading.Thread(target=controller.run, args=(stop,))
    runner.start()
    try:
        stop.wait(0.2)
        assert controller.stats.rounds == 0 and scale_set.writes == []
        lease.held_by = None  # the leader released it
        for _ in range(200):
            if scale_set.writes:
                break
            stop.wait(0.01)
        assert scale_set.writes == [2] and lease.held_by == "me" and lease.token == 8
    finally:
        stop.set()
        runner.join(timeout=5)
    assert lease.held_by is None, "stopping releases the lease for the next standby"


class CountingMetrics:
    """Counts what the loop reports: a standby must still say it is alive (health, the systemd watchdog)."""

    def __init__(self) -> None:
        self.standing_by_calls = 0

    def round_done(self, obs: object, decision: object, *, next_in_s: float) -> None:
        return None

    def round_failed(self, exc: BaseException, *, next_in_s: float) -> None:
        return None

    def standing_by(self, *, next_in_s: float) -> None:
        self.standing_by_calls += 1


def test_a_standby_reports_itself_alive_while_it_waits() -> None:
    metrics = CountingMetrics()
    controller = loop.Controller(
        [
            loop.Pool(
                depth=FixedDepth(active=2),
                scale_set=LaggingScaleSet(),
                heartbeats=NoHeartbeats(),
                settings=ControllerSettings(max_instances=5, poll_interval_s=0.01),
                metrics=metrics,  # type: ignore[arg-type]
            )
        ],
        clock=lambda: NOW,
        lease=MemoryLease(held_by="other", token=7),
        holder="me",
    )
    stop = threading.Event()
    runner = threading.Thread(target=controller.run, args=(stop,))
    runner.start()
    try:
        stop.wait(0.2)
    finally:
        stop.set()
        runner.join(timeout=5)
    assert controller.stats.rounds == 0 and metrics.standing_by_calls >= 3
