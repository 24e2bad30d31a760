"""The identity port: who this process runs on, from the pool's variables or from IMDS (the fake, over HTTP).

What self-destroy and the worker rely on: inside a scale set ``whoami`` names the instance and its scale set;
outside one it raises ``IdentityError`` (never a guess); and closing is harmless, twice too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import pool

SCALE_SET_ID = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachineScaleSets/pool"
# factory(inside: bool) -> (identity, the instance id it must report when inside)
IdentityFactory = Callable[[bool], tuple[base.InstanceIdentity, str]]


@pytest.fixture
def local_identity_factory() -> IdentityFactory:
    def factory(inside: bool) -> tuple[base.InstanceIdentity, str]:
        environ = {pool.INSTANCE_ID_ENV: "local-3", pool.SCALE_SET_ENV: "local:///tmp/pool.db"} if inside else {}
        return pool.LocalIdentity(environ), "local-3"

    return factory


@pytest.fixture
def imds_identity_factory(request: pytest.FixtureRequest) -> IdentityFactory:
    from scalebus.backends.azure import imds
    from tests.fakes.imds import VmIdentity

    fake = request.getfixturevalue("imds_fake")

    def factory(inside: bool) -> tuple[base.InstanceIdentity, str]:
        fake.identity = VmIdentity.uniform(SCALE_SET_ID, "3") if inside else None
        return imds.ImdsIdentity(fake.endpoint), "3"

    return factory


@pytest.fixture(params=["local", "imds"])
def identity_factory(request: pytest.FixtureRequest) -> IdentityFactory:
    factory: IdentityFactory = request.getfixturevalue(f"{request.param}_identity_factory")
    return factory


def test_inside_a_scale_set_it_names_the_instance(identity_factory: IdentityFactory) -> None:
    identity, instance_id = identity_factory(True)
    me = identity.whoami()
    assert me.instance_id == instance_id
    assert me.scale_set in (SCALE_SET_ID, "local:///tmp/pool.db")
    identity.close()


def test_outside_a_scale_set_it_refuses(identity_factory: IdentityFactory) -> None:
    identity, _ = identity_factory(False)
    with pytest.raises(errors.IdentityError):
        identity.whoami()
    identity.close()


def test_close_twice_is_harmless(identity_factory: IdentityFactory) -> None:
    identity, _ = identity_factory(True)
    identity.whoami()
    identity.close()
    identity.close()
