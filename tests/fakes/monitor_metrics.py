"""The Azure Monitor metrics data-plane endpoint, enough for ``MetricsClient.query_resources``.

``POST /subscriptions/<sub>/metrics:getBatch?metricnamespace=...&metricnames=ActiveMessages&...`` with a JSON body
``{"resourceids": [...]}`` answers ``{"values": [...]}``: per resource one ``MetricResultsResponseValuesItem``
holding the ``ActiveMessages`` metric with one time series per ``EntityName`` (filtered by the ``filter`` query
parameter). Values are the fake broker's live counts (locked messages included, as the service counts them),
stamped ``lag_s`` seconds in the past, the way Monitor lags the service. Requests need a bearer token (any), as the
real endpoint does.

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


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        names = ",".join(query.get("metricnames", [])).split(",")
        if "ActiveMessages" not in names:
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
        stamp = now - self.lag_s
        series = []
        names = [entity] if entity else sorted(n for n in self.broker.entities if "/" not in n)
        for name in names:
            counts = self.broker.counts(name)
            if counts is None:
                continue
            active = float(counts.active + counts.locked)
            series.append(
                {
                    "metadatavalues": [
                        {"name": {"value": "entityname", "localizedValue": "entityname"}, "value": name}
                    ],
                    "data": [{"timeStamp": _iso(stamp), "maximum": active, "average": active}],
                }
            )
        start = query.get("starttime", [_iso(now - 900)])[0]
        end = query.get("endtime", [_iso(now)])[0]
        return {
            "starttime": start,
            "endtime": end,
            "interval": query.get("interval", ["PT1M"])[0],
            "namespace": "Microsoft.ServiceBus/namespaces",
            "resourceregion": "westeurope",
            "resourceid": resource_id,
            "value": [
                {
                    "id": f"{resource_id}/providers/Microsoft.Insights/metrics/ActiveMessages",
                    "type": "Microsoft.Insights/metrics",
                    "name": {
                        "value": "ActiveMessages",
                        "localizedValue": "Count of active messages in a Queue/Topic.",
                    },
                    "displayDescription": "Count of active messages in a Queue/Topic.",
                    "unit": "Count",
                    "timeseries": series,
                    "errorCode": "Success",
                }
            ],
        }
