"""The Azure Monitor metrics data-plane endpoint, enough for ``MetricsClient.query_resources``.

``POST /subscriptions/<sub>/metrics:getBatch?metricnamespace=...&metricnames=ActiveMessages&...`` with a JSON body
``{"resourceids": [...]}`` answers ``{"values": [...]}``: per resource one ``MetricResultsResponseValuesItem``
holding each metric asked for, with one time series per ``EntityName`` (filtered by the ``filter`` query
parameter). ``ActiveMessages`` is the fake broker's live count (locked messages included, as the service counts
them), one point stamped ``lag_s`` seconds in the past, the way Monitor lags the service. ``CompleteMessage`` and
``IncomingMessages`` are counts per minute (``total``), ``DeadletteredMessages`` a gauge per minute (``average``,
``minimum``, ``maximum``: its value at the minute's end), from the broker's record of events, for every minute from
``starttime`` to ``endtime`` that began ``lag_s`` or more ago, each point carrying only the aggregations asked for
(``aggregation``); the metrics, their aggregations and the ``EntityName`` dimension are those of "Monitoring Azure
Service Bus data reference" (https://learn.microsoft.com/azure/service-bus-messaging/monitor-service-bus-reference).
Requests need a bearer token (any), as the real endpoint does.

Followed: the request builder ``build_metrics_batch_query_resources_request`` and the response models in
``azure/monitor/querymetrics`` 1.0 (installed in the venv), and the "Metrics Batch" REST reference
(api-version 2024-02-01) with its example responses in Azure/azure-rest-api-specs
(``specification/monitor/data-plane/Microsoft.Insights``).

Access: with ``access`` set (a :class:`tests.fakes.rbac.AccessPolicy`), the bearer token names the caller and
each resource in ``resourceids`` needs ``Microsoft.Insights/Metrics/Read`` ("Read metrics" in "Azure permissions
for Monitoring", https://learn.microsoft.com/en-us/azure/role-based-access-control/permissions/monitor) at that
resource's scope: granted by the Monitoring Reader built-in role or the shipped controller role, through an
assignment at the resource or a parent (Monitoring Reader's ``*/read`` as listed in "Azure built-in roles for
Monitor", https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/monitor). A missing
grant answers 403 ``AuthorizationFailed`` with ARM's error envelope (:func:`tests.fakes.rbac.arm_denial`); Azure
does not document a batch in which only some resources are refused, so the fake refuses the whole request.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
from typing import Any

import trustme

from tests.fakes import rbac
from tests.fakes.servicebus_admin import HttpsFake
from tests.fakes.servicebus_amqp import ServiceBusBroker

_FILTER = re.compile(r"EntityName eq '([^']*)'", re.IGNORECASE)
COUNTERS = ("CompleteMessage", "IncomingMessages")
GAUGES = ("DeadletteredMessages",)
SERVED = ("ActiveMessages", *COUNTERS, *GAUGES)
DESCRIPTIONS = {
    "ActiveMessages": "Count of active messages in a Queue/Topic.",
    "CompleteMessage": "Count of complete messages on a Queue/Topic.",
    "IncomingMessages": "Incoming Messages for Microsoft.ServiceBus.",
    "DeadletteredMessages": "Count of dead-lettered messages in a Queue/Topic.",
}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _minutes(start: float, end: float) -> list[float]:
    """The start of every whole minute that begins within [start, end]."""
    first = start // 60 * 60
    return [first + 60 * i for i in range(int((end - first) // 60) + 1)] if end >= first else []


class MonitorMetricsServer:
    """Serves ``ActiveMessages`` for the fake broker's queues, ``lag_s`` seconds late."""

    def __init__(self, broker: ServiceBusBroker, ca: trustme.CA, *, lag_s: float = 120.0) -> None:
        self.broker = broker
        self.lag_s = lag_s
        self._https = HttpsFake(ca, self._handle, name="fake-monitor-metrics")
        self._lock = threading.Lock()
        self.access: rbac.AccessPolicy | None = None
        """Role assignments to enforce; ``None`` accepts any bearer token."""

    @property
    def endpoint(self) -> str:
        return self._https.endpoint

    @property
    def request_count(self) -> int:
        return sum(n for path, n in self._https.requests.items() if path.endswith("/metrics:getBatch"))

    def start(self) -> MonitorMetricsServer:
        self._https.start()
        return self

    def stop(self) -> None:
        self._https.stop()

    def _handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        if not headers.get("Authorization", "").startswith("Bearer "):
            return 401, "application/json", b'{"error":{"code":"AuthenticationFailed","message":"no token"}}'
        if method != "POST" or not path.endswith("/metrics:getBatch"):
            return 404, "application/json", b'{"error":{"code":"NotFound","message":"no such operation"}}'
        names = [n for n in ",".join(query.get("metricnames", [])).split(",") if n]
        if not names or any(n not in SERVED for n in names):
            return 400, "application/json", b'{"error":{"code":"BadRequest","message":"unknown metric"}}'
        resource_ids = json.loads(body or b"{}").get("resourceids", [])
        denial = self._authorize(headers["Authorization"][len("Bearer ") :], resource_ids)
        if denial is not None:
            return denial
        wanted = _FILTER.search(" ".join(query.get("filter", [])))
        values = [self._resource(rid, wanted.group(1) if wanted else None, query) for rid in resource_ids]
        return 200, "application/json", json.dumps({"values": values}).encode()

    def _authorize(self, principal: str, resource_ids: list[str]) -> tuple[int, str, bytes] | None:
        if self.access is None:
            return None
        action = "Microsoft.Insights/Metrics/Read"
        for resource_id in resource_ids:
            if not self.access.allows(principal, action, resource_id):
                status, _, payload = rbac.arm_denial(principal, action, resource_id)
                return status, "application/json", json.dumps(payload).encode()
        return None

    def _resource(self, resource_id: str, entity: str | None, query: dict[str, list[str]]) -> dict[str, Any]:
        now = time.time()
        start = query.get("starttime", [_iso(now - 900)])[0]
        end = query.get("endtime", [_iso(now)])[0]
        window = (_epoch(start), min(_epoch(end), now - self.lag_s))
        wanted = [a.strip().lower() for a in ",".join(query.get("aggregation", ["average"])).split(",") if a]
        entities = [entity.lower()] if entity else sorted(n for n in self.broker.entities if "/" not in n)
        metrics = [n for n in SERVED if n in ",".join(query.get("metricnames", [])).split(",")]
        return {
            "starttime": start,
            "endtime": end,
            "interval": query.get("interval", ["PT1M"])[0],
            "namespace": "Microsoft.ServiceBus/namespaces",
            "resourceregion": "westeurope",
            "resourceid": resource_id,
            "value": [
                {
                    "id": f"{resource_id}/providers/Microsoft.Insights/metrics/{metric}",
                    "type": "Microsoft.Insights/metrics",
                    "name": {"value": metric, "localizedValue": DESCRIPTIONS[metric]},
                    "displayDescription": DESCRIPTIONS[metric],
                    "unit": "Count",
                    "timeseries": [
                        {
                            "metadatavalues": [
                                {"name": {"value": "entityname", "localizedValue": "entityname"}, "value": name}
                            ],
                            "data": data,
                        }
                        for name in entities
                        if (data := self._points(metric, name, window, wanted, now)) is not None
                    ],
                    "errorCode": "Success",
                }
                for metric in metrics
            ],
        }

    def _points(
        self, metric: str, name: str, window: tuple[float, float], wanted: list[str], now: float
    ) -> list[dict[str, Any]] | None:
        """One entity's points of one metric (``None``: no such queue)."""
        info = self.broker.queue_info(name)
        if info is None:
            return None
        entity, counts = info
        if metric == "ActiveMessages":
            active = float(counts.active + counts.locked)
            return [{"timeStamp": _iso(now - self.lag_s), "maximum": active, "average": active}]
        with self.broker.lock:
            events = [at for at, kind in entity.metric_events if kind == metric]
            gauge = list(entity.dead_letter_gauge)
        points = []
        for minute in _minutes(*window):
            if metric in COUNTERS:
                points.append(
                    {"timeStamp": _iso(minute), "total": float(sum(minute <= at < minute + 60 for at in events))}
                )
                continue
            held = float(next((n for at, n in reversed(gauge) if at < minute + 60), 0))
            points.append(
                {
                    "timeStamp": _iso(minute),
                    **{agg: held for agg in wanted if agg in ("average", "minimum", "maximum")},
                }
            )
        return points
