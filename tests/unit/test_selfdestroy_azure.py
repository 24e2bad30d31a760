"""Self-destroy on Azure: IMDS says who I am, the managed identity signs in, VMSS deletes only this instance.

Everything runs through the real ``azure-identity`` (``ManagedIdentityCredential``, its token from the IMDS fake)
and ``azure-mgmt-compute`` (``VmssScaleSet``, against the ARM fake over TLS), in both orchestration modes. Deletes
are counted at the ARM fake, never taken from our own bookkeeping. The last tests run ``scalebus selfdestroy`` as
a process, as the systemd unit does, with the heartbeat store in Azurite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from azure.core.credentials import TokenCredential

from scalebus import errors, settings
from scalebus.backends import base
from scalebus.backends.azure import compute, heartbeats, imds
from scalebus.backends.local import pool
from scalebus.cli import fleet as cli
from scalebus.selfdestroy import routine
from tests.fakes import rbac
from tests.fakes.arm_compute import CONFLICT_MARKED_FOR_DELETION, DEFAULT_SUBSCRIPTION, ArmComputeFake
from tests.fakes.azurite_plugin import CONNECTION_ENV, AzuriteServer
from tests.fakes.compute_plugin import TEST_POLLING_INTERVAL_S
from tests.fakes.imds import ImdsFake, VmIdentity

MODES = ["Uniform", "Flexible"]
TOKEN_PATH = "/metadata/identity/oauth2/token"
INSTANCE_PATH = "/metadata/instance"


@dataclasses.dataclass(frozen=True)
class Fleet:
    """A scale set in the ARM fake, and which of its instances "this VM" (the IMDS fake) is."""

    scale_set_id: str
    mode: str
    me: str
    others: tuple[str, ...]


def identity_of(mode: str, scale_set_id: str, instance_id: str) -> VmIdentity:
    if mode == "Uniform":
        return VmIdentity.uniform(scale_set_id, instance_id)
    return VmIdentity.flexible(scale_set_id, instance_id)


@pytest.fixture
def managed_identity(
    imds_fake: ImdsFake, arm_fake: ArmComputeFake, monkeypatch: pytest.MonkeyPatch
) -> TokenCredential:
    """The VM's managed identity; ARM accepts only the token IMDS hands out."""
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://placeholder")  # restored after the test
    arm_fake.expected_token = imds_fake.token
    return imds.managed_identity_credential(imds_endpoint=imds_fake.endpoint)


def make_fleet(arm: ArmComputeFake, imds_fake: ImdsFake, mode: str) -> Fleet:
    """Three running instances; IMDS answers as the middle one."""
    scale_set_id = arm.create_scale_set(mode=mode, capacity=3)
    first, me, last = arm.instance_ids(scale_set_id)
    imds_fake.identity = identity_of(mode, scale_set_id, me)
    return Fleet(scale_set_id, mode, me, (first, last))


@pytest.fixture(params=MODES)
def fleet(request: pytest.FixtureRequest, arm_fake: ArmComputeFake, imds_fake: ImdsFake) -> Fleet:
    return make_fleet(arm_fake, imds_fake, request.param)


@pytest.fixture
def beats(tmp_path: Path) -> pool.SqliteHeartbeatStore:
    return pool.SqliteHeartbeatStore.open(tmp_path / "beats.db")


@pytest.fixture
def destroy(
    imds_fake: ImdsFake,
    managed_identity: TokenCredential,
    vmss_adapter_factory: Callable[..., compute.VmssScaleSet],
    beats: pool.SqliteHeartbeatStore,
) -> Callable[..., routine.Result]:
    """``destroy(scale_set_id, dry_run=False)``: the routine wired as ``cli.self_destroy`` wires it on a VM."""

    def run(scale_set_id: str, *, dry_run: bool = False) -> routine.Result:
        return routine.self_destroy(
            identity=imds.ImdsIdentity(imds_fake.endpoint),
            scale_set=vmss_adapter_factory(scale_set_id, credential=managed_identity),
            scale_set_id=scale_set_id,
            heartbeats=beats,
            dry_run=dry_run,
            deadline_s=30.0,
        )

    return run


# ----------------------------------------------------------------------------------------- the routine


