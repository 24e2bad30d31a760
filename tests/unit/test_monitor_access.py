"""The Monitor depth source under Azure's access rules: the metrics fake checks ``Microsoft.Insights/Metrics/Read``
at the namespace, so the shipped controller role is shown to be enough and a missing grant to be our own error."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.fakes import rbac
from tests.fakes.monitor_metrics import MonitorMetricsServer
from tests.fakes.servicebus_amqp import ServiceBusBroker
from tests.fakes.servicebus_plugin import NAMESPACE_RESOURCE_ID, StaticTokenCredential, new_queue_name

Settings = Callable[..., tuple[QueueSettings, dict[str, str]]]
PRINCIPAL = "fake-token"  # what StaticTokenCredential hands out: the token names the caller
NAMESPACE_GROUP = NAMESPACE_RESOURCE_ID.split("/providers/")[0]


@pytest.fixture
def metrics_access(monitor_metrics: MonitorMetricsServer) -> Iterator[rbac.AccessPolicy]:
    """Access rules on the shared metrics fake for one test, off again afterwards."""
    monitor_metrics.access = rbac.AccessPolicy()
    yield monitor_metrics.access
    monitor_metrics.access = None


@pytest.fixture
def monitor_depth(
    servicebus_broker: ServiceBusBroker, servicebus_settings: Settings
) -> Iterator[Callable[[], base.QueueDepth]]:
    opened: list[base.QueueDepth] = []

    def make() -> base.QueueDepth:
        name = new_queue_name("m")
        servicebus_broker.create_queue(name, lock_duration_s=5, max_delivery_count=3)
        settings, environ = servicebus_settings(name, depth_source="monitor")
        queue, depth = servicebus.open_servicebus(settings, environ=environ, credential=StaticTokenCredential())
        queue.close()
        opened.append(depth)
        return depth

    yield make
    for depth in opened:
        depth.close()


def _controller_scope() -> str:
    (template,) = rbac.shipped_role("scalebus-controller").assignable_scopes
    subscription, group = NAMESPACE_GROUP.split("/")[2], NAMESPACE_GROUP.split("/")[4]
    return rbac.fill_scope(template, subscription=subscription, resource_group=group)


def test_the_shipped_controller_role_reads_the_metric(
    metrics_access: rbac.AccessPolicy, monitor_depth: Callable[[], base.QueueDepth]
) -> None:
    metrics_access.assign(PRINCIPAL, rbac.shipped_role("scalebus-controller"), _controller_scope())

    sample = monitor_depth().read_depth()

    assert (sample.active, sample.source) == (0, "azure-monitor")
    assert metrics_access.denied == []
    assert "microsoft.insights/metrics/read" in metrics_access.used_actions(PRINCIPAL)


def test_monitoring_reader_at_the_namespace_reads_the_metric(
    metrics_access: rbac.AccessPolicy, monitor_depth: Callable[[], base.QueueDepth]
) -> None:
    metrics_access.assign(PRINCIPAL, rbac.BUILT_IN["Monitoring Reader"], NAMESPACE_RESOURCE_ID)

    assert monitor_depth().read_depth().source == "azure-monitor"
    assert metrics_access.denied == []


@pytest.mark.parametrize(
    "scope",
    [NAMESPACE_GROUP.replace("/resourceGroups/rg", "/resourceGroups/rg-other"), None],
    ids=["role-in-another-group", "no-role"],
)
def test_without_metrics_read_the_depth_source_raises_access_denied(
    scope: str | None,
    metrics_access: rbac.AccessPolicy,
    monitor_metrics: MonitorMetricsServer,
    monitor_depth: Callable[[], base.QueueDepth],
) -> None:
    if scope is not None:
        metrics_access.assign(PRINCIPAL, rbac.shipped_role("scalebus-controller"), scope)
    depth = monitor_depth()
    before = monitor_metrics.request_count

    with pytest.raises(errors.AccessDeniedError, match="403") as caught:
        depth.read_depth()

    assert isinstance(caught.value, errors.QueueError)
    assert monitor_metrics.request_count - before == 1, "a refusal is permanent: not retried"
    assert [(a, s) for _, a, s in metrics_access.denied] == [
        ("Microsoft.Insights/Metrics/Read", NAMESPACE_RESOURCE_ID)
    ]
