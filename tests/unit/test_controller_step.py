"""One controller round over in-memory ports, and the loop around it (back-off, give-up, drained exit).

The ports are small fakes at our own seam (``backends/base.py``), not SDK mocks; the real adapters pass the
contract suites in ``tests/contract``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.controller import loop, step
from scalebus.settings import ControllerSettings

NOW = 50_000.0
SETTINGS = ControllerSettings(max_instances=20, poll_interval_s=0.01)


@dataclass
class FixedDepth:
    """A depth source that reports what the test set (fresh, with an exact in-flight count)."""

    active: int = 0
    failure: errors.BackendError | None = None

    def read_depth(self) -> base.DepthSample:
        if self.failure is not None:
            raise self.failure
        return base.DepthSample(self.active, 0, 0, sampled_at=NOW)

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class LaggingScaleSet:
    """A scale set whose target capacity runs ahead of its instance listing.

    That is how VMSS behaves: a capacity write updates ``sku.capacity`` (Virtual Machine Scale Sets - Get,
    https://learn.microsoft.com/rest/api/compute/virtual-machine-scale-sets/get) at once, while the new VMs
    appear in the instance list (Virtual Machine Scale Set VMs - List) only as ARM creates them.
    """

    capacity: int = 0
    listed: list[base.Instance] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)

    def get_capacity(self) -> int:
        return self.capacity

    def list_instances(self) -> list[base.Instance]:
        return list(self.listed)

    def set_capacity(self, capacity: int) -> None:
        self.writes.append(capacity)
        self.capacity = capacity

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        raise AssertionError("nothing here is broken")

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Nothing else scales this set in."""

    def close(self) -> None:
        """Nothing to release."""


class NoHeartbeats:
    """A heartbeat store no worker has written to yet; keeps the hint it is given."""

    def __init__(self) -> None:
        self.hint: base.FleetHint | None = None

    def beat(self, heartbeat: base.Heartbeat) -> None:
        raise AssertionError("the controller never beats")

    def read_all(self) -> list[base.Heartbeat]:
        return []

    def forget(self, instance_id: str) -> None:
        """Nothing stored."""

    def publish_hint(self, hint: base.FleetHint) -> None:
        self.hint = hint

    def read_hint(self) -> base.FleetHint | None:
        return self.hint

    def close(self) -> None:
        """Nothing to release."""


def make_step(depth: FixedDepth, scale_set: LaggingScaleSet) -> step.ControllerStep:
    return step.ControllerStep(
        depth=depth,
        scale_set=scale_set,
        heartbeats=NoHeartbeats(),
        settings=SETTINGS,
        clock=lambda: NOW,
        writes=step.InlineWriteRunner(),
    )


@pytest.mark.parametrize(
    ("target", "writes"),
    [
        pytest.param(0, [4], id="nothing-written-yet-scales-out"),
        pytest.param(4, [], id="written-but-not-listed-is-not-written-again"),
        pytest.param(2, [4], id="written-in-part-tops-up-to-the-demand"),
    ],
)
def test_the_target_capacity_counts_as_supply_before_it_is_listed(target: int, writes: list[int]) -> None:
    scale_set = LaggingScaleSet(capacity=target)
    obs, _ = make_step(FixedDepth(active=4), scale_set).run_round()
    assert obs.capacity == target, "the observation carries the scale set's target, not the listed count"
    assert scale_set.writes == writes


def test_a_listing_ahead_of_the_target_is_not_provisioned_twice() -> None:
    """The other way round (the target read just before a write lands in the listing): the larger one counts."""
    listed = [base.Instance(f"i{n}", base.InstanceState.STARTING, NOW - 5) for n in range(4)]
    scale_set = LaggingScaleSet(capacity=0, listed=listed)
    make_step(FixedDepth(active=4), scale_set).run_round()
    assert scale_set.writes == []


def test_the_loop_backs_off_on_backend_errors_and_gives_up_after_the_limit() -> None:
    depth = FixedDepth(failure=errors.TransientQueueError("admin API down"))
    controller = loop.Controller(
        [
            loop.Pool(
                depth=depth,
                scale_set=LaggingScaleSet(),
                heartbeats=NoHeartbeats(),
                settings=SETTINGS,
            )
        ],
        max_consecutive_failures=3,
    )
    with pytest.raises(errors.TransientQueueError):
        controller.run(threading.Event())
    assert (controller.stats.failures, controller.stats.rounds) == (3, 0)


def test_the_loop_recovers_after_a_failed_round_and_exits_when_drained() -> None:
    class FailsOnce(FixedDepth):
        def read_depth(self) -> base.DepthSample:
            if self.failure is not None:
                failure, self.failure = self.failure, None
                raise failure
            return super().read_depth()

    controller = loop.Controller(
        [
            loop.Pool(
                depth=FailsOnce(failure=errors.TransientQueueError("blip")),
                scale_set=LaggingScaleSet(),
                heartbeats=NoHeartbeats(),
                settings=SETTINGS.model_copy(update={"exit_when_drained": True}),
            )
        ],
    )
    stats = controller.run(threading.Event())
    assert (stats.failures, stats.rounds) == (1, 1)
