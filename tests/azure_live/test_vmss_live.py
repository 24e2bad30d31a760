"""VmssScaleSet against a real scale set (opt-in: ``--azure-live``).

Environment: ``SCALEBUS_LIVE_VMSS_ID`` (the scale set's ARM resource id; the identity running the tests needs
read access, e.g. Reader). Writes are opt-in too: with ``SCALEBUS_LIVE_VMSS_WRITE=1`` the test re-applies the
current capacity (one PATCH that changes nothing; needs Virtual Machine Contributor on the scale set).
Credentials come from ``DefaultAzureCredential`` (``az login``, environment, or a managed identity).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scalebus.backends import base
from scalebus.backends.azure import compute

pytestmark = pytest.mark.azure_live


@pytest.fixture
def live_scale_set() -> Iterator[compute.VmssScaleSet]:
    scale_set_id = os.environ.get("SCALEBUS_LIVE_VMSS_ID", "")
    if not scale_set_id:
        pytest.skip("set SCALEBUS_LIVE_VMSS_ID to a scale set's ARM resource id")
    from azure.identity import DefaultAzureCredential

    scale_set = compute.VmssScaleSet(scale_set_id, credential=DefaultAzureCredential())
    yield scale_set
    scale_set.close()


def test_reads_capacity_and_instances(live_scale_set: compute.VmssScaleSet) -> None:
    assert live_scale_set.orchestration_mode in ("Uniform", "Flexible")
    capacity = live_scale_set.get_capacity()
    instances = live_scale_set.list_instances()
    assert capacity >= 0
    assert all(isinstance(i.state, base.InstanceState) for i in instances)
    live = [i for i in instances if i.state is not base.InstanceState.DELETING]
    assert len(live) <= max(capacity, len(live))
    assert live_scale_set.stats.calls >= 3
    assert live_scale_set.stats.writes == 0


def test_reapplying_capacity_is_one_write(live_scale_set: compute.VmssScaleSet) -> None:
    if os.environ.get("SCALEBUS_LIVE_VMSS_WRITE") != "1":
        pytest.skip("set SCALEBUS_LIVE_VMSS_WRITE=1 to allow a (no-op) capacity write")
    capacity = live_scale_set.get_capacity()
    live_scale_set.set_capacity(capacity)
    assert live_scale_set.stats.writes == 1
    assert live_scale_set.get_capacity() == capacity
