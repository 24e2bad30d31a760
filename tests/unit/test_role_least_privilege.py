"""The shipped pipeline role is machine-checked least privilege: everything ``scalebus image bake`` and
``scalebus rollout`` call through the ARM fake is allowed by ``docker/roles/scalebus-pipeline.json``, and every
action it grants is asked for by one of those calls or listed below with the reason it stays. (The controller and
worker roles have the same check in test_selfdestroy_azure.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scalebus.backends.azure import compute
from tests.fakes import rbac
from tests.fakes.arm_compute import DEFAULT_IMAGE, ArmComputeFake
from tests.fakes.compute_plugin import PIPELINE_TOKEN, TEST_POLLING_INTERVAL_S, StaticTokenCredential

NEW_IMAGE = DEFAULT_IMAGE.replace("/versions/1.0.0", "/versions/2.0.0")

# Granted by the pipeline role, used by no call the fake can see, each with the reason it stays.
UNUSED_BUT_KEPT = {
    "microsoft.compute/locations/capsoperations/read": (
        "Azure reports gallery image version operations at .../locations/<loc>/capsOperations/<id>; the fake "
        "serves every operation at .../operations/<id>, so only a live run polls this one"
    ),
}


def _client_options(arm: ArmComputeFake) -> dict[str, object]:
    return {
        "credential": StaticTokenCredential(PIPELINE_TOKEN),
        "arm_endpoint": arm.endpoint,
        "connection_verify": str(arm.ca_path),
        "polling_interval_s": TEST_POLLING_INTERVAL_S,
    }


@pytest.fixture
def baker(arm_fake: ArmComputeFake) -> Iterator[compute.GalleryImageBaker]:
    made = compute.GalleryImageBaker(subscription_id=DEFAULT_IMAGE.split("/")[2], **_client_options(arm_fake))  # type: ignore[arg-type]
    yield made
    made.close()


def test_the_pipeline_role_grants_no_compute_action_nothing_uses(
    arm_fake: ArmComputeFake, baker: compute.GalleryImageBaker
) -> None:
    vm_id = arm_fake.create_vm("builder-lp")
    image_id = arm_fake.create_gallery_image("scalebus", "scalebus-node")
    baker.bake(vm_id=vm_id, image_definition_id=image_id, version="9.0.0")
    baker.bake(vm_id=vm_id, image_definition_id=image_id, version="9.0.0")  # again: finds the version made
    for mode in ("Uniform", "Flexible"):
        scale_set = compute.VmssScaleSet(
            arm_fake.create_scale_set(mode=mode, capacity=1),
            **_client_options(arm_fake),  # type: ignore[arg-type]
        )
        try:
            scale_set.update_model(NEW_IMAGE)
            scale_set.set_capacity(2)
            assert {i.model for i in scale_set.list_instances()} == {DEFAULT_IMAGE, NEW_IMAGE}
        finally:
            scale_set.close()
    assert arm_fake.access is not None and arm_fake.access.denied == []

    granted = {a.lower() for a in rbac.shipped_role("scalebus-pipeline").actions}
    unused = granted - arm_fake.access.used_actions(PIPELINE_TOKEN)
    assert unused == set(UNUSED_BUT_KEPT), f"granted but never used: {sorted(unused - set(UNUSED_BUT_KEPT))}"
