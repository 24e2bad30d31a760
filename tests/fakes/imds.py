"""A wire-level fake of the Azure Instance Metadata Service (IMDS), over plain HTTP on 127.0.0.1.

Endpoints (each requires the ``Metadata: true`` header, as IMDS does, and answers 400 without it):

- ``GET /metadata/instance?api-version=...``: ``{"compute": {...}, "network": {...}}`` with
  ``subscriptionId``, ``resourceGroupName``, ``vmScaleSetName``, ``name``, ``resourceId``, ``vmId``, ``location``.
  A Uniform instance is named ``<vmss>_<instanceId>`` with a ``.../virtualMachineScaleSets/<vmss>/virtualMachines/
  <instanceId>`` resource id; a Flexible one has its own VM name and a ``.../virtualMachines/<name>`` id; a VM
  outside any scale set has an empty ``vmScaleSetName``.
- ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...``: the managed identity token, in the
  shape MSAL's ``_obtain_token_on_azure_vm`` (used by azure-identity 1.27's ``ManagedIdentityCredential``) reads:
  ``access_token``, ``expires_in`` (seconds, a string as IMDS sends it), ``expires_on``, ``resource``,
  ``token_type``. Point the credential here with ``AZURE_POD_IDENTITY_AUTHORITY_HOST``.
- ``GET /metadata/scheduledevents?api-version=...``: ``{"DocumentIncarnation": n, "Events": [...]}``, events in
  the documented shape (``EventId``, ``EventType``, ``ResourceType``, ``Resources`` — VM names, ``EventStatus``,
  ``NotBefore`` as an RFC 1123 date, blank once ``Started``, ``Description``, ``EventSource``,
  ``DurationInSeconds``). :meth:`ImdsFake.post_event` schedules one; every change bumps the incarnation.
- ``POST /metadata/scheduledevents?api-version=...`` with ``{"StartRequests": [{"EventId": ...}]}``: approves
  events (recorded in ``acknowledged``; each moves to ``Started``); 400 for a malformed body or an unknown id.

From api-version 2021-03-01 a Flexible instance's ``compute`` also carries ``virtualMachineScaleSet.id``, the scale
set's resource id (older versions omit it), as the schema table of
https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service lists.

Faults, as the same page ("Errors and debugging") and the Scheduled Events page
(https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events) document them:
:meth:`ImdsFake.fail_next` answers the next requests of a path with a status (410 Gone, which IMDS sends for up
to 70 s after boot; 429; 5xx), optionally with ``Retry-After``; ``first_events_delay_s`` holds the first
Scheduled Events GET that long ("the first call ... can take up to two minutes" while the service is enabled).

Every request is counted per path, so tests can see that the credential really asked.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import http.server
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from typing import Any

from tests.fakes._http import BackgroundServer, ServedFake


@dataclasses.dataclass
class VmIdentity:
    """What this fake says about "the VM" that asks."""

    subscription: str
    resource_group: str
    name: str
    resource_id: str
    vm_scale_set_name: str = ""
    vm_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    location: str = "westus"
    flexible_scale_set_id: str = ""

    @classmethod
    def uniform(cls, scale_set_id: str, instance_id: str) -> VmIdentity:
        sub, rg, vmss = _split_scale_set_id(scale_set_id)
        return cls(sub, rg, f"{vmss}_{instance_id}", f"{scale_set_id}/virtualMachines/{instance_id}", vmss)

    @classmethod
    def flexible(cls, scale_set_id: str, vm_name: str) -> VmIdentity:
        sub, rg, vmss = _split_scale_set_id(scale_set_id)
        vm_id = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm_name}"
        return cls(sub, rg, vm_name, vm_id, vmss, flexible_scale_set_id=scale_set_id)

    @classmethod
    def standalone(cls, subscription: str, resource_group: str, vm_name: str) -> VmIdentity:
        vm_id = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{vm_name}"
        )
        return cls(subscription, resource_group, vm_name, vm_id, "")


class ImdsFake(ServedFake):
    """Start it, then point ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` or ``identity.imds_endpoint`` at it."""

    def __init__(self, *, token: str | None = None, token_lifetime_s: int = 3600) -> None:
        self.token = token or f"fake-mi-token-{secrets.token_hex(8)}"
        self.token_lifetime_s = token_lifetime_s
        self.identity: VmIdentity | None = None
        self.scheduled_events: list[dict[str, Any]] = []
        self.document_incarnation = 1
        self.acknowledged: list[str] = []
        """Event ids approved through ``POST`` (``StartRequests``), in order."""
        self.token_status = 200
        """Set to 400 to answer like a VM with no identity assigned."""
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server: BackgroundServer | None = None
        self._faults: dict[str, list[tuple[int, float | None]]] = collections.defaultdict(list)
        self.first_events_delay_s = 0.0
        """The first Scheduled Events GET after this is set waits this long before answering."""
        self.api_versions: list[str] = []
        """The api-version of every ``/metadata/instance`` request, in order."""

    def fail_next(self, path: str, status: int, *, times: int = 1, retry_after_s: float | None = None) -> None:
        """Answer the next ``times`` GETs of ``path`` (e.g. ``/metadata/instance``) with ``status``."""
        with self._lock:
            self._faults[path] += [(status, retry_after_s)] * times

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self.first_events_delay_s = 0.0
            self.api_versions = []

    def start(self) -> ImdsFake:
        self._server = BackgroundServer(_handler_for(self), name="imds-fake")
        return self

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def post_event(
        self,
        event_type: str,
        resources: list[str],
        *,
        not_before_s: float = 30.0,
        status: str = "Scheduled",
        event_id: str | None = None,
    ) -> str:
        """Schedule an event for these VM names, ``not_before_s`` from now; returns its id."""
        event_id = event_id or str(uuid.uuid4()).upper()
        not_before = "" if status == "Started" else email.utils.formatdate(time.time() + not_before_s, usegmt=True)
        event = {
            "EventId": event_id,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(resources),
            "EventStatus": status,
            "NotBefore": not_before,
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        with self._lock:
            self.scheduled_events = [*self.scheduled_events, event]
            self.document_incarnation += 1
        return event_id

    def clear_event(self, event_id: str) -> None:
        """The event is over (or cancelled): it leaves the document."""
        with self._lock:
            self.scheduled_events = [e for e in self.scheduled_events if e.get("EventId") != event_id]
            self.document_incarnation += 1

    def reset_scheduled_events(self) -> None:
        with self._lock:
            self.scheduled_events = []
            self.acknowledged = []
            self.document_incarnation += 1

    def handle_post(self, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        parsed = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        with self._lock:
            self._counts[f"POST {parsed.path}"] += 1
        if headers.get("Metadata", "").lower() != "true" or "api-version" not in query:
            return 400, {"error": "Bad request. Required metadata header or api-version not specified"}
        if parsed.path != "/metadata/scheduledevents":
            return 404, {"error": "Not found"}
        try:
            requests = json.loads(body)["StartRequests"]
            ids = [str(r["EventId"]) for r in requests]
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "Bad request. StartRequests is malformed"}
        with self._lock:
            known = {e.get("EventId"): e for e in self.scheduled_events}
            if not ids or any(i not in known for i in ids):
                return 400, {"error": "Bad request. Unknown EventId"}
            self.scheduled_events = [
                {**e, "EventStatus": "Started", "NotBefore": ""} if e.get("EventId") in ids else e
                for e in self.scheduled_events
            ]
            self.acknowledged += ids
            self.document_incarnation += 1
        return 200, {}

    def handle(self, raw_path: str, headers: Any) -> tuple[int, Any, dict[str, str]]:
        parsed = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        with self._lock:
            self._counts[parsed.path] += 1
            fault = self._faults[parsed.path].pop(0) if self._faults.get(parsed.path) else None
            delay, self.first_events_delay_s = (
                (self.first_events_delay_s, 0.0)
                if parsed.path == "/metadata/scheduledevents"
                else (0.0, self.first_events_delay_s)
            )
        if delay:
            time.sleep(delay)
        if fault is not None:
            status, retry_after = fault
            extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            return status, {"error": f"Injected fault {status}"}, extra
        status, payload = self._answer(parsed.path, query, headers)
        return status, payload, {}

    def _answer(self, path: str, query: dict[str, str], headers: Any) -> tuple[int, Any]:
        if headers.get("Metadata", "").lower() != "true":
            return 400, {"error": "Bad request. Required metadata header not specified"}
        if "api-version" not in query:
            return 400, {"error": "Bad request. api-version was not specified in the request"}
        if path == "/metadata/instance":
            with self._lock:
                self.api_versions.append(query["api-version"])
            return self._instance(query["api-version"])
        if path == "/metadata/identity/oauth2/token":
            return self._token(query)
        if path == "/metadata/scheduledevents":
            with self._lock:
                events = list(self.scheduled_events)
                return 200, {"DocumentIncarnation": self.document_incarnation, "Events": events}
        return 404, {"error": "Not found"}

    def _instance(self, api_version: str) -> tuple[int, Any]:
        ident = self.identity
        if ident is None:
            return 404, {"error": "Not found"}
        compute: dict[str, Any] = {
            "azEnvironment": "AzurePublicCloud",
            "location": ident.location,
            "name": ident.name,
            "osType": "Linux",
            "resourceGroupName": ident.resource_group,
            "resourceId": ident.resource_id,
            "subscriptionId": ident.subscription,
            "vmId": ident.vm_id,
            "vmScaleSetName": ident.vm_scale_set_name,
            "vmSize": "Standard_D2s_v5",
            "zone": "",
        }
        if ident.flexible_scale_set_id and api_version >= "2021-03-01":
            compute["virtualMachineScaleSet"] = {"id": ident.flexible_scale_set_id}
        network = {
            "interface": [{"ipv4": {"ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": ""}]}}]
        }
        return 200, {"compute": compute, "network": network}

    def _token(self, query: dict[str, str]) -> tuple[int, Any]:
        if self.token_status != 200:
            return self.token_status, {
                "error": "invalid_request",
                "error_description": "Identity not found",
            }
        resource = query.get("resource", "")
        if not resource:
            return 400, {
                "error": "invalid_request",
                "error_description": "Required query variable 'resource' is missing",
            }
        now = int(time.time())
        return 200, {
            "access_token": self.token,
            "refresh_token": "",
            "expires_in": str(self.token_lifetime_s),
            "expires_on": str(now + self.token_lifetime_s),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }


def _split_scale_set_id(scale_set_id: str) -> tuple[str, str, str]:
    parts = scale_set_id.strip("/").split("/")
    # subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachineScaleSets/<n>
    assert len(parts) == 8, scale_set_id
    return parts[1], parts[3], parts[7]


def _handler_for(fake: ImdsFake) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status, payload, extra = fake.handle(self.path, self.headers)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = fake.handle_post(self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

    return Handler
