"""VmssScaleSet over the real azure-mgmt-compute client, against the ARM fake on a real TLS socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import compute
from tests.fakes import arm_compute
from tests.fakes.arm_compute import ArmComputeFake
from tests.fakes.compute_plugin import StaticTokenCredential

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
    ("provisioning", "power", "expected"),
    [
        ("Creating", "starting", base.InstanceState.STARTING),
        ("Succeeded", "starting", base.InstanceState.STARTING),
        ("Succeeded", "running", base.InstanceState.RUNNING),
        ("Updating", "running", base.InstanceState.RUNNING),
        ("Deleting", "stopping", base.InstanceState.DELETING),
        ("Failed", "stopped", base.InstanceState.FAILED),
        ("Succeeded", "deallocated", base.InstanceState.FAILED),
    ],
    ids=str,
)
def test_list_maps_provisioning_and_power_state(
    mode: str,
    provisioning: str,
    power: str,
    expected: base.InstanceState,
    arm_fake: ArmComputeFake,
    vmss_adapter_factory: MakeAdapter,
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode)
    (instance_id,) = arm_fake.add_instances(scale_set_id, 1)
    arm_fake.set_instance_state(scale_set_id, instance_id, provisioning=provisioning, power=power)

    (instance,) = vmss_adapter_factory(scale_set_id).list_instances()

    assert instance.instance_id == instance_id
    assert instance.state is expected


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
def test_failed_but_running_is_running_and_deallocated_is_failed(
    mode: str, arm_fake: ArmComputeFake, vmss_adapter_factory: MakeAdapter
) -> None:
    scale_set_id = arm_fake.create_scale_set(mode=mode, capacity=2)
    running, deallocated = arm_fake.instance_ids(scale_set_id)
    arm_fake.set_instance_state(scale_set_id, running, provisioning="Failed", power="running")
    arm_fake.set_instance_state(scale_set_id, deallocated, provisioning="Succeeded", power="deallocated")

    states = {i.instance_id: i.state for i in vmss_adapter_factory(scale_set_id).list_instances()}

    assert states == {running: base.InstanceState.RUNNING, deallocated: base.InstanceState.FAILED}


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
