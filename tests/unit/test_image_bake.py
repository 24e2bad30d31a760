"""``scalebus image bake`` over the real azure-mgmt-compute client, against the ARM fake, under the shipped
pipeline role (``docker/roles/scalebus-pipeline.json``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from scalebus import errors
from scalebus.backends.azure import compute
from scalebus.cli import app
from tests.fakes import rbac
from tests.fakes.arm_compute import ArmComputeFake
from tests.fakes.compute_plugin import (
    CONTROLLER_TOKEN,
    PIPELINE_TOKEN,
    TEST_POLLING_INTERVAL_S,
    StaticTokenCredential,
)
from tests.fakes.imds import ImdsFake


def _baker(arm: ArmComputeFake, token: str = PIPELINE_TOKEN) -> compute.GalleryImageBaker:
    return compute.GalleryImageBaker(
        subscription_id="00000000-0000-0000-0000-0000000000aa",
        credential=StaticTokenCredential(token),
        arm_endpoint=arm.endpoint,
        connection_verify=str(arm.ca_path),
        polling_interval_s=TEST_POLLING_INTERVAL_S,
    )


@pytest.fixture
def baker(arm_fake: ArmComputeFake) -> Iterator[compute.GalleryImageBaker]:
    made = _baker(arm_fake)
    yield made
    made.close()


def test_bake_deallocates_generalizes_then_captures_the_vm(
    arm_fake: ArmComputeFake, baker: compute.GalleryImageBaker
) -> None:
    vm_id = arm_fake.create_vm("builder-1")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    arm_fake.capture_delay_s = 0.2  # the version is Creating for a while: the operation is polled to its end

    baked = baker.bake(vm_id=vm_id, image_definition_id=image_id, version="1.2.0")

    assert baked.image_version_id == f"{image_id}/versions/1.2.0"
    assert baked.provisioning_state == "Succeeded"
    assert arm_fake.image_version_source(baked.image_version_id) == vm_id
    vm = arm_fake.vm(vm_id)
    assert (vm.power_state, vm.generalized) == ("deallocated", True)
    times = [arm_fake.request_times(kind)[0] for kind in ("POST vm_deallocate", "POST vm_generalize")]
    assert times == sorted(times)
    assert arm_fake.count("PUT image_version") == 1
    assert arm_fake.count("GET operation") >= 1


def test_bake_again_returns_the_version_this_vm_made(
    arm_fake: ArmComputeFake, baker: compute.GalleryImageBaker
) -> None:
    vm_id = arm_fake.create_vm("builder-2")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    first = baker.bake(vm_id=vm_id, image_definition_id=image_id, version="1.3.0")
    arm_fake.reset_counts()

    again = baker.bake(vm_id=vm_id, image_definition_id=image_id, version="1.3.0")

    assert again.image_version_id == first.image_version_id
    assert again.already_existed
    assert arm_fake.writes() == 0


def test_a_version_from_another_source_is_refused(
    arm_fake: ArmComputeFake, baker: compute.GalleryImageBaker
) -> None:
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    baker.bake(vm_id=arm_fake.create_vm("builder-3"), image_definition_id=image_id, version="1.4.0")

    with pytest.raises(errors.UserInputError, match="already exists from another source"):
        baker.bake(vm_id=arm_fake.create_vm("builder-4"), image_definition_id=image_id, version="1.4.0")


@pytest.mark.parametrize(
    ("vm", "image", "version", "message"),
    [
        pytest.param("builder", "IMAGE", "1.0.0", "--vm", id="vm-not-an-id"),
        pytest.param("VM", "/subscriptions/s/resourceGroups/r", "1.0.0", "--gallery-image", id="image-not-an-id"),
        pytest.param("VM", "IMAGE", "1.0", "MAJOR.MINOR.PATCH", id="two-part-version"),
        pytest.param("VM", "IMAGE", "v1.0.0", "MAJOR.MINOR.PATCH", id="v-prefix"),
    ],
)
def test_malformed_arguments_are_refused_before_any_request(
    arm_fake: ArmComputeFake, baker: compute.GalleryImageBaker, vm: str, image: str, version: str, message: str
) -> None:
    vm = arm_fake.create_vm("builder-5") if vm == "VM" else vm
    image = arm_fake.create_gallery_image("scalebus", "scalebus-node") if image == "IMAGE" else image
    with pytest.raises(errors.UserInputError, match=message):
        baker.bake(vm_id=vm, image_definition_id=image, version=version)
    assert arm_fake.count() == 0


def test_the_controller_role_cannot_bake(arm_fake: ArmComputeFake) -> None:
    vm_id = arm_fake.create_vm("builder-6")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    baker = _baker(arm_fake, CONTROLLER_TOKEN)
    try:
        with pytest.raises(errors.ScaleSetError, match="403"):
            baker.bake(vm_id=vm_id, image_definition_id=image_id, version="1.5.0")
    finally:
        baker.close()
    assert arm_fake.vm(vm_id).power_state == "running", "nothing was done"


def test_capture_needs_read_on_the_source_vm(arm_fake: ArmComputeFake) -> None:
    """ARM's linked access check: writing the version is not enough, the VM it names must be readable."""
    assert arm_fake.access is not None
    role = rbac.shipped_role("scalebus-pipeline")
    narrowed = rbac.RoleDefinition(
        "pipeline without VM read",
        actions=tuple(a for a in role.actions if a != "Microsoft.Compute/virtualMachines/read"),
        assignable_scopes=role.assignable_scopes,
    )
    arm_fake.access.assign("narrow-pipeline", narrowed, "/subscriptions/00000000-0000-0000-0000-0000000000aa")
    vm_id = arm_fake.create_vm("builder-7")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    baker = _baker(arm_fake, "narrow-pipeline")
    try:
        with pytest.raises(errors.ScaleSetError, match="LinkedAuthorizationFailed"):
            baker.bake(vm_id=vm_id, image_definition_id=image_id, version="1.6.0")
    finally:
        baker.close()


