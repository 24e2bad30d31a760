"""VmssScaleSet over the real azure-mgmt-compute client, against the ARM fake on a real TLS socket."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
import structlog.testing
from azure.core.credentials import AccessToken, AccessTokenInfo

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import compute
from scalebus.controller import step
from scalebus.settings import ControllerSettings
from tests.fakes import arm_compute, rbac
from tests.fakes.arm_compute import ArmComputeFake
from tests.fakes.compute_plugin import CONTROLLER_TOKEN, StaticTokenCredential

MODES = ["Uniform", "Flexible"]
MakeAdapter = Callable[..., compute.VmssScaleSet]


@pytest.mark.parametrize("mode", MODES)
def test_detects_orchestration_mode(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(mode=mode))
    assert scale_set.orchestration_mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_set_capacity_is_one_write_polled_to_the_end(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(mode=mode))

    scale_set.set_capacity(3)

    assert arm_fake.count("PATCH scaleset") == 1
    assert arm_fake.writes() == 1
    assert arm_fake.count("GET operation") >= 1
    assert scale_set.get_capacity() == 3
    instances = scale_set.list_instances()
    assert len(instances) == 3
    assert {i.state for i in instances} == {base.InstanceState.RUNNING}
    assert all(i.created_at > time.time() - 60 for i in instances)
    stats = scale_set.stats
    assert stats.writes == 1
    assert stats.calls == arm_fake.count()


@pytest.mark.parametrize("mode", MODES)
def test_slow_provisioning_is_polled_until_instances_run(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(mode=mode, provisioning_delay_s=0.4))

    started = time.monotonic()
    scale_set.set_capacity(2)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.4
    assert arm_fake.count("PATCH scaleset") == 1
    assert arm_fake.count("GET operation") >= 2, "the operation should have been polled while in progress"
    assert [i.state for i in scale_set.list_instances()] == [base.InstanceState.RUNNING] * 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("provisioning", "power", "listed", "viewed"),
    [
        ("Creating", "starting", base.InstanceState.STARTING, None),
        ("Succeeded", "starting", base.InstanceState.RUNNING, base.InstanceState.STARTING),
        ("Succeeded", "running", base.InstanceState.RUNNING, base.InstanceState.RUNNING),
        ("Updating", "running", base.InstanceState.RUNNING, base.InstanceState.RUNNING),
        ("Deleting", "stopping", base.InstanceState.DELETING, None),
        ("Failed", "stopped", base.InstanceState.FAILED, base.InstanceState.FAILED),
        ("Failed", "running", base.InstanceState.FAILED, base.InstanceState.RUNNING),
        ("Succeeded", "deallocated", base.InstanceState.RUNNING, base.InstanceState.FAILED),
    ],
    ids=str,
)
def test_listing_maps_provisioning_and_views_add_power_state(
    mode: str,
    provisioning: str,
    power: str,
    listed: base.InstanceState,
    viewed: base.InstanceState | None,
    arm_fake: ArmComputeFake,
    vmss_adapter_factory: MakeAdapter,
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode)
    (instance_id,) = arm_fake.add_instances(scale_set_id, 1)
    arm_fake.set_instance_state(scale_set_id, instance_id, provisioning=provisioning, power=power)
    _grant_views(arm_fake)
    scale_set = vmss_adapter_factory(scale_set_id)

    (instance,) = scale_set.list_instances()
    views = scale_set.instance_states([instance_id])

    assert instance.instance_id == instance_id
    assert instance.state is listed
    assert arm_fake.expanded_listings == 0, "the listing never asks for instance views"
    assert views.get(instance_id) is viewed
    assert _view_requests(arm_fake) == (0 if viewed is None else 1), "no view where it cannot change the state"


def test_flexible_instance_ids_are_vm_names(arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter) -> None:
    scale_set_id = arm_fake.create_scale_set(mode="Flexible")
    added = arm_fake.add_instances(scale_set_id, 2)
    instances = vmss_adapter_factory(scale_set_id).list_instances()
    assert sorted(i.instance_id for i in instances) == sorted(added)
    assert all(i.instance_id == i.name and not i.instance_id.isdigit() for i in instances)
    assert arm_fake.count("GET vms") == 1 and arm_fake.count("GET instances") == 0


def test_flexible_listing_excludes_other_scale_sets(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    mine = arm_fake.create_scale_set(mode="Flexible")
    other = arm_fake.create_scale_set(mode="Flexible")
    arm_fake.add_instances(other, 2)
    (only,) = arm_fake.add_instances(mine, 1)
    assert [i.instance_id for i in vmss_adapter_factory(mine).list_instances()] == [only]


def test_a_second_call_for_the_same_capacity_waits_instead_of_writing(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(provisioning_delay_s=0.5))
    first_error: list[BaseException] = []

    def first() -> None:
        try:
            scale_set.set_capacity(2)
        except BaseException as exc:  # pragma: no cover - reported below
            first_error.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    assert arm_fake.wait_for_requests("PATCH scaleset", 1)

    scale_set.set_capacity(2)  # while the first is still provisioning
    instances_after_second = scale_set.list_instances()
    worker.join(timeout=10)

    assert not first_error
    assert arm_fake.count("PATCH scaleset") == 1
    assert [i.state for i in instances_after_second] == [base.InstanceState.RUNNING] * 2


def test_a_different_capacity_waits_for_the_write_in_flight(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(provisioning_delay_s=0.4))
    worker = threading.Thread(target=scale_set.set_capacity, args=(1,))
    worker.start()
    assert arm_fake.wait_for_requests("PATCH scaleset", 1)

    scale_set.set_capacity(3)
    worker.join(timeout=10)

    first_patch, second_patch = arm_fake.request_times("PATCH scaleset")
    assert second_patch - first_patch >= 0.4, "the second write went out before the first operation ended"
    assert scale_set.get_capacity() == 3


def test_throttled_write_waits_at_least_retry_after(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.inject("PATCH scaleset", 429, retry_after_s=1)

    scale_set.set_capacity(1)

    rejected, accepted = arm_fake.request_times("PATCH scaleset")
    assert accepted - rejected >= 1.0
    assert scale_set.get_capacity() == 1
    assert scale_set.stats.throttled == 1


def test_throttled_read_waits_at_least_retry_after(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(capacity=1))
    arm_fake.inject("GET scaleset", 429, retry_after_s=1)

    assert scale_set.get_capacity() == 1

    rejected, accepted = arm_fake.request_times("GET scaleset")
    assert accepted - rejected >= 1.0
    assert scale_set.stats.throttled == 1


def test_server_error_on_write_is_retried(arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.inject("PATCH scaleset", 500)

    scale_set.set_capacity(2)

    assert arm_fake.count("PATCH scaleset") == 2
    assert scale_set.stats.server_errors == 1
    assert scale_set.get_capacity() == 2


def test_failed_poll_resumes_polling_without_writing_again(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(provisioning_delay_s=0.2))
    arm_fake.inject("GET operation", 500)

    scale_set.set_capacity(2)

    assert arm_fake.count("PATCH scaleset") == 1
    assert [i.state for i in scale_set.list_instances()] == [base.InstanceState.RUNNING] * 2


def test_permanent_errors_are_not_retried(arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.inject("PATCH scaleset", 403)

    with pytest.raises(errors.ScaleSetError) as caught:
        scale_set.set_capacity(1)

    assert not caught.value.transient
    assert arm_fake.count("PATCH scaleset") == 1


def test_missing_scale_set_is_a_scale_set_error(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    missing = arm_fake.create_scale_set().replace("/virtualMachineScaleSets/", "/virtualMachineScaleSets/gone-")
    with pytest.raises(errors.ScaleSetError):
        vmss_adapter_factory(missing).get_capacity()


@pytest.mark.parametrize("mode", MODES)
def test_delete_instances_is_one_batch_call(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=3)
    scale_set = vmss_adapter_factory(scale_set_id)
    victims = [i.instance_id for i in scale_set.list_instances()][:2]

    scale_set.delete_instances(victims)

    assert arm_fake.count("POST delete") == 1
    assert scale_set.get_capacity() == 1
    assert len(scale_set.list_instances()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_deleting_instances_already_gone_succeeds(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    scale_set = vmss_adapter_factory(scale_set_id)
    gone, kept = (i.instance_id for i in scale_set.list_instances())
    scale_set.delete_instances([gone])

    scale_set.delete_instances([gone])  # again: already gone counts as done
    scale_set.delete_instances([gone, kept])  # a mixed batch deletes what is left

    assert scale_set.list_instances() == []
    assert scale_set.get_capacity() == 0


def test_instances_being_deleted_are_reported_deleting(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(capacity=2)
    scale_set = vmss_adapter_factory(scale_set_id)
    arm_fake.delete_delay_s = 0.3
    victim = scale_set.list_instances()[0].instance_id
    worker = threading.Thread(target=scale_set.delete_instances, args=([victim],))
    worker.start()
    assert arm_fake.wait_for_requests("POST delete", 1)

    states = {i.instance_id: i.state for i in scale_set.list_instances()}
    worker.join(timeout=10)

    assert states[victim] is base.InstanceState.DELETING
    assert victim not in {i.instance_id for i in scale_set.list_instances()}


@pytest.mark.parametrize("mode", MODES)
def test_set_protection_round_trips(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(mode=mode, capacity=2))
    busy, idle = (i.instance_id for i in scale_set.list_instances())

    scale_set.set_protection(busy, protected=True)
    assert {i.instance_id: i.protected for i in scale_set.list_instances()} == {busy: True, idle: False}
    assert arm_fake.scale_set(scale_set.resource_id).instances[busy].protected

    scale_set.set_protection(busy, protected=False)
    assert not any(i.protected for i in scale_set.list_instances())
    assert arm_fake.count("PUT instance") == 2


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "vmss-name",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/a/virtualMachines/0",
    ],
)
def test_malformed_scale_set_id_is_a_config_error(bad: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        compute.parse_scale_set_id(bad)
    assert caught.value.key == "scale_set.url"
    assert "virtualMachineScaleSets" in caught.value.fix


def test_scale_set_id_round_trips() -> None:
    text = "/subscriptions/s-1/resourceGroups/rg_1/providers/Microsoft.Compute/virtualMachineScaleSets/pool"
    ref = compute.parse_scale_set_id(text)
    assert (ref.subscription_id, ref.resource_group, ref.name) == ("s-1", "rg_1", "pool")
    assert ref.resource_id == text


# ----------------------------------------------------------------------------------------- Azure on a bad day


@pytest.mark.parametrize(
    "conflict",
    [arm_compute.CONFLICT_CONCURRENT, arm_compute.CONFLICT_MARKED_FOR_DELETION],
    ids=["concurrent-request", "marked-for-deletion"],
)
def test_a_409_conflict_is_transient_and_retried(
    conflict: tuple[str, str], arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.inject("PATCH scaleset", 409, error=conflict)

    scale_set.set_capacity(2)

    assert arm_fake.count("PATCH scaleset") == 2
    assert scale_set.get_capacity() == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [("Canceled", arm_compute.PREEMPTED), ("Failed", arm_compute.PREEMPTED)],
    ids=["canceled", "failed-preempted"],
)
def test_an_operation_ended_by_preemption_is_sent_again(
    status: str, error: tuple[str, str], arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.end_next_operation("PATCH scaleset", status, error=error)

    scale_set.set_capacity(2)

    assert arm_fake.count("PATCH scaleset") == 2
    assert scale_set.get_capacity() == 2


def test_an_operation_failed_for_good_is_not_sent_again(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.end_next_operation(
        "PATCH scaleset", "Failed", error=("QuotaExceeded", "Operation could not complete.")
    )

    with pytest.raises(errors.ScaleSetError) as caught:
        scale_set.set_capacity(2)

    assert not caught.value.transient
    assert arm_fake.count("PATCH scaleset") == 1


def test_preempted_every_time_ends_in_a_transient_error(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.end_next_operation("POST delete", "Canceled", times=10)
    (victim,) = arm_fake.add_instances(scale_set.resource_id, 1)

    with pytest.raises(errors.TransientScaleSetError, match="Canceled"):
        scale_set.delete_instances([victim])

    assert arm_fake.count("POST delete") == 3, "a bounded number of sends"


def test_a_retry_after_beyond_the_deadline_stops_at_once(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    arm_fake.inject("GET scaleset", 429, retry_after_s=600)

    started = time.monotonic()
    with pytest.raises(errors.TransientScaleSetError) as caught:
        scale_set.get_capacity()

    assert time.monotonic() - started < 5, "slept into a Retry-After longer than the policy's deadline"
    assert caught.value.retry_after_s == 600
    assert arm_fake.count("GET scaleset") == 1


@pytest.mark.parametrize("mode", MODES)
def test_instance_lists_follow_next_link(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=5)
    arm_fake.page_size = 2
    scale_set = vmss_adapter_factory(scale_set_id)
    kind = "GET vms" if mode == "Flexible" else "GET instances"
    before = arm_fake.count(kind)

    listed = scale_set.list_instances()

    assert sorted(i.instance_id for i in listed) == sorted(arm_fake.instance_ids(scale_set_id))
    assert arm_fake.count(kind) - before == 3, "5 instances in pages of 2"


def test_throttling_headers_are_reported(arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(capacity=1))
    arm_fake.ratelimit_remaining = 50

    scale_set.get_capacity()
    scale_set.get_capacity()

    assert scale_set.stats.ratelimit_remaining == 48


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-ms-ratelimit-remaining-subscription-reads": "11999"}, 11999),
        (
            {
                "x-ms-ratelimit-remaining-resource": "Microsoft.Compute/HighCostGet3Min;107,"
                "Microsoft.Compute/HighCostGet30Min;587",
                "x-ms-ratelimit-remaining-subscription-reads": "11999",
            },
            107,
        ),
    ],
    ids=["none", "subscription", "resource"],
)
def test_ratelimit_remaining_is_the_lowest_count(headers: dict[str, str], expected: int | None) -> None:
    assert compute.ratelimit_remaining(headers) == expected


@pytest.mark.parametrize("mode", MODES)
def test_views_are_bounded_per_call_and_reused(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=compute._VIEWS_PER_CALL + 5)
    _grant_views(arm_fake)
    scale_set = vmss_adapter_factory(scale_set_id)
    ids = [i.instance_id for i in scale_set.list_instances()]

    first = scale_set.instance_states(ids)
    after_first = _view_requests(arm_fake)
    second = scale_set.instance_states(ids)
    after_second = _view_requests(arm_fake)
    third = scale_set.instance_states(ids)

    assert after_first == len(first) == compute._VIEWS_PER_CALL
    assert after_second - after_first == 5, "the instances left out last time are read next"
    assert len(second) == len(third) == len(ids)
    assert _view_requests(arm_fake) == after_second, "views read within their lifetime are reused"
    assert set(third.values()) == {base.InstanceState.RUNNING}


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_view_pauses_views_and_keeps_the_listed_state(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=3)
    _deny_views(arm_fake)
    scale_set = vmss_adapter_factory(scale_set_id)
    ids = [i.instance_id for i in scale_set.list_instances()]

    with structlog.testing.capture_logs() as logs:
        first = scale_set.instance_states(ids)
        second = scale_set.instance_states(ids)

    assert first == second == {}
    assert _view_requests(arm_fake) == 1, "a role without instanceView/read: one 403, then none"
    assert [entry["event"] for entry in logs] == ["instance_views_skipped"]
    assert "403" in logs[0]["error"] and logs[0]["paused_s"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_a_low_read_budget_skips_views_and_reuses_the_listing(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    _grant_views(arm_fake)
    scale_set = vmss_adapter_factory(scale_set_id)
    scale_set.get_capacity()
    arm_fake.ratelimit_remaining = compute._HIGH_COST_GET_RESERVE
    kind = "GET vms" if mode == "Flexible" else "GET instances"

    with structlog.testing.capture_logs() as logs:
        first = scale_set.list_instances()  # answered with HighCostGet3Min below the reserve
        listings = arm_fake.count(kind)
        again = scale_set.list_instances()
        views = scale_set.instance_states([i.instance_id for i in again])

    assert scale_set.stats.high_cost_gets_remaining is not None
    assert scale_set.stats.high_cost_gets_remaining < compute._HIGH_COST_GET_RESERVE
    assert again == first
    assert arm_fake.count(kind) == listings, "the listing is reused while the budget is low"
    assert views == {} and _view_requests(arm_fake) == 0, "optional views are skipped"
    assert [e["event"] for e in logs] == ["arm_read_budget"] and logs[0]["low"] is True


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-ms-ratelimit-remaining-subscription-reads": "11999"}, None),
        (
            {
                "x-ms-ratelimit-remaining-resource": "Microsoft.Compute/HighCostGet3Min;107,"
                "Microsoft.Compute/HighCostGet30Min;87,Microsoft.Compute/GetVMScaleSet3Min;5",
                "x-ms-ratelimit-remaining-subscription-reads": "11999",
            },
            87,
        ),
    ],
    ids=["none", "subscription only", "resource"],
)
def test_high_cost_gets_remaining_reads_only_that_budget(headers: dict[str, str], expected: int | None) -> None:
    assert compute.high_cost_gets_remaining(headers) == expected


@pytest.mark.parametrize("mode", MODES)
def test_a_controller_poll_views_only_instances_without_a_fresh_heartbeat(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=4)
    arm_fake.page_size = 2
    _grant_views(arm_fake)
    scale_set = vmss_adapter_factory(scale_set_id)
    ids = sorted(arm_fake.instance_ids(scale_set_id))
    silent, dead = ids[0], ids[1]
    arm_fake.set_instance_state(scale_set_id, dead, provisioning="Succeeded", power="deallocated")
    now = time.time()
    beats = _Beats([base.Heartbeat(iid, base.WorkerState.IDLE, now) for iid in ids[2:]])
    beats.beats.append(base.Heartbeat(silent, base.WorkerState.IDLE, now - 3600))
    controller = step.ControllerStep(
        depth=_EmptyQueue(),
        scale_set=scale_set,
        heartbeats=beats,
        settings=ControllerSettings(max_instances=10),
        clock=time.time,
        writes=step.InlineWriteRunner(),
    )
    kind = "GET vms" if mode == "Flexible" else "GET instances"
    arm_fake.reset_counts()

    obs = controller.observe()

    states = {view.instance_id: view.state for view in obs.instances}
    assert states[dead] is base.InstanceState.FAILED, "the view tells a deallocated VM"
    assert states[silent] is base.InstanceState.RUNNING
    assert _view_requests(arm_fake) == 2, "views for the two without a fresh heartbeat only"
    assert arm_fake.count(kind) == 2 and arm_fake.expanded_listings == 0, "one listing (2 pages), no expand"


class _EmptyQueue:
    def read_depth(self) -> base.DepthSample:
        return base.DepthSample(0, None, 0, sampled_at=time.time(), active_includes_locked=True)

    def close(self) -> None:
        """Nothing to release."""


class _Beats:
    def __init__(self, beats: list[base.Heartbeat]) -> None:
        self.beats = beats

    def beat(self, heartbeat: base.Heartbeat) -> None:
        self.beats.append(heartbeat)

    def read_all(self) -> list[base.Heartbeat]:
        return list(self.beats)

    def forget(self, instance_id: str) -> None:
        """Not needed here."""

    def publish_hint(self, hint: base.FleetHint) -> None:
        """Not needed here."""

    def read_hint(self) -> base.FleetHint | None:
        return None

    def close(self) -> None:
        """Nothing to release."""


VIEWS_ROLE = rbac.RoleDefinition(
    "instance views",
    actions=(
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/instanceView/read",
        "Microsoft.Compute/virtualMachines/instanceView/read",
    ),
)


def _grant_views(fake: ArmComputeFake) -> None:
    """The two instanceView read actions granted on their own (the shipped controller role holds them too)."""
    assert fake.access is not None
    group = (
        f"/subscriptions/{arm_compute.DEFAULT_SUBSCRIPTION}/resourceGroups/{arm_compute.DEFAULT_RESOURCE_GROUP}"
    )
    fake.access.assign(CONTROLLER_TOKEN, VIEWS_ROLE, group)


def _deny_views(fake: ArmComputeFake) -> None:
    """The controller under an older controller role, without the two instanceView read actions."""
    assert fake.access is not None
    kept = list(fake.access._assignments)
    fake.access.clear()
    for held in kept:
        role = held.role
        if held.principal == CONTROLLER_TOKEN:
            role = dataclasses.replace(role, actions=tuple(a for a in role.actions if "instanceView" not in a))
        fake.access.assign(held.principal, role, held.scope)


def _view_requests(fake: ArmComputeFake) -> int:
    return fake.count("GET instance_view") + fake.count("GET vm_instance_view")


@pytest.mark.parametrize("mode", MODES)
def test_missing_time_created_counts_from_first_sight(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=1)
    (iid,) = arm_fake.instance_ids(scale_set_id)
    arm_fake.forget_time_created(scale_set_id, iid)
    scale_set = vmss_adapter_factory(scale_set_id)

    before = time.time()
    (first,) = scale_set.list_instances()
    (again,) = scale_set.list_instances()

    assert first.created_at >= before - 1, "an instance without timeCreated must not look ancient"
    assert again.created_at == first.created_at


def test_uniform_with_overprovision_is_refused_naming_the_setting(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(overprovision=True, capacity=1))
    assert len(scale_set.list_instances()) == 1  # reads (and self-destroy) still work

    with pytest.raises(errors.ConfigError, match="overprovision") as caught:
        scale_set.set_capacity(3)

    assert "overprovision=false" in caught.value.fix
    assert arm_fake.writes() == 0


def test_flexible_protection_survives_a_restart(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode="Flexible", capacity=2)
    busy, idle = arm_fake.instance_ids(scale_set_id)
    vmss_adapter_factory(scale_set_id).set_protection(busy, protected=True)

    restarted = vmss_adapter_factory(scale_set_id)  # a new controller process: nothing in memory
    listed = {i.instance_id: i.protected for i in restarted.list_instances()}
    gets = arm_fake.count("GET instance")
    restarted.list_instances()

    assert listed == {busy: True, idle: False}
    assert arm_fake.count("GET instance") == gets, "protection is read once per VM, not on every listing"
    restarted.set_protection(busy, protected=False)
    assert not any(i.protected for i in restarted.list_instances())


@pytest.mark.parametrize(
    ("endpoint", "scope"),
    [
        ("https://management.azure.com", "https://management.azure.com/.default"),
        ("https://management.azure.com/", "https://management.azure.com/.default"),
        ("https://management.chinacloudapi.cn", "https://management.chinacloudapi.cn/.default"),
        ("https://management.usgovcloudapi.net", "https://management.core.usgovcloudapi.net/.default"),
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443/.default"),
    ],
    ids=["public", "public-slash", "china", "us-government", "other"],
)
def test_token_scope_follows_the_arm_endpoint(endpoint: str, scope: str) -> None:
    assert compute.arm_token_scope(endpoint) == scope


def test_the_adapter_asks_for_its_endpoints_audience(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    credential = ScopeRecordingCredential()
    vmss_adapter_factory(arm_fake.create_scale_set(), credential=credential).get_capacity()
    assert credential.scopes == {f"{arm_fake.endpoint}/.default"}


# ----------------------------------------------------------------------------------------- access rules


def test_the_controller_role_allows_the_controllers_calls(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode="Flexible", capacity=2)
    scale_set = vmss_adapter_factory(scale_set_id)
    first, second = (i.instance_id for i in scale_set.list_instances())

    scale_set.set_capacity(3)
    scale_set.set_protection(first, protected=True)
    scale_set.delete_instances([second])

    assert arm_fake.access is not None and arm_fake.access.denied == []


def test_a_call_outside_the_role_is_403_authorization_failed(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    elsewhere = arm_fake.create_scale_set(resource_group="rg-someone-else")
    scale_set = vmss_adapter_factory(elsewhere)

    with pytest.raises(errors.ScaleSetError, match="403 AuthorizationFailed") as caught:
        scale_set.get_capacity()

    assert not caught.value.transient
    assert arm_fake.access is not None
    ((_, action, scope),) = arm_fake.access.denied
    assert action == "Microsoft.Compute/virtualMachineScaleSets/read"
    assert scope == elsewhere


class ScopeRecordingCredential(StaticTokenCredential):
    def __init__(self) -> None:
        super().__init__()
        self.scopes: set[str] = set()

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.scopes.update(scopes)
        return super().get_token_info(*scopes, options=options)

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.update(scopes)
        return super().get_token(*scopes, **kwargs)


# ----------------------------------------------------------------------------------------- overprovisioning, Spot


def _patch_capacity(fake: ArmComputeFake, scale_set_id: str, capacity: int) -> int:
    """A capacity PATCH as any ARM client sends it, straight to the fake (no adapter in between)."""
    token = StaticTokenCredential().get_token(f"{fake.endpoint}/.default").token
    status, _, _ = fake.handle(
        "PATCH",
        f"{scale_set_id}?api-version=2026-04-01",
        {"Authorization": f"Bearer {token}"},
        b'{"sku": {"capacity": %d}}' % capacity,
    )
    return status


def test_the_fake_boots_and_later_deletes_overprovisioned_extras(
    arm_fake: ArmComputeFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the adapter's refusal guards against: with overprovision on, a scale-out boots more VMs than asked."""
    monkeypatch.setattr(arm_fake, "overprovision_linger_s", 0.3)
    scale_set_id = arm_fake.create_scale_set(overprovision=True)

    assert _patch_capacity(arm_fake, scale_set_id, 5) == 200
    booted = arm_fake.instance_ids(scale_set_id)
    deadline = time.monotonic() + 5
    while len(arm_fake.instance_ids(scale_set_id)) > 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    kept = arm_fake.instance_ids(scale_set_id)

    assert len(booted) == 6, "one extra for five asked"
    assert len(kept) == 5 and set(kept) < set(booted)
    assert arm_fake.scale_set(scale_set_id).capacity == 5


