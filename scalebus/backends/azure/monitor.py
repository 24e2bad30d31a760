"""Queue depth and recent counts from Azure Monitor: Service Bus metrics, split by ``EntityName``.

It needs only the Monitoring Reader role (the admin API needs Manage rights), but the metric arrives minutes late:
``sampled_at`` is the timestamp of the newest sample, never the time of the query, so the policy can discount old
numbers. Monitor cannot tell locked messages from waiting ones, so ``in_flight`` is ``None``. A refusal (401/403:
the identity lacks ``Microsoft.Insights/Metrics/Read`` on the namespace) is ``QueueAccessDenied``, so callers can
tell a missing role from a broken queue.

Service Bus keeps no record of the messages it delivered, so ``status`` reads the last hour's throughput here
(``MonitorHistory``): ``CompleteMessage`` and ``IncomingMessages`` (counts, aggregated as Total) and the
``DeadletteredMessages`` gauge (Average/Minimum/Maximum: its rises count the messages dead-lettered), all with the
``EntityName`` dimension ("Monitoring Azure Service Bus data reference",
https://learn.microsoft.com/azure/service-bus-messaging/monitor-service-bus-reference). No metric tells how long a
message waited or ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


def _query(
    client: MetricsClient,
    *,
    resource_id: str,
    queue_name: str,
    metric_names: Sequence[str],
    aggregation: str,
    timespan: timedelta | tuple[datetime, datetime],
) -> dict[str, list[tuple[float, float]]]:
    """Per metric, the (epoch seconds, value) points of ``aggregation`` for this queue's ``EntityName``, one a
    minute; a refusal is ``QueueAccessDenied``."""
    what = f"read {', '.join(metric_names)} of {queue_name}"
    with _errors.translated(_errors.QUEUE, what=what):
        try:
            results = client.query_resources(
                resource_ids=[resource_id],
                metric_namespace=METRIC_NAMESPACE,
                metric_names=list(metric_names),
                timespan=timespan,
                granularity=timedelta(minutes=1),
                aggregations=[aggregation],
                filter=f"EntityName eq '{queue_name}'",
            )
        except core_exc.HttpResponseError as exc:
            if exc.status_code not in (401, 403):
                raise
            raise errors.QueueAccessDenied(
                f"{what}: refused (HTTP {exc.status_code}); the identity needs "
                "Microsoft.Insights/Metrics/Read on the namespace (Monitoring Reader, or the scalebus "
                "controller role on its resource group)"
            ) from exc
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in metric_names}
    field = aggregation.lower()
    for result in results:
        for metric in result.metrics:
            for series in metric.timeseries:
                entity = str(
                    series.metadata_values.get("entityname") or series.metadata_values.get("EntityName") or ""
                )
                if entity and entity.lower() != queue_name.lower():
                    continue
                for point in series.data:
                    value = getattr(point, field, None)
                    if value is not None and point.timestamp is not None:
                        points.setdefault(metric.name, []).append((point.timestamp.timestamp(), float(value)))
    return {name: sorted(found) for name, found in points.items()}


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
        points = _query(
            self._client,
            resource_id=self._resource_id,
            queue_name=self._queue_name,
            metric_names=["ActiveMessages"],
            aggregation=MetricAggregationType.MAXIMUM,
            timespan=LOOKBACK,
        )["ActiveMessages"]
        newest = points[-1] if points else None
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


COUNTERS = ("CompleteMessage", "IncomingMessages")
DEAD_LETTER_GAUGE = "DeadletteredMessages"


@dataclass(frozen=True, slots=True)
class MonitorCounts:
    """One queue's counts over a window, as Monitor has them (``None``: no sample of that metric)."""

    completed: int | None
    enqueued: int | None
    dead_lettered: int | None
    """The sum of the gauge's rises minute to minute: dead letters requeued within a minute hide as many."""
    newest_at: float | None
    """End of the newest minute any metric had a sample for (Monitor lags the service by minutes)."""


class MonitorHistory:
    """Completions, arrivals and dead letters of one queue from Monitor (two queries: counters, the gauge)."""

    def __init__(self, client: MetricsClient, *, namespace_resource_id: str, queue_name: str) -> None:
        self._client = client
        self._resource_id = namespace_resource_id
        self._queue_name = queue_name

    @_retry.retry_control_plane_read
    def counts(self, *, since: float, until: float) -> MonitorCounts:
        window = (datetime.fromtimestamp(since, UTC), datetime.fromtimestamp(until, UTC))
        points: dict[str, list[tuple[float, float]]] = {}
        for names, aggregation in (
            (COUNTERS, MetricAggregationType.TOTAL),
            ((DEAD_LETTER_GAUGE,), MetricAggregationType.MAXIMUM),
        ):
            points |= _query(
                self._client,
                resource_id=self._resource_id,
                queue_name=self._queue_name,
                metric_names=names,
                aggregation=aggregation,
                timespan=window,
            )
        return counts_from_points(points)

    def close(self) -> None:
        self._client.close()


def counts_from_points(points: dict[str, list[tuple[float, float]]]) -> MonitorCounts:
    """What the metric points say (pure): counters summed, the gauge's rises summed."""

    def total(name: str) -> int | None:
        found = points.get(name) or []
        return round(sum(value for _, value in found)) if found else None

    gauge = [value for _, value in points.get(DEAD_LETTER_GAUGE) or []]
    rises = sum(max(after - before, 0.0) for before, after in itertools.pairwise(gauge))
    stamps = [at for found in points.values() for at, _ in found]
    return MonitorCounts(
        completed=total("CompleteMessage"),
        enqueued=total("IncomingMessages"),
        dead_lettered=round(rises) if gauge else None,
        newest_at=max(stamps) + 60.0 if stamps else None,
    )


def open_monitor_client(settings: QueueSettings, *, credential: Any) -> MetricsClient:
    """A metrics client for ``queue.monitor_endpoint`` (``credential`` defaults to ``DefaultAzureCredential``)."""
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    options: dict[str, Any] = (
        {"connection_verify": settings.connection_verify} if settings.connection_verify else {}
    )
    return MetricsClient(settings.monitor_endpoint, credential, **options)


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
    return MonitorDepth(
        open_monitor_client(settings, credential=credential),
        namespace_resource_id=settings.namespace_resource_id,
        queue_name=queue_name,
        cache_s=settings.depth_cache_s,
    )
