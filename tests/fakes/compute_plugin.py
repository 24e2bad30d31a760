"""pytest fixtures for the compute test peers: the ARM Microsoft.Compute fake (HTTPS) and the IMDS fake (HTTP).

The servers are session-scoped (started once, stopped at the end); each test gets fresh scale sets, so state
never leaks between tests. ``vmss_scale_set_factory`` / ``vmss_flexible_scale_set_factory`` return
``factory() -> ScaleSet`` (capacity 0, a new scale set per call) for the contract suite.

ARM enforces the shipped roles: the controller's token (``CONTROLLER_TOKEN``, what ``StaticTokenCredential``
hands out) holds ``docker/roles/scalebus-controller.json``, the VM's managed identity (the IMDS fake's token)
holds ``docker/roles/scalebus-worker.json`` and the release pipeline's (``PIPELINE_TOKEN``)
``docker/roles/scalebus-pipeline.json``, each at the scope its ``AssignableScopes`` names, for the default
subscription and resource group. A call the role does not grant is a 403 ``AuthorizationFailed``, so a test fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo

from scalebus.backends import base
from scalebus.backends.azure import compute
from tests.fakes import rbac
from tests.fakes.arm_compute import DEFAULT_RESOURCE_GROUP, DEFAULT_SUBSCRIPTION, ArmComputeFake
from tests.fakes.imds import ImdsFake

TEST_POLLING_INTERVAL_S = 0.02
CONTROLLER_TOKEN = "arm-test-token"
PIPELINE_TOKEN = "arm-pipeline-token"
"""The release pipeline's token: holds ``docker/roles/scalebus-pipeline.json`` (image bake, rollout)."""


class StaticTokenCredential:
    """A ``TokenCredential`` handing out one fixed bearer token (the ARM fake checks only that there is one)."""

    def __init__(self, token: str = CONTROLLER_TOKEN) -> None:
        self.token = token
        self.requests = 0

    def get_token(self, *scopes: str, **_kwargs: Any) -> AccessToken:
        self.requests += 1
        return AccessToken(self.token, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        self.requests += 1
        return AccessTokenInfo(self.token, int(time.time()) + 3600)


@pytest.fixture(scope="session")
def arm_compute_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArmComputeFake]:
    fake = ArmComputeFake(Path(tmp_path_factory.mktemp("arm-compute"))).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def imds_server() -> Iterator[ImdsFake]:
    fake = ImdsFake().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def imds_fake(imds_server: ImdsFake) -> Iterator[ImdsFake]:
    """The IMDS fake, with no identity, events or failures left over from another test."""
    imds_server.identity = None
    imds_server.reset_scheduled_events()
    imds_server.reset_faults()
    imds_server.token_status = 200
    yield imds_server
    imds_server.identity = None
    imds_server.reset_scheduled_events()
    imds_server.reset_faults()
    imds_server.token_status = 200


def shipped_access(*, controller: str, worker: str, pipeline: str = PIPELINE_TOKEN) -> rbac.AccessPolicy:
    """The shipped custom roles assigned to the three principals, at their own ``AssignableScopes``."""
    access = rbac.AccessPolicy()
    for principal, stem in (
        (controller, "scalebus-controller"),
        (worker, "scalebus-worker"),
        (pipeline, "scalebus-pipeline"),
    ):
        role = rbac.shipped_role(stem)
        for template in role.assignable_scopes[:1]:
            scope = rbac.fill_scope(
                template, subscription=DEFAULT_SUBSCRIPTION, resource_group=DEFAULT_RESOURCE_GROUP, scale_set="*"
            )
            access.assign(principal, role, scope)
    return access


def _reset(fake: ArmComputeFake) -> None:
    fake.expected_token = None
    fake.page_size = None
    fake.ratelimit_remaining = None
    fake.clear_faults()


@pytest.fixture
def arm_fake(arm_compute_fake: ArmComputeFake, imds_server: ImdsFake) -> Iterator[ArmComputeFake]:
    """The ARM fake with counters reset, default timings and the shipped roles enforced for this test."""
    arm_compute_fake.reset_counts()
    arm_compute_fake.delete_delay_s = 0.0
    arm_compute_fake.scale_in_delay_s = 0.0
    arm_compute_fake.capture_delay_s = 0.0
    _reset(arm_compute_fake)
    arm_compute_fake.access = shipped_access(controller=CONTROLLER_TOKEN, worker=imds_server.token)
    yield arm_compute_fake
    _reset(arm_compute_fake)


@pytest.fixture
def vmss_adapter_factory(arm_fake: ArmComputeFake) -> Iterator[Callable[..., compute.VmssScaleSet]]:
    """``make(scale_set_id, credential=None) -> VmssScaleSet`` talking to the ARM fake; closed after the test."""
    made: list[compute.VmssScaleSet] = []

    def make(scale_set_id: str, *, credential: Any = None) -> compute.VmssScaleSet:
        adapter = compute.VmssScaleSet(
            scale_set_id,
            credential=credential or StaticTokenCredential(),
            arm_endpoint=arm_fake.endpoint,
            connection_verify=str(arm_fake.ca_path),
            polling_interval_s=TEST_POLLING_INTERVAL_S,
        )
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def _factory_for(mode: str, arm: ArmComputeFake, make: Callable[..., compute.VmssScaleSet]) -> Any:
    def factory() -> base.ScaleSet:
        return make(arm.create_scale_set(mode=mode, capacity=0))

    return factory


@pytest.fixture
def vmss_scale_set_factory(
    arm_fake: ArmComputeFake, vmss_adapter_factory: Callable[..., compute.VmssScaleSet]
) -> Callable[[], base.ScaleSet]:
    """``factory() -> ScaleSet``: a fresh, empty Uniform scale set behind the ARM fake."""
    factory: Callable[[], base.ScaleSet] = _factory_for("Uniform", arm_fake, vmss_adapter_factory)
    return factory


@pytest.fixture
def vmss_flexible_scale_set_factory(
    arm_fake: ArmComputeFake, vmss_adapter_factory: Callable[..., compute.VmssScaleSet]
) -> Callable[[], base.ScaleSet]:
    """``factory() -> ScaleSet``: a fresh, empty Flexible scale set behind the ARM fake."""
    factory: Callable[[], base.ScaleSet] = _factory_for("Flexible", arm_fake, vmss_adapter_factory)
    return factory