def test_deletes_exactly_its_own_instance(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake, imds_fake: ImdsFake
) -> None:
    tokens, lookups = imds_fake.count(TOKEN_PATH), imds_fake.count(INSTANCE_PATH)

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED
    assert result.instance_id == fleet.me
    assert routine.same_scale_set(result.scale_set, fleet.scale_set_id)
    assert arm_fake.count("POST delete") == 1
    assert sorted(arm_fake.instance_ids(fleet.scale_set_id)) == sorted(fleet.others)
    vmss = arm_fake.scale_set(fleet.scale_set_id)
    assert {vmss.instances[i].provisioning_state for i in fleet.others} == {"Succeeded"}
    assert vmss.capacity == 2
    assert imds_fake.count(INSTANCE_PATH) > lookups, "who am I must come from IMDS /metadata/instance"
    assert imds_fake.count(TOKEN_PATH) > tokens, "the ARM token must come from the IMDS token endpoint"


def test_a_second_call_succeeds_without_a_second_delete(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake
) -> None:
    first = destroy(fleet.scale_set_id)
    second = destroy(fleet.scale_set_id)

    assert first.outcome is routine.Outcome.DELETED
    assert second.outcome is routine.Outcome.ALREADY_GONE
    assert arm_fake.count("POST delete") == 1
    assert sorted(arm_fake.instance_ids(fleet.scale_set_id)) == sorted(fleet.others)


def test_an_instance_already_deleting_is_not_deleted_again(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake
) -> None:
    arm_fake.set_instance_state(fleet.scale_set_id, fleet.me, provisioning="Deleting", power="stopping")

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.ALREADY_DELETING
    assert arm_fake.count("POST delete") == 0


def test_refuses_when_imds_names_another_scale_set(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake, imds_fake: ImdsFake
) -> None:
    other_id = arm_fake.create_scale_set(mode=fleet.mode, capacity=1)
    (stranger,) = arm_fake.instance_ids(other_id)
    imds_fake.identity = identity_of(fleet.mode, other_id, stranger)

    with pytest.raises(errors.SelfDestroyRefused, match="not the configured scale set"):
        destroy(fleet.scale_set_id)

    assert arm_fake.writes() == 0
    assert len(arm_fake.instance_ids(fleet.scale_set_id)) == 3
    assert arm_fake.instance_ids(other_id) == [stranger]


def test_refuses_on_a_vm_outside_any_scale_set(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake, imds_fake: ImdsFake
) -> None:
    imds_fake.identity = VmIdentity.standalone(DEFAULT_SUBSCRIPTION, "rg-1", "lonely")

    with pytest.raises(errors.SelfDestroyRefused, match="not running in a scale set"):
        destroy(fleet.scale_set_id)

    assert arm_fake.writes() == 0


def test_refuses_while_its_worker_holds_a_job(
    fleet: Fleet,
    destroy: Callable[..., routine.Result],
    arm_fake: ArmComputeFake,
    beats: pool.SqliteHeartbeatStore,
) -> None:
    beats.beat(base.Heartbeat(fleet.me, base.WorkerState.BUSY, at=time.time(), job_id="job-7"))

    with pytest.raises(errors.SelfDestroyRefused, match="still holds job job-7"):
        destroy(fleet.scale_set_id)

    assert arm_fake.writes() == 0


def test_survives_a_429_and_waits_at_least_retry_after(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake
) -> None:
    arm_fake.inject("POST delete", 429, retry_after_s=1)

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED
    throttled, accepted = arm_fake.request_times("POST delete")
    assert accepted - throttled >= 1.0, "the delete was sent again before Retry-After had passed"
    assert sorted(arm_fake.instance_ids(fleet.scale_set_id)) == sorted(fleet.others)


def test_survives_a_500(fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake) -> None:
    arm_fake.inject("POST delete", 500)

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED
    assert arm_fake.count("POST delete") == 2
    assert sorted(arm_fake.instance_ids(fleet.scale_set_id)) == sorted(fleet.others)


def test_dry_run_deletes_nothing(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake
) -> None:
    result = destroy(fleet.scale_set_id, dry_run=True)

    assert result.outcome is routine.Outcome.DRY_RUN
    assert result.instance_id == fleet.me
    assert arm_fake.writes() == 0
    assert fleet.me in arm_fake.instance_ids(fleet.scale_set_id)
    assert len(arm_fake.instance_ids(fleet.scale_set_id)) == 3


