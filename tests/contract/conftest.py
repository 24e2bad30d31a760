"""Contract-suite plumbing: one test body, every backend.

Each backend provides a ``<name>_queue_factory`` / ``<name>_scale_set_factory`` / ``<name>_store_factory``
fixture (local ones in ``tests/contract/local_backends.py``, Azure ones in ``tests/fakes/*_plugin.py``) and
adds its name to the list below. Factories return fresh, empty, isolated instances on every call.
"""

from __future__ import annotations

import pytest

from tests.contract.local_backends import *  # noqa: F403  (fixtures)

QUEUE_BACKENDS = ["sqlite", "servicebus"]
SCALE_SET_BACKENDS = ["local", "vmss", "vmss_flexible"]
STORE_BACKENDS = ["folder", "azurite", "azurite_sdk"]
SECRETS_BACKENDS = ["folder", "keyvault"]


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_factory(request: pytest.FixtureRequest) -> object:
    """``factory(*, lock_duration_s: float = 5, max_delivery_count: int = 3) -> (JobQueue, QueueDepth)``."""
    return request.getfixturevalue(f"{request.param}_queue_factory")


@pytest.fixture(params=SCALE_SET_BACKENDS)
def scale_set_factory(request: pytest.FixtureRequest) -> object:
    """``factory() -> ScaleSet`` with capacity 0."""
    return request.getfixturevalue(f"{request.param}_scale_set_factory")


@pytest.fixture(params=STORE_BACKENDS)
def store_factory(request: pytest.FixtureRequest) -> object:
    """``factory() -> (ObjectStore, root_uri)``: an empty root URI ending in '/' the store can write under."""
    return request.getfixturevalue(f"{request.param}_store_factory")


@pytest.fixture(params=SECRETS_BACKENDS)
def secrets_factory(request: pytest.FixtureRequest) -> object:
    """``factory() -> (SecretSource, put)``: an empty source, and ``put(name, value)`` adding a secret (or a new
    version of it) the backend's own way."""
    return request.getfixturevalue(f"{request.param}_secrets_factory")
