"""The Service Bus admin (ATOM) endpoint: enough for ``ServiceBusAdministrationClient`` runtime properties.

``GET /<queue>?api-version=...&enrich=false`` answers an ATOM ``entry`` whose content is a ``QueueDescription``
with ``CountDetails``, computed from the fake broker's live state, over HTTPS (a ``trustme`` certificate; clients
pass ``connection_verify=<ca.pem>``). An unknown queue gets an empty ``feed``, as the service does, which the SDK
turns into ``ResourceNotFoundError``. Every request is counted per path, so tests can check caching.

Followed: the Service Bus REST reference ("Get Entity", "Queue description"), the XML element names and namespaces
in ``azure/servicebus/management/_generated/models/_models.py`` (azure-servicebus 7.15), and the example responses
in Azure/azure-rest-api-specs (``specification/servicebus/data-plane``). Counting semantics follow the service:
a locked message is still *active*; ``MessageCount`` is the sum of the ``CountDetails`` counters;
``RequiresDuplicateDetection`` is the queue's own setting.

``manage_rights = False`` plays an identity without Manage: the service answers 401 with "Manage,EntityRead claims
required for this operation" (``SubCode=40100``), as "Service Bus messaging exceptions" lists for
``UnauthorizedAccessException`` (https://learn.microsoft.com/en-us/azure/service-bus-messaging/
service-bus-messaging-exceptions-latest).
"""

from __future__ import annotations

import collections
import datetime
import http.server
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import trustme

from tests.fakes._http import BackgroundServer
from tests.fakes.servicebus_amqp import ServiceBusBroker

_CONNECT_NS = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
_COUNTS_NS = "http://schemas.microsoft.com/netservices/2011/06/servicebus"
MANAGE_CLAIMS_REQUIRED = (
    b"<Error><Code>401</Code><Detail>Manage,EntityRead claims required for this operation. "
    b"TrackingId:00000000-0000-0000-0000-000000000000, SystemTracker:fake-namespace, "
    b"Timestamp:2026-01-01T00:00:00 SubCode=40100</Detail></Error>"
)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _duration(seconds: float) -> str:
    return f"PT{seconds:g}S"