# ----------------------------------------------------------------------------------------- the command


def selfdestroy(config: Path) -> subprocess.CompletedProcess[str]:
    """``scalebus selfdestroy`` as the systemd unit runs it (a clean IMDS variable: the command sets its own)."""
    env = {k: v for k, v in os.environ.items() if k != "AZURE_POD_IDENTITY_AUTHORITY_HOST"}
    return subprocess.run(
        [sys.executable, "-m", "scalebus", "selfdestroy", "--config", str(config), "-o", "json"],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.fixture
def command_config(
    tmp_path: Path, arm_fake: ArmComputeFake, imds_fake: ImdsFake, azurite_env: AzuriteServer
) -> Callable[[str], Path]:
    """``config(scale_set_id)``: a TOML file pointing the command at the fakes, heartbeats in Azurite."""

    def config(scale_set_id: str) -> Path:
        path = tmp_path / "scalebus.toml"
        path.write_text(
            f"""\
[scale_set]
url = "{scale_set_id}"
arm_endpoint = "{arm_fake.endpoint}"
connection_verify = "{arm_fake.ca_path}"
polling_interval_s = {TEST_POLLING_INTERVAL_S}

[identity]
imds_endpoint = "{imds_fake.endpoint}"

[storage]
account_url = "{azurite_env.blob_url}"
connection_string_env = "{CONNECTION_ENV}"
"""
        )
        return path

    return config


@pytest.mark.azurite
def test_command_deletes_itself(
    command_config: Callable[[str], Path], arm_fake: ArmComputeFake, imds_fake: ImdsFake
) -> None:
    fleet = make_fleet(arm_fake, imds_fake, "Flexible")
    arm_fake.expected_token = imds_fake.token  # ARM accepts only the managed identity's token

    result = selfdestroy(command_config(fleet.scale_set_id))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "outcome": "deleted",
        "instance_id": fleet.me,
        "scale_set": fleet.scale_set_id,
        "attempts": 1,
    }
    assert arm_fake.count("POST delete") == 1
    assert sorted(arm_fake.instance_ids(fleet.scale_set_id)) == sorted(fleet.others)
    assert "Traceback" not in result.stderr


@pytest.mark.azurite
def test_command_refuses_with_exit_2_and_one_line(
    command_config: Callable[[str], Path],
    arm_fake: ArmComputeFake,
    imds_fake: ImdsFake,
    azurite_env: AzuriteServer,
) -> None:
    fleet = make_fleet(arm_fake, imds_fake, "Uniform")
    store = heartbeats.open_heartbeats(
        azurite_env.storage_settings(), settings.ScaleSetSettings(url=fleet.scale_set_id)
    )
    store.beat(base.Heartbeat(fleet.me, base.WorkerState.BUSY, at=time.time(), job_id="job-42"))

    result = selfdestroy(command_config(fleet.scale_set_id))

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scalebus: error:") and "still holds job job-42" in lines[0]
    assert arm_fake.writes() == 0