def test_bake_command_prints_the_image_version_id_as_json(
    arm_fake: ArmComputeFake, imds_fake: ImdsFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command as a pipeline step: ARM at the configured endpoint, the identity's token from IMDS."""
    assert arm_fake.access is not None
    arm_fake.access.assign(
        imds_fake.token,
        rbac.shipped_role("scalebus-pipeline"),
        "/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/rg-scalebus",
    )
    vm_id = arm_fake.create_vm("builder-8")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    config = tmp_path / "scalebus.toml"
    config.write_text(
        f'[scale_set]\narm_endpoint = "{arm_fake.endpoint}"\nconnection_verify = "{arm_fake.ca_path}"\n'
        f'polling_interval_s = {TEST_POLLING_INTERVAL_S}\n[identity]\nimds_endpoint = "{imds_fake.endpoint}"\n'
    )
    argv = ["image", "bake", "--vm", vm_id, "--gallery-image", image_id, "--version", "2.0.0"]

    try:
        with pytest.raises(SystemExit) as ended:
            app.main([*argv, "--config", str(config), "-o", "json"])
    finally:
        structlog.reset_defaults()  # the command configured logging onto pytest's captured stderr

    assert ended.value.code in (0, None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["image_version_id"] == f"{image_id}/versions/2.0.0"
    assert printed["source_vm_id"] == vm_id


def test_bake_command_with_a_wrong_version_is_one_line_and_exit_2(tmp_path: Path) -> None:
    vm = "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachines/v"
    image = "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/galleries/g/images/i"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalebus",
            "image",
            "bake",
            "--vm",
            vm,
            "--gallery-image",
            image,
            "--version",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCALEBUS_")},
    )
    assert result.returncode == 2
    assert "MAJOR.MINOR.PATCH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