def test_overprovision_is_refused_before_any_extra_vm_boots(
    arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arm_fake, "overprovision_linger_s", 60.0)  # extras would still be listed at the end
    scale_set_id = arm_fake.create_scale_set(overprovision=True, capacity=1)
    scale_set = vmss_adapter_factory(scale_set_id)
    before = arm_fake.instance_ids(scale_set_id)

    with pytest.raises(errors.ConfigError, match="overprovision"):
        scale_set.set_capacity(5)

    assert arm_fake.count("PATCH scaleset") == 0
    assert arm_fake.instance_ids(scale_set_id) == before
    assert [i.instance_id for i in scale_set.list_instances()] == before
    assert scale_set.get_capacity() == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_spot_instance_evicted_with_delete_is_gone(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    arm_fake.make_spot(scale_set_id, eviction_policy="Delete")
    evicted, kept = arm_fake.instance_ids(scale_set_id)
    scale_set = vmss_adapter_factory(scale_set_id)
    assert len(scale_set.list_instances()) == 2

    arm_fake.evict_spot(scale_set_id, evicted)

    assert [i.instance_id for i in scale_set.list_instances()] == [kept]
    assert scale_set.get_capacity() == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_spot_instance_being_deleted_by_eviction_is_reported_deleting(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    arm_fake.delete_delay_s = 30.0
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    arm_fake.make_spot(scale_set_id, eviction_policy="Delete")
    evicted, kept = arm_fake.instance_ids(scale_set_id)

    arm_fake.evict_spot(scale_set_id, evicted)
    states = {i.instance_id: i.state for i in vmss_adapter_factory(scale_set_id).list_instances()}

    assert states == {evicted: base.InstanceState.DELETING, kept: base.InstanceState.RUNNING}


@pytest.mark.parametrize("mode", MODES)
def test_a_spot_instance_evicted_with_deallocate_is_not_running(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    arm_fake.make_spot(scale_set_id, eviction_policy="Deallocate")
    evicted, kept = arm_fake.instance_ids(scale_set_id)
    _grant_views(arm_fake)  # only an instance view tells a deallocated VM from a running one
    scale_set = vmss_adapter_factory(scale_set_id)

    arm_fake.evict_spot(scale_set_id, evicted)
    listed = [i.instance_id for i in scale_set.list_instances()]
    states = scale_set.instance_states(listed)

    assert sorted(listed) == sorted([evicted, kept]), "a deallocated Spot VM stays in the scale set"
    assert states == {evicted: base.InstanceState.FAILED, kept: base.InstanceState.RUNNING}
    assert scale_set.get_capacity() == 2
