"""Queue depth from Azure Monitor: the Service Bus ``ActiveMessages`` metric, split by ``EntityName``.

It needs only the Monitoring Reader role (the admin API needs Manage rights), but the metric arrives minutes late:
``sampled_at`` is the timestamp of the newest sample, never the time of the query, so the policy can discount old
numbers. Monitor cannot tell locked messages from waiting ones, so ``in_flight`` is ``None``. A refusal (401/403:
the identity lacks ``Microsoft.Insights/Metrics/Read`` on the namespace) is ``QueueAccessDenied``, so callers can
tell a missing role from a broken queue.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import structlog
from azure.core import exceptions as core_exc
from azure.monitor.querymetrics import MetricAggregationType, MetricsClient

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _cache, _errors, _retry
from scalebus.settings import QueueSettings

log = structlog.get_logger(__name__)

METRIC_NAMESPACE = "Microsoft.ServiceBus/namespaces"
LOOKBACK = timedelta(minutes=15)
"""How far back to look for the newest sample (Monitor publishes Service Bus metrics every minute or so)."""


class MonitorDepth:
    """``base.QueueDepth`` from ``ActiveMessages`` (maximum per minute) for one queue of one namespace."""

    def __init__(
        self, client: MetricsClient, *, namespace_resource_id: str, queue_name: str, cache_s: float
    ) -> None:
        self._client = client
        self._resource_id = namespace_resource_id
        self._queue_name = queue_name
        self._cache: _cache.TtlCache[base.DepthSample] = _cache.TtlCache(cache_s)

    def read_depth(self) -> base.DepthSample:
        return self._cache.get(self._query)

    @_retry.retry_control_plane_read
    def _query(self) -> base.DepthSample:
        what = f"read ActiveMessages of {self._queue_name}"
        with _errors.translated(_errors.QUEUE, what=what):
            try:
                results = self._client.query_resources(
                    resource_ids=[self._resource_id],
                    metric_namespace=METRIC_NAMESPACE,
                    metric_names=["ActiveMessages"],
                    timespan=LOOKBACK,
                    granularity=timedelta(minutes=1),
                    aggregations=[MetricAggregationType.MAXIMUM],
                    filter=f"EntityName eq '{self._queue_name}'",
                )
            except core_exc.HttpResponseError as exc:
                if exc.status_code not in (401, 403):
                    raise
                raise errors.QueueAccessDenied(
                    f"{what}: refused (HTTP {exc.status_code}); the identity needs "
                    "Microsoft.Insights/Metrics/Read on the namespace (Monitoring Reader, or the scalebus "
                    "controller role on its resource group)"
                ) from exc
        newest: tuple[float, float] | None = None
        for result in results:
            for metric in result.metrics:
                for series in metric.timeseries:
                    entity = str(
                        series.metadata_values.get("entityname") or series.metadata_values.get("EntityName") or ""
                    )
                    if entity and entity.lower() != self._queue_name.lower():
                        continue
                    for point in series.data:
                        if point.maximum is None or point.timestamp is None:
                            continue
                        at = point.timestamp.timestamp()
                        if newest is None or at > newest[0]:
                            newest = (at, float(point.maximum))
        if newest is None:
            raise errors.TransientQueueError(
                f"read ActiveMessages of {self._queue_name}: no sample in the last "
                f"{int(LOOKBACK.total_seconds() // 60)} minutes"
            )
        at, value = newest
        return base.DepthSample(
            active=int(value),
            in_flight=None,
            dead_lettered=0,
            sampled_at=at,
            source="azure-monitor",
            active_includes_locked=True,
        )

    def close(self) -> None:
        self._client.close()


def open_monitor_depth(settings: QueueSettings, *, queue_name: str, credential: Any) -> MonitorDepth:
    """Build the Monitor depth source from settings (``credential`` defaults to ``DefaultAzureCredential``)."""
    if not settings.namespace_resource_id:
        raise errors.ConfigError(
            "queue.namespace_resource_id",
            'is required when depth_source = "monitor"',
            "set it to the namespace's ARM id (/subscriptions/.../providers/Microsoft.ServiceBus/namespaces/<ns>)",
        )
    if not settings.monitor_endpoint:
        raise errors.ConfigError(
            "queue.monitor_endpoint",
            'is required when depth_source = "monitor"',
            "set it to the namespace region's metrics endpoint, e.g. https://westeurope.metrics.monitor.azure.com",
        )
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    options: dict[str, Any] = (
        {"connection_verify": settings.connection_verify} if settings.connection_verify else {}
    )
    client = MetricsClient(settings.monitor_endpoint, credential, **options)
    return MonitorDepth(
        client,
        namespace_resource_id=settings.namespace_resource_id,
        queue_name=queue_name,
        cache_s=settings.depth_cache_s,
    )
