"""ImdsIdentity and the managed-identity credential, against the IMDS fake over a real socket."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable

import pytest

from scalebus import errors
from scalebus.backends.azure import compute, imds
from tests.fakes.arm_compute import ArmComputeFake
from tests.fakes.imds import ImdsFake, VmIdentity

SCALE_SET_ID = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachineScaleSets/pool"


def test_uniform_instance_knows_its_instance_id(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.uniform(SCALE_SET_ID, "7")

    me = imds.ImdsIdentity(imds_fake.endpoint).whoami()

    assert me.instance_id == "7"
    assert me.scale_set == SCALE_SET_ID
    assert me.name == "pool_7"


def test_flexible_instance_id_is_its_vm_name(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.flexible(SCALE_SET_ID, "pool_3f9a1c2e")

    me = imds.ImdsIdentity(imds_fake.endpoint).whoami()

    assert me.instance_id == "pool_3f9a1c2e"
    assert me.scale_set == SCALE_SET_ID


def test_scale_set_is_a_valid_scale_set_url(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.flexible(SCALE_SET_ID, "pool_0000beef")
    me = imds.ImdsIdentity(imds_fake.endpoint).whoami()
    assert compute.parse_scale_set_id(me.scale_set).name == "pool"


def test_vm_outside_a_scale_set_is_refused(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.standalone("sub-1", "rg-1", "lonely-vm")

    with pytest.raises(errors.IdentityError, match="not an instance of a VM scale set"):
        imds.ImdsIdentity(imds_fake.endpoint).whoami()


def test_no_imds_is_an_identity_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(errors.IdentityError, match="unreachable"):
        imds.ImdsIdentity(f"http://127.0.0.1:{port}", timeout_s=0.5).whoami()


def test_identity_asks_with_the_metadata_header(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.uniform(SCALE_SET_ID, "1")
    before = imds_fake.count("/metadata/instance")
    imds.ImdsIdentity(imds_fake.endpoint).whoami()  # the fake answers 400 without ``Metadata: true``
    assert imds_fake.count("/metadata/instance") == before + 1


@pytest.mark.parametrize(
    ("compute_doc", "expected_id"),
    [
        (
            {
                "subscriptionId": "s",
                "resourceGroupName": "g",
                "vmScaleSetName": "pool",
                "name": "pool_12",
                "resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/"
                "virtualMachineScaleSets/pool/virtualMachines/12",
            },
            "12",
        ),
        ({"subscriptionId": "s", "resourceGroupName": "g", "vmScaleSetName": "pool", "name": "pool_4"}, "4"),
        (
            {
                "subscriptionId": "s",
                "resourceGroupName": "g",
                "vmScaleSetName": "pool",
                "name": "pool_ab12cd34",
                "resourceId": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/"
                "virtualMachines/pool_ab12cd34",
            },
            "pool_ab12cd34",
        ),
    ],
    ids=["uniform", "uniform-without-resource-id", "flexible"],
)
def test_instance_info_from_compute_document(compute_doc: dict[str, str], expected_id: str) -> None:
    info = imds.instance_info(compute_doc)
    assert info.instance_id == expected_id
    assert info.scale_set.endswith("/virtualMachineScaleSets/pool")


def test_incomplete_metadata_is_refused() -> None:
    with pytest.raises(errors.IdentityError):
        imds.instance_info({"vmScaleSetName": "pool", "name": "pool_1"})


def test_managed_identity_credential_gets_its_token_from_imds(
    imds_fake: ImdsFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://placeholder")  # restored after the test
    credential = imds.managed_identity_credential(imds_endpoint=imds_fake.endpoint)
    before = imds_fake.count("/metadata/identity/oauth2/token")

    token = credential.get_token("https://management.azure.com/.default")

    assert token.token == imds_fake.token
    assert imds_fake.count("/metadata/identity/oauth2/token") == before + 1


def test_vmss_adapter_authenticates_with_the_managed_identity(
    imds_fake: ImdsFake,
    arm_fake: ArmComputeFake,
    vmss_adapter_factory: Callable[..., compute.VmssScaleSet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://placeholder")  # restored after the test
    arm_fake.expected_token = imds_fake.token  # any other bearer is refused with 401
    credential = imds.managed_identity_credential(imds_endpoint=imds_fake.endpoint)
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set(capacity=2), credential=credential)

    assert scale_set.get_capacity() == 2


def test_arm_refuses_a_wrong_token(arm_fake: ArmComputeFake, vmss_adapter_factory: Callable[..., object]) -> None:
    arm_fake.expected_token = "the-right-one"
    scale_set = vmss_adapter_factory(arm_fake.create_scale_set())
    with pytest.raises(errors.ScaleSetError, match="authentication failed"):
        scale_set.get_capacity()  # type: ignore[attr-defined]


def test_scheduled_events_are_served(imds_fake: ImdsFake) -> None:
    imds_fake.scheduled_events = [{"EventId": "e1", "EventType": "Preempt", "Resources": ["pool_1"]}]
    request = urllib.request.Request(
        f"{imds_fake.endpoint}/metadata/scheduledevents?api-version=2020-07-01", headers={"Metadata": "true"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        document = json.loads(response.read())
    assert document["Events"][0]["EventType"] == "Preempt"
    assert "DocumentIncarnation" in document


def test_asks_an_api_version_that_names_the_flexible_scale_set(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.flexible(SCALE_SET_ID, "pool_0000beef")

    imds.ImdsIdentity(imds_fake.endpoint).whoami()

    assert imds_fake.api_versions[-1] >= "2021-03-01"


def test_the_flexible_scale_set_id_is_preferred_over_the_name() -> None:
    other_group = SCALE_SET_ID.replace("/rg-1/", "/rg-pools/")
    compute_doc = {
        "name": "pool_0000beef",
        "subscriptionId": "sub-1",
        "resourceGroupName": "rg-1",  # the VM's group; its scale set lives in another one
        "vmScaleSetName": "pool",
        "resourceId": "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/"
        "pool_0000beef",
        "virtualMachineScaleSet": {"id": other_group},
    }

    me = imds.instance_info(compute_doc)

    assert (me.scale_set, me.instance_id) == (other_group, "pool_0000beef")


def test_a_410_burst_after_boot_is_retried(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.uniform(SCALE_SET_ID, "2")
    imds_fake.fail_next("/metadata/instance", 410, times=2)

    me = imds.ImdsIdentity(imds_fake.endpoint).whoami()

    assert me.instance_id == "2"
    assert imds_fake.count("/metadata/instance") >= 3


def test_imds_not_ready_is_transient_and_not_an_identity_error(imds_fake: ImdsFake) -> None:
    imds_fake.identity = VmIdentity.uniform(SCALE_SET_ID, "2")
    imds_fake.fail_next("/metadata/instance", 503, retry_after_s=600)

    with pytest.raises(errors.TransientBackendError) as caught:
        imds.ImdsIdentity(imds_fake.endpoint).whoami()

    assert not isinstance(caught.value, errors.IdentityError)
    assert caught.value.retry_after_s == 600