def test_without_a_heartbeat_store_it_fails_closed(
    arm_fake: ArmComputeFake, imds_fake: ImdsFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMSS fleet keeps heartbeats in storage; unset, the busy guard cannot be checked, so nothing is deleted."""
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://placeholder")  # restored after the test
    fleet = make_fleet(arm_fake, imds_fake, "Uniform")
    cfg = settings.Settings(
        scale_set=settings.ScaleSetSettings(
            url=fleet.scale_set_id, arm_endpoint=arm_fake.endpoint, connection_verify=str(arm_fake.ca_path)
        ),
        identity=settings.IdentitySettings(imds_endpoint=imds_fake.endpoint),
    )

    with pytest.raises(errors.ConfigError, match=r"storage\.account_url"):
        cli.self_destroy(cfg, None, dry_run=False)

    assert arm_fake.count() == 0


# ----------------------------------------------------------------------------------------- shipped roles


def test_flexible_self_destroy_lists_at_resource_group_scope_under_the_worker_role(
    arm_fake: ArmComputeFake, imds_fake: ImdsFake, destroy: Callable[..., routine.Result]
) -> None:
    fleet = make_fleet(arm_fake, imds_fake, "Flexible")

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED
    assert arm_fake.access is not None and arm_fake.access.denied == []
    assert "microsoft.compute/virtualmachines/read" in arm_fake.access.used_actions(imds_fake.token)


def test_a_worker_role_scoped_to_the_scale_set_cannot_list_flexible_vms(
    arm_fake: ArmComputeFake, imds_fake: ImdsFake, destroy: Callable[..., routine.Result]
) -> None:
    """Why the worker role is assigned at the resource group: Flexible VMs are siblings of their scale set."""
    fleet = make_fleet(arm_fake, imds_fake, "Flexible")
    arm_fake.access = rbac.AccessPolicy()
    arm_fake.access.assign(imds_fake.token, rbac.shipped_role("scalebus-worker"), fleet.scale_set_id)

    with pytest.raises(errors.ScaleSetError, match="403 AuthorizationFailed") as caught:
        destroy(fleet.scale_set_id)

    assert not caught.value.transient
    assert [(a, s) for _, a, s in arm_fake.access.denied] == [
        ("Microsoft.Compute/virtualMachines/read", fleet.scale_set_id.split("/providers/")[0])
    ]
    assert arm_fake.writes() == 0


# Granted by a shipped role but used by no code path the fakes can see, each with the reason it stays.
UNUSED_BUT_KEPT = {
    "microsoft.compute/virtualmachines/delete": (
        "Flexible instances are deleted through the scale set's delete action; kept in case Azure checks the "
        "VM's own delete on that path (not documented either way)"
    ),
}


def test_the_shipped_roles_grant_no_compute_action_nothing_uses(
    arm_fake: ArmComputeFake,
    imds_fake: ImdsFake,
    destroy: Callable[..., routine.Result],
    vmss_adapter_factory: Callable[..., compute.VmssScaleSet],
) -> None:
    arm_fake.expected_token = None  # both identities call ARM here; the roles tell them apart
    for mode in MODES:
        controller = vmss_adapter_factory(arm_fake.create_scale_set(mode=mode))
        controller.set_capacity(2)
        first, second = (i.instance_id for i in controller.list_instances())
        controller.instance_states([first])  # the power state of an instance without a fresh heartbeat
        controller.set_protection(first, protected=True)
        controller.set_protection(first, protected=False)
        controller.delete_instances([second])
        assert destroy(make_fleet(arm_fake, imds_fake, mode).scale_set_id).outcome is routine.Outcome.DELETED
    assert arm_fake.access is not None and arm_fake.access.denied == []

    granted = {
        action.lower()
        for stem in ("scalebus-controller", "scalebus-worker")
        for action in rbac.shipped_role(stem).actions
        if action.lower().startswith("microsoft.compute/")
    }
    unused = granted - arm_fake.access.used_actions()
    assert unused == set(UNUSED_BUT_KEPT), f"granted but never used: {sorted(unused - set(UNUSED_BUT_KEPT))}"


# ----------------------------------------------------------------------------------------- IMDS on a bad day


def test_imds_410_after_boot_is_waited_out(
    fleet: Fleet, destroy: Callable[..., routine.Result], imds_fake: ImdsFake
) -> None:
    imds_fake.fail_next(INSTANCE_PATH, 410, times=2)

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED


def test_imds_not_ready_is_transient_not_a_refusal(
    fleet: Fleet, destroy: Callable[..., routine.Result], imds_fake: ImdsFake, arm_fake: ArmComputeFake
) -> None:
    imds_fake.fail_next(INSTANCE_PATH, 410, retry_after_s=600)

    started = time.monotonic()
    with pytest.raises(errors.TransientBackendError) as caught:
        destroy(fleet.scale_set_id)

    assert not isinstance(caught.value, errors.SelfDestroyRefused | errors.IdentityError)
    assert time.monotonic() - started < 10, "a Retry-After beyond the policy's deadline must not be slept"
    assert arm_fake.writes() == 0


def test_an_instance_marked_for_deletion_conflict_is_retried(
    fleet: Fleet, destroy: Callable[..., routine.Result], arm_fake: ArmComputeFake
) -> None:
    arm_fake.inject("POST delete", 409, error=CONFLICT_MARKED_FOR_DELETION)

    result = destroy(fleet.scale_set_id)

    assert result.outcome is routine.Outcome.DELETED
    assert arm_fake.count("POST delete") == 2
