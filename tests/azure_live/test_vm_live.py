"""IMDS, Scheduled Events and self-destroy, run on a worker VM of a real scale set (opt-in: ``--azure-live``).

Environment: ``SCALEBUS_LIVE_ON_VM=1`` (these tests must run *on* a scale-set instance: IMDS answers only there)
and ``SCALEBUS_LIVE_VMSS_ID`` (the scale set's ARM resource id). The VM's managed identity needs the shipped
``docker/roles/scalebus-worker.json`` at the resource group. Self-destroy runs as a dry run: nothing is deleted.
"""

from __future__ import annotations

import os

import pytest

from scalebus.backends.azure import compute, imds, scheduled_events
from scalebus.selfdestroy import routine

pytestmark = pytest.mark.azure_live


@pytest.fixture
def scale_set_id() -> str:
    if os.environ.get("SCALEBUS_LIVE_ON_VM") != "1" or not os.environ.get("SCALEBUS_LIVE_VMSS_ID"):
        pytest.skip("run on a scale-set instance with SCALEBUS_LIVE_ON_VM=1 and SCALEBUS_LIVE_VMSS_ID set")
    return os.environ["SCALEBUS_LIVE_VMSS_ID"]


def test_imds_names_this_scale_set(scale_set_id: str) -> None:
    me = imds.ImdsIdentity().whoami()
    assert routine.same_scale_set(me.scale_set, scale_set_id)
    assert me.instance_id


def test_scheduled_events_answer_for_this_vm(scale_set_id: str) -> None:
    me = imds.ImdsIdentity().whoami()
    source = scheduled_events.ImdsNoticeSource(vm_name=me.name, timeout_s=130)  # the first call may take 2 min
    assert isinstance(source.pending(), list)
    assert source.incarnation is not None


def test_self_destroy_dry_run_under_the_worker_role(scale_set_id: str) -> None:
    scale_set = compute.VmssScaleSet(scale_set_id, credential=imds.managed_identity_credential())
    try:
        result = routine.self_destroy(
            identity=imds.ImdsIdentity(),
            scale_set=scale_set,
            scale_set_id=scale_set_id,
            heartbeats=None,
            dry_run=True,
        )
    finally:
        scale_set.close()
    assert result.outcome is routine.Outcome.DRY_RUN
    assert scale_set.stats.writes == 0
