"""pytest fixtures for the Service Bus test peers: the AMQP broker, the admin endpoint and Monitor metrics.

The three servers start once per session (127.0.0.1, free ports, a ``trustme`` CA for HTTPS) and stop after it.
``servicebus_queue_factory`` hands out fresh queues through the production constructor ``open_servicebus``, with a
connection string in a private environment mapping, exactly as the CLI would build them.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from azure.core.credentials import AccessToken

from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.fakes.monitor_metrics import MonitorMetricsServer
from tests.fakes.servicebus_admin import ServiceBusAdminServer, write_ca
from tests.fakes.servicebus_amqp import ServiceBusBroker

CONNECTION_STRING_ENV = "SCALEBUS_TEST_SERVICEBUS_CONNECTION"
NAMESPACE_RESOURCE_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
    "Microsoft.ServiceBus/namespaces/fake"
)
_names = itertools.count(1)


class StaticTokenCredential:
    """A ``TokenCredential`` of our own for the Monitor fake (any bearer token is accepted there)."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("fake-token", int(time.time()) + 3600)


@pytest.fixture(scope="session")
def azure_test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def azure_test_ca_path(azure_test_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ca(azure_test_ca, tmp_path_factory.mktemp("azure-ca"))


@pytest.fixture(scope="session")
def servicebus_broker() -> Iterator[ServiceBusBroker]:
    broker = ServiceBusBroker().start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def servicebus_admin(
    servicebus_broker: ServiceBusBroker, azure_test_ca: trustme.CA
) -> Iterator[ServiceBusAdminServer]:
    server = ServiceBusAdminServer(servicebus_broker, azure_test_ca).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def monitor_metrics(
    servicebus_broker: ServiceBusBroker, azure_test_ca: trustme.CA
) -> Iterator[MonitorMetricsServer]:
    server = MonitorMetricsServer(servicebus_broker, azure_test_ca).start()
    yield server
    server.stop()


def new_queue_name(prefix: str = "q") -> str:
    return f"{prefix}-{next(_names)}-{int(time.time() * 1000) % 100000}"


@pytest.fixture
def servicebus_settings(
    servicebus_broker: ServiceBusBroker,
    servicebus_admin: ServiceBusAdminServer,
    monitor_metrics: MonitorMetricsServer,
    azure_test_ca_path: Path,
) -> Callable[..., tuple[QueueSettings, dict[str, str]]]:
    """``make(queue_name, **overrides) -> (QueueSettings, environ)`` pointing at the fakes."""

    def make(queue_name: str, **overrides: Any) -> tuple[QueueSettings, dict[str, str]]:
        fields: dict[str, Any] = {
            "url": f"servicebus://{servicebus_broker.host}:{servicebus_broker.port}/{queue_name}",
            "connection_string_env": CONNECTION_STRING_ENV,
            "depth_source": "admin",
            "admin_endpoint": servicebus_admin.endpoint,
            "monitor_endpoint": monitor_metrics.endpoint,
            "namespace_resource_id": NAMESPACE_RESOURCE_ID,
            "connection_verify": str(azure_test_ca_path),
            "depth_cache_s": 0.0,
        }
        fields.update(overrides)
        return QueueSettings(**fields), {CONNECTION_STRING_ENV: servicebus_broker.connection_string}

    return make


@pytest.fixture(scope="session")
def servicebus_closer() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Closes adapters in the background: an SDK handler's close waits up to a second for its keep-alive thread,
    and nothing in a test depends on that. Everything is closed before the session ends."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="sb-close") as pool:
        yield pool


@pytest.fixture
def servicebus_queue_factory(
    servicebus_broker: ServiceBusBroker,
    servicebus_settings: Callable[..., tuple[QueueSettings, dict[str, str]]],
    servicebus_closer: concurrent.futures.ThreadPoolExecutor,
) -> Iterator[Callable[..., tuple[base.JobQueue, base.QueueDepth]]]:
    """``factory(*, lock_duration_s=5, max_delivery_count=3) -> (JobQueue, QueueDepth)``, a fresh queue a call,
    with duplicate detection on, as the deployment template creates it."""
    opened: list[Any] = []

    def factory(
        *, lock_duration_s: float = 5, max_delivery_count: int = 3
    ) -> tuple[base.JobQueue, base.QueueDepth]:
        name = new_queue_name()
        servicebus_broker.create_queue(
            name,
            lock_duration_s=lock_duration_s,
            max_delivery_count=max_delivery_count,
            requires_duplicate_detection=True,
        )
        settings, environ = servicebus_settings(name, max_delivery_count=max_delivery_count)
        queue, depth = servicebus.open_servicebus(settings, environ=environ)
        opened.extend([queue, depth])
        return queue, depth

    yield factory
    for thing in opened:
        servicebus_closer.submit(thing.close)