class HttpsFake:
    """A threaded HTTPS server on 127.0.0.1 and a free port that hands each request to ``handle``.

    ``handle(method, path, query, headers, body) -> (status, content_type, body)``.
    """

    def __init__(self, ca: trustme.CA, handle: Callable[..., tuple[int, str, bytes]], *, name: str) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self._handle = handle
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests[parts.path] += 1
                status, content_type, payload = fake._handle(
                    self.command, parts.path, parse_qs(parts.query), dict(self.headers), body
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815  (http.server's naming)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = BackgroundServer(Handler, name=name, ca=ca)
        self.port = self._server.port

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    def start(self) -> HttpsFake:
        return self  # already serving: kept so callers read as start/stop pairs

    def stop(self) -> None:
        self._server.stop()


class ServiceBusAdminServer:
    """The admin endpoint for one fake broker."""

    def __init__(self, broker: ServiceBusBroker, ca: trustme.CA) -> None:
        self.broker = broker
        self._https = HttpsFake(ca, self._handle, name="fake-servicebus-admin")
        self.manage_rights = True
        """``False``: every caller lacks Manage claims (401 ``SubCode=40100``)."""

    @property
    def endpoint(self) -> str:
        return self._https.endpoint

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._https.port}"

    def request_count(self, queue_name: str) -> int:
        return self._https.requests[f"/{queue_name}"]

    def start(self) -> ServiceBusAdminServer:
        self._https.start()
        return self

    def stop(self) -> None:
        self._https.stop()

    def _handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], _body: bytes
    ) -> tuple[int, str, bytes]:
        if "Authorization" not in headers:
            return 401, "application/xml", b"<Error><Code>401</Code><Detail>MissingToken</Detail></Error>"
        if not self.manage_rights:
            return 401, "application/xml", MANAGE_CLAIMS_REQUIRED
        if method != "GET" or "api-version" not in query:
            return 400, "application/xml", b"<Error><Code>400</Code><Detail>Bad request</Detail></Error>"
        name = path.strip("/")
        info = self.broker.queue_info(name)
        self_link = escape(f"{self.endpoint}{path}?api-version={query['api-version'][0]}")
        if info is None:
            return 200, "application/atom+xml;type=feed;charset=utf-8", self._empty_feed(self_link).encode()
        entity, counts = info
        return 200, "application/atom+xml;type=entry;charset=utf-8", self._entry(name, entity, counts, self_link)

    def _empty_feed(self, self_link: str) -> str:
        return (
            '<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Publicly Listed Services</title>'
            f'<subtitle type="text">This is the list of publicly-listed services currently available.</subtitle>'
            f"<id>uuid:00000000-0000-0000-0000-000000000000;id=1</id><updated>{_iso(0)}</updated>"
            "<generator>Service Bus 1.1</generator></feed>"
        )

    def _entry(self, name: str, entity: Any, counts: Any, self_link: str) -> bytes:
        active = counts.active + counts.locked  # the service counts locked messages as active
        total = active + counts.dead_lettered + counts.scheduled
        desc = f"""<QueueDescription xmlns="{_CONNECT_NS}" xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
<LockDuration>{_duration(entity.lock_duration_s)}</LockDuration>
<MaxSizeInMegabytes>1024</MaxSizeInMegabytes>
<RequiresDuplicateDetection>{str(entity.requires_duplicate_detection).lower()}</RequiresDuplicateDetection>
<RequiresSession>false</RequiresSession>
<DefaultMessageTimeToLive>P10675199DT2H48M5.4775807S</DefaultMessageTimeToLive>
<DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration>
<DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow>
<MaxDeliveryCount>{entity.max_delivery_count}</MaxDeliveryCount>
<EnableBatchedOperations>true</EnableBatchedOperations>
<SizeInBytes>{counts.size_bytes}</SizeInBytes>
<MessageCount>{total}</MessageCount>
<IsAnonymousAccessible>false</IsAnonymousAccessible>
<Status>Active</Status>
<CreatedAt>{_iso(entity.created_at)}</CreatedAt>
<UpdatedAt>{_iso(entity.updated_at)}</UpdatedAt>
<AccessedAt>{_iso(entity.accessed_at)}</AccessedAt>
<SupportOrdering>true</SupportOrdering>
<CountDetails xmlns:d2p1="{_COUNTS_NS}">
<d2p1:ActiveMessageCount>{active}</d2p1:ActiveMessageCount>
<d2p1:DeadLetterMessageCount>{counts.dead_lettered}</d2p1:DeadLetterMessageCount>
<d2p1:ScheduledMessageCount>{counts.scheduled}</d2p1:ScheduledMessageCount>
<d2p1:TransferMessageCount>0</d2p1:TransferMessageCount>
<d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount>
</CountDetails>
<AutoDeleteOnIdle>P10675199DT2H48M5.4775807S</AutoDeleteOnIdle>
<EnablePartitioning>false</EnablePartitioning>
<EntityAvailabilityStatus>Available</EntityAvailabilityStatus>
<EnableExpress>false</EnableExpress>
</QueueDescription>"""
        now = _iso(entity.updated_at)
        entry = f"""<?xml version="1.0" encoding="utf-8"?>
<entry xmlns="http://www.w3.org/2005/Atom"><id>{self_link}</id><title type="text">{escape(name)}</title>
<published>{_iso(entity.created_at)}</published><updated>{now}</updated>
<author><name>fake-namespace</name></author><link rel="self" href="{self_link}"/>
<content type="application/xml">{desc}</content></entry>"""
        return entry.encode()


def write_ca(ca: trustme.CA, folder: Path) -> Path:
    """The CA bundle clients pass as ``connection_verify``."""
    path = folder / "fake-azure-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
