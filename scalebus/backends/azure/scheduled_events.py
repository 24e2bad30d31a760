"""Spot evictions and other maintenance, on an Azure VM: IMDS Scheduled Events behind ``base.NoticeSource``.

``GET /metadata/scheduledevents`` answers ``{"DocumentIncarnation": n, "Events": [...]}`` for every VM of the
scale set's placement group, so each event's ``Resources`` (VM names, as IMDS ``compute.name`` spells them) says
whom it concerns; events naming other VMs are dropped here. ``NotBefore`` is an RFC 1123 date, blank once the
event has ``Started``. ``POST`` ``{"StartRequests": [{"EventId": ...}]}`` approves an event so it starts without
waiting for ``NotBefore`` — for *every* VM it names, which is why ``Notice.others_affected`` exists. IMDS answers
only from inside the VM, with ``Metadata: true``, never through a proxy; the first request of a VM may take a
while (it enables the service), which a later poll absorbs. Event types this code does not know are ignored.
"""

from __future__ import annotations

import email.utils
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _errors, _retry
from scalebus.backends.azure.imds import DEFAULT_IMDS_ENDPOINT, TRANSIENT_STATUS

log = structlog.get_logger(__name__)

SCHEDULED_EVENTS_API_VERSION = "2020-07-01"


class ImdsNoticeSource:
    """``base.NoticeSource`` from IMDS scheduled events, for the VM named ``vm_name`` (IMDS ``compute.name``)."""

    def __init__(self, endpoint: str = DEFAULT_IMDS_ENDPOINT, *, vm_name: str, timeout_s: float = 10.0) -> None:
        if not vm_name:
            raise errors.NoticeError("scheduled events need this VM's name (IMDS compute.name) to pick its events")
        self._url = (
            f"{endpoint.rstrip('/')}/metadata/scheduledevents?"
            f"{urllib.parse.urlencode({'api-version': SCHEDULED_EVENTS_API_VERSION})}"
        )
        self._vm_name = vm_name
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # IMDS: never via a proxy
        self.incarnation: int | None = None
        """The ``DocumentIncarnation`` last read (it grows whenever the events change)."""

    def pending(self) -> list[base.Notice]:
        document = self._call("read scheduled events")
        if not isinstance(document, dict) or not isinstance(document.get("Events"), list):
            raise errors.NoticeError("IMDS scheduled events answered without an 'Events' list")
        incarnation = document.get("DocumentIncarnation")
        if isinstance(incarnation, int) and incarnation != self.incarnation:
            log.debug("scheduled_events_changed", incarnation=incarnation, events=len(document["Events"]))
            self.incarnation = incarnation
        return notices_for(document["Events"], vm_name=self._vm_name)

    def acknowledge(self, event_id: str) -> None:
        self._call(f"acknowledge scheduled event {event_id}", body={"StartRequests": [{"EventId": event_id}]})

    def close(self) -> None:
        """Nothing to release: each call is one short HTTP request."""

    def _call(self, what: str, *, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Metadata": "true"} | ({"Content-Type": "application/json"} if data is not None else {})

        @_retry.retry_metadata_call
        def attempt() -> Any:
            request = urllib.request.Request(self._url, data=data, headers=headers)
            try:
                with self._opener.open(request, timeout=self._timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                exc.close()  # its body is not needed, and an open one leaks the socket
                if exc.code in TRANSIENT_STATUS:
                    raise errors.TransientNoticeError(
                        f"{what}: IMDS answered HTTP {exc.code}", retry_after_s=_errors.retry_after_s(exc)
                    ) from exc
                raise errors.NoticeError(f"{what}: IMDS answered HTTP {exc.code}") from exc
            except (urllib.error.URLError, OSError) as exc:  # timeouts included: the next poll asks again
                raise errors.TransientNoticeError(f"{what}: IMDS unreachable ({type(exc).__name__})") from exc
            if not raw.strip():
                return None
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise errors.NoticeError(f"{what}: IMDS answered something that is not JSON") from exc

        return attempt()


def notices_for(events: list[Any], *, vm_name: str) -> list[base.Notice]:
    """The events of an IMDS ``Events`` list that name ``vm_name`` (case-insensitive), as notices (pure)."""
    me = vm_name.lower()
    notices = []
    for event in events:
        if not isinstance(event, dict):
            continue
        resources = [str(r).lower() for r in event.get("Resources") or []]
        if me not in resources or event.get("ResourceType", "VirtualMachine") != "VirtualMachine":
            continue
        try:
            kind = base.NoticeKind(str(event.get("EventType")))
        except ValueError:
            log.debug("scheduled_event_type_unknown", event_type=event.get("EventType"))
            continue
        started = event.get("EventStatus") == "Started"
        notices.append(
            base.Notice(
                event_id=str(event.get("EventId") or ""),
                kind=kind,
                not_before=None if started else parse_not_before(event.get("NotBefore")),
                started=started,
                others_affected=any(r != me for r in resources),
            )
        )
    return notices


def parse_not_before(value: object) -> float | None:
    """Epoch seconds from an RFC 1123 ``NotBefore`` (``Mon, 19 Sep 2016 18:29:47 GMT``); ``None`` when blank or
    unreadable, which callers treat as *now* — the safe reading for a notice that may cost the VM."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
