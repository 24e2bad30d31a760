"""The scale-set port over an Azure Virtual Machine Scale Set, through ``azure-mgmt-compute``.

Boundary: this module turns ARM resources into ``base.Instance`` values and ARM failures into
``errors.ScaleSetError``; it decides nothing. Both orchestration modes are handled and detected from the scale
set itself: **Uniform** instances come from the scale set's ``virtualMachines`` (instance ids ``0``, ``1``, ...);
**Flexible** instances are ordinary VMs filtered by ``virtualMachineScaleSet/id`` and their instance id is the VM
name (the id ``delete`` and the instance-protection API take). Instance protection on Flexible needs
api-version 2023-09-01 or later; the SDK's default (2026-04-01) is.

ARM allows a scale set about four updates and four VM deletions per minute, so every write is one request:
``set_capacity`` PATCHes ``sku.capacity`` once and polls the long-running operation to its end (a concurrent
call waits for it instead of writing again), ``delete_instances`` is one batch ``POST .../delete``. The SDK's own
retry policy is switched off: retries happen here, through the named policies in ``_retry`` (429 waits at least
``Retry-After``; 5xx backs off), and a poll that fails after the write was accepted resumes polling from the
operation's continuation token rather than writing again. Every HTTP request and every 429 is counted in
:class:`ArmCallStats` for the controller to log, with the lowest ``x-ms-ratelimit-remaining-*`` count seen last.

Reads are sized for fleets of thousands. ``list_instances`` is one listing without ``$expand=instanceView``,
every ``nextLink`` followed, each page read as raw JSON through the client's pipeline for the few fields used
(deserialising SDK models cost ~4x the CPU); the state comes from ``provisioningState``. The power state (a
stopped or deallocated VM, a Failed one still running) is in each VM's instance view, read by
``instance_states`` only for the instances the controller asks about (no fresh heartbeat), bounded per call and
reused for a while. Compute throttles VM reads per subscription and region in its own buckets, reported in
``x-ms-ratelimit-remaining-resource`` (``Microsoft.Compute/HighCostGet3Min;<n>``: "Troubleshooting API
throttling errors", https://learn.microsoft.com/en-us/troubleshoot/azure/virtual-machines/
troubleshooting-throttling-errors; "Understand how Azure Resource Manager throttles requests",
https://learn.microsoft.com/en-us/azure/azure-resource-manager/management/request-limits-and-throttling): when
that budget runs low the optional views are skipped and the listing is reused for a while, so the reads that
matter are not the ones throttled.

Azure's unhappy paths handled here: a 409 (another operation holds the scale set, or the instance is marked for
deletion) is transient; an accepted operation that ends ``Canceled`` or ``Failed`` with ``OperationPreempted``
(a newer operation overrode it) is sent again, up to a few times; scaling a Uniform scale set with
``overprovision`` on is refused before the first write, because Azure would boot extra VMs whose workers take jobs
before it deletes them; an instance without ``timeCreated`` counts from when this adapter first saw it, so it is
never taken for ancient; a VM whose last operation failed but that still runs counts as running once its view
is read (the controller's own rule, a fresh heartbeat is health, needs no view).
On Flexible, the VM resource does not carry the instance's protection policy, so it is read once per VM through
the scale-set VM API (supported for Flexible from api-version 2023-09-01, "Instance protection for Azure Virtual
Machine Scale Set instances", https://learn.microsoft.com/en-us/azure/virtual-machine-scale-sets/
virtual-machine-scale-sets-instance-protection) and then kept up to date by our own writes: a restarted
controller sees the protection a previous one set. The token audience follows ``arm_endpoint`` (Azure China and
US Government use their own, as ``azure.mgmt.core.tools.get_arm_endpoints`` lists).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import structlog
from azure.core import AzureClouds
from azure.core.credentials import TokenCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.polling import LROPoller
from azure.core.polling.base_polling import OperationFailed
from azure.core.rest import HttpRequest, HttpResponse
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as compute_models
from azure.mgmt.core.tools import get_arm_endpoints

from scalebus import errors, settings
from scalebus.backends import base
from scalebus.backends.azure import _errors, _retry

log = structlog.get_logger(__name__)

DEFAULT_ARM_ENDPOINT = "https://management.azure.com"

_SCALE_SET_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/\s]+)/resourceGroups/(?P<rg>[^/\s]+)"
    r"/providers/Microsoft\.Compute/virtualMachineScaleSets/(?P<name>[^/\s]+)/?$",
    re.IGNORECASE,
)
_UNIFORM = "Uniform"
_FLEXIBLE = "Flexible"
_NOT_RUNNING = frozenset({"stopped", "stopping", "deallocated", "deallocating"})
_OPERATION_SENDS = 3
"""How often one write is sent when its operation ends Canceled or preempted."""
_RESENT_CODES = frozenset({"operationpreempted", "conflict", "retryableerror"})
_API_VERSION = "2026-04-01"
"""The listing and instance-view requests' api-version: azure-mgmt-compute 39's default, as its own calls use."""
_ERROR_TYPES: dict[int, type[HttpResponseError]] = {401: ClientAuthenticationError, 404: ResourceNotFoundError}
_VIEWS_PER_CALL = 20
"""Instance views read per :meth:`VmssScaleSet.instance_states` call (one controller poll)."""
_VIEW_TTL_S = 60.0
"""How long an instance's view stands before it is read again."""
_VIEW_PAUSE_S = 600.0
"""No views for this long after one was refused for good (403: the role lacks ``.../instanceView/read``)."""
_HIGH_COST_GET_RESERVE = 30
"""Below this many ``HighCostGet`` reads left, views are skipped and listings slowed: the listing needs them."""
_SLOW_LISTING_S = 30.0
"""While the read budget is low, a listing is reused for this long instead of read again."""


def arm_token_scope(arm_endpoint: str) -> str:
    """The token scope for an ARM endpoint: each sovereign cloud's own audience, else ``<endpoint>/.default``."""
    wanted = arm_endpoint.rstrip("/").lower()
    for cloud in AzureClouds:
        endpoints = get_arm_endpoints(cloud)
        if str(endpoints["resource_manager"]).rstrip("/").lower() == wanted:
            return str(endpoints["credential_scopes"][0])
    return f"{arm_endpoint.rstrip('/')}/.default"


# --------------------------------------------------------------------------------------------- resource ids


@dataclasses.dataclass(frozen=True, slots=True)
class ScaleSetRef:
    """Where a scale set lives in ARM."""

    subscription_id: str
    resource_group: str
    name: str

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachineScaleSets/{self.name}"
        )


def parse_scale_set_id(value: str, *, key: str = "scale_set.url") -> ScaleSetRef:
    """Split a scale set's ARM resource id; a malformed one is a ``ConfigError`` naming ``key``."""
    match = _SCALE_SET_ID.match(value.strip())
    if match is None:
        raise errors.ConfigError(
            key,
            f"{value!r} is not the ARM resource id of a VM scale set",
            "use /subscriptions/<subscription>/resourceGroups/<group>/providers/Microsoft.Compute/"
            "virtualMachineScaleSets/<name> (az vmss show --query id)",
        )
    return ScaleSetRef(match["sub"], match["rg"], match["name"])


# --------------------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True, slots=True)
class ArmCallStats:
    """ARM requests made by one adapter since it was built (a snapshot; every retry and poll counts)."""

    calls: int = 0
    writes: int = 0
    throttled: int = 0
    server_errors: int = 0
    ratelimit_remaining: int | None = None
    """The lowest count in the last answer's ``x-ms-ratelimit-remaining-*`` headers (ARM's request budget left)."""
    high_cost_gets_remaining: int | None = None
    """The lowest ``Microsoft.Compute/HighCostGet*`` count in the last answer that carried one: the VM read
    budget that VM listings and instance views draw on."""


class _CallCounter(SansIOHTTPPolicy[Any, Any]):
    """Sits after the (disabled) SDK retry policy, so it sees every request on the wire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ArmCallStats()

    @property
    def stats(self) -> ArmCallStats:
        with self._lock:
            return self._stats

    def on_request(self, request: PipelineRequest[Any]) -> None:
        write = request.http_request.method.upper() != "GET"
        with self._lock:
            self._stats = dataclasses.replace(
                self._stats, calls=self._stats.calls + 1, writes=self._stats.writes + int(write)
            )

    def on_response(self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]) -> None:
        status = response.http_response.status_code
        if status == 429:
            retry_after = _errors.retry_after_s(response.http_response)
            log.warning("arm_throttled", method=request.http_request.method, retry_after_s=retry_after)
        headers = response.http_response.headers
        remaining = ratelimit_remaining(headers)
        high_cost = high_cost_gets_remaining(headers)
        with self._lock:
            self._stats = dataclasses.replace(
                self._stats,
                throttled=self._stats.throttled + int(status == 429),
                server_errors=self._stats.server_errors + int(status >= 500),
                ratelimit_remaining=remaining if remaining is not None else self._stats.ratelimit_remaining,
                high_cost_gets_remaining=self._stats.high_cost_gets_remaining if high_cost is None else high_cost,
            )


def ratelimit_remaining(headers: Any) -> int | None:
    """The lowest remaining count in ARM's throttling headers: ``x-ms-ratelimit-remaining-subscription-reads``
    (a number) and ``x-ms-ratelimit-remaining-resource`` (``Microsoft.Compute/HighCostGet3Min;107,...``)."""
    counts: list[int] = []
    for key, value in headers.items():
        if not str(key).lower().startswith("x-ms-ratelimit-remaining-"):
            continue
        for part in str(value).split(","):
            digits = part.rsplit(";", 1)[-1].strip()
            if digits.isdigit():
                counts.append(int(digits))
    return min(counts) if counts else None


def high_cost_gets_remaining(headers: Any) -> int | None:
    """The lowest ``Microsoft.Compute/HighCostGet*`` count in ``x-ms-ratelimit-remaining-resource``
    (``Microsoft.Compute/HighCostGet3Min;107,Microsoft.Compute/HighCostGet30Min;512``), or ``None``."""
    counts: list[int] = []
    for key, value in headers.items():
        if str(key).lower() != "x-ms-ratelimit-remaining-resource":
            continue
        for part in str(value).split(","):
            policy, _, digits = part.strip().rpartition(";")
            if "/highcostget" in policy.lower() and digits.strip().isdigit():
                counts.append(int(digits))
    return min(counts) if counts else None


# --------------------------------------------------------------------------------------------- state mapping


def instance_state(provisioning_state: str | None, power_state: str | None) -> base.InstanceState:
    """One instance's state from ARM's provisioning state and the ``PowerState/...`` code.

    A stopped or deallocated VM does no work and does not start by itself: for the controller it is broken. A VM
    whose last operation failed (an extension, a model update) but that still runs may hold a job: it counts as
    running, and the controller's heartbeat rules tell whether its worker is alive.
    """
    provisioning = (provisioning_state or "").lower()
    power = (power_state or "").lower()
    if provisioning == "deleting":
        return base.InstanceState.DELETING
    if provisioning == "failed":
        return base.InstanceState.RUNNING if power == "running" else base.InstanceState.FAILED
    if provisioning == "creating":
        return base.InstanceState.STARTING
    if power == "running":
        return base.InstanceState.RUNNING
    if power in _NOT_RUNNING:
        return base.InstanceState.FAILED
    return base.InstanceState.STARTING


def listed_state(provisioning_state: str | None) -> base.InstanceState:
    """One instance's state from its provisioning state alone, as a listing without ``instanceView`` reports it:
    ``Creating`` is starting, ``Deleting`` deleting, ``Failed`` failed, anything else (``Succeeded``,
    ``Updating``) running. Only an instance view tells a stopped or deallocated VM, or a failed one that still
    runs: :meth:`VmssScaleSet.instance_states` asks for it where the controller needs it."""
    provisioning = (provisioning_state or "").lower()
    if provisioning == "creating":
        return base.InstanceState.STARTING
    if provisioning == "deleting":
        return base.InstanceState.DELETING
    if provisioning == "failed":
        return base.InstanceState.FAILED
    return base.InstanceState.RUNNING


def _power_state(statuses: Iterable[Any] | None) -> str | None:
    """The ``PowerState/...`` code of an instance view's statuses (JSON objects)."""
    for status in statuses or ():
        code = str(status.get("code") or "") if isinstance(status, dict) else ""
        if code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return None


def _epoch(value: Any) -> float | None:
    """ARM's ISO 8601 timestamps (``2026-04-01T10:00:00.1234567+00:00``; 3.11 reads the 7 digits); a missing or
    unreadable one is ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- adapter


def open_scale_set(cfg: settings.ScaleSetSettings, *, credential: TokenCredential | None = None) -> VmssScaleSet:
    """The scale set named by ``scale_set.url``; authenticates with ``DefaultAzureCredential`` unless told
    otherwise (on a VM that is its managed identity, through IMDS)."""
    parse_scale_set_id(cfg.url)  # a ConfigError before any credential is built
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return VmssScaleSet(
        cfg.url,
        credential=credential,
        arm_endpoint=cfg.arm_endpoint,
        connection_verify=cfg.connection_verify,
        polling_interval_s=cfg.polling_interval_s,
    )


class VmssScaleSet:
    """``base.ScaleSet`` over one VM scale set (Uniform or Flexible), addressed by its ARM resource id."""

    def __init__(
        self,
        scale_set_id: str,
        *,
        credential: TokenCredential,
        arm_endpoint: str = DEFAULT_ARM_ENDPOINT,
        connection_verify: str = "",
        polling_interval_s: float = 15.0,
    ) -> None:
        self._ref = parse_scale_set_id(scale_set_id)
        self._endpoint = arm_endpoint.rstrip("/")
        self._polling_interval_s = polling_interval_s
        self._counter = _CallCounter()
        self._client = ComputeManagementClient(
            credential,
            self._ref.subscription_id,
            base_url=arm_endpoint.rstrip("/"),
            credential_scopes=[arm_token_scope(arm_endpoint)],
            connection_verify=connection_verify or True,
            retry_total=0,
            per_retry_policies=[self._counter],
            logging_enable=False,
        )
        self._mode: str | None = None
        self._location: str | None = None
        self._overprovision: bool | None = None
        self._write_done = threading.Condition()
        self._capacity_in_flight: int | None = None
        self._last_capacity_write: tuple[int, bool] | None = None
        self._protection: dict[str, bool] = {}
        """Flexible: each VM's protection as read once from Azure, then as we set it."""
        self._first_seen: dict[str, float] = {}
        self._listing: tuple[float, list[base.Instance]] | None = None
        """The last listing and when (``time.monotonic``) it was read: reused while the read budget is low."""
        self._provisioning: dict[str, str] = {}
        """Each listed instance's provisioning state, from the last listing."""
        self._power: dict[str, tuple[str | None, float]] = {}
        """Power state from each instance's last view, and when it was read."""
        self._views_paused_until = 0.0
        self._budget_low = False
        self._log = log.bind(scale_set=self._ref.name)

    # -- facts ------------------------------------------------------------------------------------------------

    @property
    def resource_id(self) -> str:
        return self._ref.resource_id

    @property
    def stats(self) -> ArmCallStats:
        """Every ARM request and 429 so far (the controller logs this)."""
        return self._counter.stats

    @property
    def orchestration_mode(self) -> str:
        """``"Uniform"`` or ``"Flexible"``, read from the scale set once."""
        if self._mode is None:
            self._read_scale_set()
        assert self._mode is not None
        return self._mode

    def close(self) -> None:
        self._client.close()

    # -- reads ------------------------------------------------------------------------------------------------

    def get_capacity(self) -> int:
        vmss = self._read_scale_set()
        return int(vmss.sku.capacity or 0) if vmss.sku is not None else 0

    def list_instances(self) -> list[base.Instance]:
        """Every instance, from one listing without ``instanceView`` (all its pages); while the VM read budget
        runs low, the last listing stands for up to ``_SLOW_LISTING_S``."""
        now = time.monotonic()
        if self._listing is not None and self._read_budget_low() and now - self._listing[0] < _SLOW_LISTING_S:
            return list(self._listing[1])
        return self._list_now()

    def _list_now(self) -> list[base.Instance]:
        flexible = self.orchestration_mode == _FLEXIBLE
        items = list(self._list_items(flexible=flexible))
        found = [self._instance(item, flexible=flexible) for item in items]
        self._provisioning = {
            instance.instance_id: str((item.get("properties") or {}).get("provisioningState") or "")
            for instance, item in zip(found, items, strict=True)
        }
        self._power = {iid: seen for iid, seen in self._power.items() if iid in self._provisioning}
        self._listing = (time.monotonic(), found)
        return list(found)

    def instance_states(self, instance_ids: Sequence[str]) -> dict[str, base.InstanceState]:
        """The state of some listed instances with their power state, from each one's instance view: a stopped or
        deallocated VM is failed, a failed one that still runs is running. Optional calls, so bounded: at most
        ``_VIEWS_PER_CALL`` views per call (the least recently read first), each reused for ``_VIEW_TTL_S``,
        none while the VM read budget is low or after a view was refused. Instances whose listed state a view
        cannot change (creating, deleting) and those left for later are absent: their listed state stands."""
        now = time.monotonic()
        wanted = [
            iid
            for iid in dict.fromkeys(instance_ids)
            if listed_state(self._provisioning.get(iid, "creating"))
            in (base.InstanceState.RUNNING, base.InstanceState.FAILED)
        ]
        due = sorted(
            (iid for iid in wanted if now - self._power.get(iid, (None, -_VIEW_TTL_S))[1] >= _VIEW_TTL_S),
            key=lambda iid: self._power.get(iid, (None, -_VIEW_TTL_S))[1],
        )
        if due and not self._read_budget_low() and now >= self._views_paused_until:
            self._read_views(due[:_VIEWS_PER_CALL], now)
        # .get only: a deletion on the write thread may drop an entry meanwhile.
        seen = {iid: self._power.get(iid) for iid in wanted}
        return {iid: instance_state(self._provisioning.get(iid), v[0]) for iid, v in seen.items() if v is not None}

    def _read_views(self, instance_ids: Sequence[str], now: float) -> None:
        """One GET ``.../instanceView`` each, one attempt each (optional calls never wait out a throttle)."""
        for iid in instance_ids:
            try:
                with _errors.translated(_errors.SCALE_SET, what=f"instance view {iid} of {self._ref.name}"):
                    body = self._get_json(self._view_request(iid))
            except errors.InstanceNotFoundError:
                continue  # deleted since the listing
            except errors.ScaleSetError as exc:
                pause = _VIEW_PAUSE_S if not exc.transient else 0.0
                self._views_paused_until = now + pause
                self._log.warning("instance_views_skipped", error=str(exc), paused_s=pause)
                return
            self._power[iid] = (_power_state(body.get("statuses")), now)

    def _read_budget_low(self) -> bool:
        """Whether ARM's ``Microsoft.Compute/HighCostGet*`` budget is nearly spent (logged when that changes)."""
        remaining = self._counter.stats.high_cost_gets_remaining
        low = remaining is not None and remaining < _HIGH_COST_GET_RESERVE
        if low != self._budget_low:
            self._budget_low = low
            self._log.warning("arm_read_budget", low=low, high_cost_gets_remaining=remaining)
        return low

    def _list_items(self, *, flexible: bool) -> Iterator[dict[str, Any]]:
        """The listing's items across pages, following ``nextLink`` (each page read with the read retry policy).
        Raw JSON through the client's pipeline: model deserialisation cost ~4x the CPU of the whole parse."""
        request: HttpRequest | None = self._list_request(flexible=flexible)
        while request is not None:
            body = self._read("list instances", functools.partial(self._get_json, request))
            yield from (item for item in body.get("value") or () if isinstance(item, dict))
            request = self._next_page(body.get("nextLink"))

    def _list_request(self, *, flexible: bool) -> HttpRequest:
        group = f"/subscriptions/{self._ref.subscription_id}/resourceGroups/{self._ref.resource_group}"
        params = {"api-version": _API_VERSION}
        if flexible:
            params["$filter"] = f"'virtualMachineScaleSet/id' eq '{self._ref.resource_id}'"
            return HttpRequest("GET", f"{group}/providers/Microsoft.Compute/virtualMachines", params=params)
        return HttpRequest("GET", f"{self._ref.resource_id}/virtualMachines", params=params)

    def _view_request(self, instance_id: str) -> HttpRequest:
        params = {"api-version": _API_VERSION}
        if self.orchestration_mode == _FLEXIBLE:
            group = f"/subscriptions/{self._ref.subscription_id}/resourceGroups/{self._ref.resource_group}"
            path = f"{group}/providers/Microsoft.Compute/virtualMachines/{instance_id}/instanceView"
        else:
            path = f"{self._ref.resource_id}/virtualMachines/{instance_id}/instanceView"
        return HttpRequest("GET", path, params=params)

    def _next_page(self, next_link: Any) -> HttpRequest | None:
        """The next page's request; a ``nextLink`` to another host is refused (the bearer token goes with it)."""
        if not next_link:
            return None
        link = str(next_link)
        if not link.lower().startswith(self._endpoint.lower() + "/"):
            raise errors.ScaleSetError(f"list instances {self._ref.name}: nextLink leaves {self._endpoint}")
        return HttpRequest("GET", link)

    def _get_json(self, request: HttpRequest) -> dict[str, Any]:
        """Send one GET through the client's pipeline (auth, call counting); an error status raises as the SDK
        would, for ``_errors`` to translate."""
        response: HttpResponse = self._client.send_request(request)
        if response.status_code != 200:
            error = _ERROR_TYPES.get(response.status_code, HttpResponseError)
            raise error(response=response)
        body = json.loads(response.content) if response.content else {}
        return body if isinstance(body, dict) else {}

    def _instance(self, item: dict[str, Any], *, flexible: bool) -> base.Instance:
        props = item.get("properties") or {}
        name = str(item.get("name") or "")
        instance_id = name if flexible else str(item.get("instanceId") or "")
        known = _epoch(props.get("timeCreated"))
        first_seen = self._first_seen.setdefault(instance_id, time.time())
        if flexible:
            protected = self._flexible_protection(name)
        else:
            protected = bool((props.get("protectionPolicy") or {}).get("protectFromScaleIn"))
        return base.Instance(
            instance_id=instance_id,
            state=listed_state(props.get("provisioningState")),
            created_at=known if known is not None else first_seen,
            protected=protected,
            name=name,
            model=_image_of_json(props),
        )

    def _read_scale_set(self) -> Any:
        vmss = self._read(
            "get scale set",
            lambda: self._client.virtual_machine_scale_sets.get(self._ref.resource_group, self._ref.name),
        )
        props = vmss.properties
        mode = getattr(props, "orchestration_mode", None) if props is not None else None
        mode = getattr(mode, "value", mode)  # an SDK enum or a plain string
        self._mode = _FLEXIBLE if str(mode or "").lower() == "flexible" else _UNIFORM
        self._location = vmss.location
        self._overprovision = self._mode == _UNIFORM and props is not None and bool(props.overprovision)
        return vmss

    def _refuse_overprovisioning(self) -> None:
        """Scaling a Uniform scale set with overprovision on boots extra VMs whose workers take jobs before Azure
        deletes them: refused before the first write (reads and self-destroy still work)."""
        if self._overprovision is None:
            self._read_scale_set()
        if self._overprovision:
            raise errors.ConfigError(
                "scale_set.url",
                f"scale set {self._ref.name} has overprovision on: Azure boots extra VMs whose workers take jobs "
                "before Azure deletes them",
                f"turn it off: az vmss update -g {self._ref.resource_group} -n {self._ref.name} "
                "--set overprovision=false",
            )

    def _flexible_protection(self, name: str) -> bool:
        """The VM resource lacks the instance's protection policy: read it once through the scale-set VM API."""
        if name not in self._protection:
            try:
                vm = self._client.virtual_machine_scale_set_vms.get(self._ref.resource_group, self._ref.name, name)
            except ResourceNotFoundError:
                return False  # deleted since the listing: nothing to protect
            policy = vm.properties.protection_policy if vm.properties is not None else None
            self._protection[name] = bool(policy is not None and policy.protect_from_scale_in)
        return self._protection[name]

    # -- writes -----------------------------------------------------------------------------------------------

    def set_capacity(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._refuse_overprovisioning()
        with self._write_done:
            while self._capacity_in_flight is not None:
                # One write at a time: a call for the capacity already being written rides on that write.
                riding = self._capacity_in_flight == capacity
                self._write_done.wait()
                if riding and self._last_capacity_write == (capacity, True):
                    return
            self._capacity_in_flight = capacity
        succeeded = False
        try:
            body = compute_models.VirtualMachineScaleSetUpdate(sku=compute_models.Sku(capacity=capacity))
            self._run_operation(
                "set capacity",
                lambda **kw: self._client.virtual_machine_scale_sets.begin_update(
                    self._ref.resource_group, self._ref.name, body, polling_interval=self._polling_interval_s, **kw
                ),
            )
            succeeded = True
            self._log.info("capacity_set", capacity=capacity, arm_calls=self.stats.calls)
        finally:
            with self._write_done:
                self._capacity_in_flight = None
                self._last_capacity_write = (capacity, succeeded)
                self._write_done.notify_all()

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(str(i) for i in instance_ids))
        if not wanted:
            return
        try:
            self._delete(wanted)
        except errors.ScaleSetError as exc:
            if exc.transient:
                raise
            # Azure refuses the whole batch when an id is unknown; already gone counts as done.
            present = {i.instance_id for i in self._list_now()}
            remaining = [i for i in wanted if i in present]
            if remaining == wanted:
                raise
            self._log.info("instances_already_gone", gone=[i for i in wanted if i not in present])
            if remaining:
                self._delete(remaining)
        for gone in wanted:
            self._protection.pop(gone, None)
            self._first_seen.pop(gone, None)
            self._power.pop(gone, None)

    def _delete(self, instance_ids: list[str]) -> None:
        body = compute_models.VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=instance_ids)
        self._run_operation(
            "delete instances",
            lambda **kw: self._client.virtual_machine_scale_sets.begin_delete_instances(
                self._ref.resource_group, self._ref.name, body, polling_interval=self._polling_interval_s, **kw
            ),
        )
        self._log.info("instances_deleted", instance_ids=instance_ids)

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        if self._location is None:
            self._read_scale_set()
        body = compute_models.VirtualMachineScaleSetVM(
            location=self._location or "",
            properties=compute_models.VirtualMachineScaleSetVMProperties(
                protection_policy=compute_models.VirtualMachineScaleSetVMProtectionPolicy(
                    protect_from_scale_in=protected
                )
            ),
        )
        self._run_operation(
            "set protection",
            lambda **kw: self._client.virtual_machine_scale_set_vms.begin_update(
                self._ref.resource_group,
                self._ref.name,
                instance_id,
                body,
                polling_interval=self._polling_interval_s,
                **kw,
            ),
        )
        self._protection[instance_id] = protected

    # -- the model (what ``scalebus rollout`` replaces) ------------------------------------------------------

    def model(self) -> str:
        """The image reference new instances boot (``virtualMachineProfile.storageProfile.imageReference``)."""
        vmss = self._read_scale_set()
        profile = vmss.properties.virtual_machine_profile if vmss.properties is not None else None
        return _image_of(profile)

    def update_model(self, image: str) -> None:
        """PATCH the scale set's image reference, once, after checking that Azure will not apply it to running
        instances itself (a ``Manual`` upgrade policy, no automatic OS upgrades): the instances that exist keep
        their image and retire when their worker does."""
        vmss = self._read_scale_set()
        _refuse_self_upgrading(vmss, self._ref)
        reference = compute_models.ImageReference(id=image) if image.startswith("/") else _marketplace(image)
        body = compute_models.VirtualMachineScaleSetUpdate(
            properties=compute_models.VirtualMachineScaleSetUpdateProperties(
                virtual_machine_profile=compute_models.VirtualMachineScaleSetUpdateVMProfile(
                    storage_profile=compute_models.VirtualMachineScaleSetUpdateStorageProfile(
                        image_reference=reference
                    )
                )
            )
        )
        self._run_operation(
            "update model",
            lambda **kw: self._client.virtual_machine_scale_sets.begin_update(
                self._ref.resource_group, self._ref.name, body, polling_interval=self._polling_interval_s, **kw
            ),
        )
        self._log.info("model_updated", image=image)

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _read(self, what: str, call: Callable[[], Any]) -> Any:
        @_retry.retry_control_plane_read
        def attempt() -> Any:
            with _errors.translated(_errors.SCALE_SET, what=f"{what} {self._ref.name}"):
                return call()

        return attempt()

    def _run_operation(self, what: str, begin: Callable[..., LROPoller[Any]]) -> Any:
        """Send one write (retried only while ARM has not accepted it), then poll it to the end; an operation that
        ended Canceled or preempted is sent again, at most ``_OPERATION_SENDS`` times in all."""
        label = f"{what} {self._ref.name}"

        @_retry.retry_control_plane_write
        def send() -> LROPoller[Any]:
            with _errors.translated(_errors.SCALE_SET, what=label):
                return begin()

        started = time.monotonic()
        for sent in range(1, _OPERATION_SENDS + 1):
            poller = send()
            ended = self._wait(label, begin, poller)
            if not isinstance(ended, _OperationEnded):
                self._log.debug("operation_done", what=what, seconds=round(time.monotonic() - started, 3))
                return ended
            self._log.warning("operation_ended", what=what, status=ended.status, code=ended.code, sends=sent)
        raise errors.TransientScaleSetError(
            f"{label}: the operation ended {ended.status} ({ended.code}) {_OPERATION_SENDS} times"
        )

    def _wait(self, label: str, begin: Callable[..., LROPoller[Any]], poller: LROPoller[Any]) -> Any:
        """Poll one accepted operation to its end; a poll failing transiently resumes from the continuation token.
        An operation that ended Canceled or preempted comes back as ``_OperationEnded`` (sending it again may
        help; polling it again cannot)."""
        token = poller.continuation_token()
        pending: list[LROPoller[Any]] = [poller]

        @_retry.retry_long_running_poll
        def wait() -> Any:
            current = pending.pop() if pending else None
            with _errors.translated(_errors.SCALE_SET, what=label):
                try:
                    return (current or begin(continuation_token=token)).result()
                except HttpResponseError as exc:
                    ended = _operation_ended(exc)
                    if ended is None:
                        raise
                    return ended

        return wait()


@dataclasses.dataclass(frozen=True, slots=True)
class _OperationEnded:
    status: str
    code: str


def _operation_ended(exc: HttpResponseError) -> _OperationEnded | None:
    """An ARM operation that ended ``Canceled``, or ``Failed`` because a newer operation preempted it (or a
    conflict or a retryable platform error ended it): worth sending again. Other failures are the caller's."""
    if not isinstance(exc.__cause__, OperationFailed) or exc.response is None:
        return None
    try:
        body = json.loads(exc.response.text())
    except ValueError:
        return None
    status = str(body.get("status") or "") if isinstance(body, dict) else ""
    error = body.get("error") if isinstance(body, dict) else None
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    if status.lower() == "canceled" or code.lower() in _RESENT_CODES:
        return _OperationEnded(status or "Failed", code or "none")
    return None


# --------------------------------------------------------------------------------------------- model


def _image_of(holder: Any) -> str:
    """The image a VM, a scale-set VM or a scale set's VM profile names in ``storageProfile.imageReference``: a
    resource id (managed image, gallery image version or definition) or ``publisher:offer:sku:version``."""
    storage = getattr(holder, "storage_profile", None) if holder is not None else None
    ref = getattr(storage, "image_reference", None) if storage is not None else None
    if ref is None:
        return ""
    for key in ("id", "shared_gallery_image_id", "community_gallery_image_id"):
        value = getattr(ref, key, None)
        if value:
            return str(value)
    parts = [getattr(ref, key, None) or "" for key in ("publisher", "offer", "sku", "version")]
    return ":".join(parts) if any(parts) else ""


def _image_of_json(props: dict[str, Any]) -> str:
    """:func:`_image_of` over a listing's raw ``properties``."""
    ref = (props.get("storageProfile") or {}).get("imageReference") or {}
    for key in ("id", "sharedGalleryImageId", "communityGalleryImageId"):
        if ref.get(key):
            return str(ref[key])
    parts = [str(ref.get(key) or "") for key in ("publisher", "offer", "sku", "version")]
    return ":".join(parts) if any(parts) else ""


def _marketplace(image: str) -> Any:
    parts = image.split(":")
    if len(parts) != 4 or not all(parts):
        raise errors.UserInputError(
            f"{image!r} is neither an image resource id (/subscriptions/...) nor publisher:offer:sku:version"
        )
    publisher, offer, sku, version = parts
    return compute_models.ImageReference(publisher=publisher, offer=offer, sku=sku, version=version)


def _refuse_self_upgrading(vmss: Any, ref: ScaleSetRef) -> None:
    """Azure's Automatic and Rolling upgrade policies, and automatic OS upgrades, reimage running instances to
    the new model ("Upgrade policies for Virtual Machine Scale Sets", https://learn.microsoft.com/en-us/azure/
    virtual-machine-scale-sets/virtual-machine-scale-sets-upgrade-policy): a busy worker would lose its job.
    Only ``Manual`` leaves them alone."""
    props = vmss.properties
    policy = props.upgrade_policy if props is not None else None
    mode = getattr(policy, "mode", None) if policy is not None else None
    mode = str(getattr(mode, "value", mode) or "Manual")
    os_policy = getattr(policy, "automatic_os_upgrade_policy", None) if policy is not None else None
    automatic_os = bool(getattr(os_policy, "enable_automatic_os_upgrade", False))
    if mode.lower() != "manual" or automatic_os:
        what = f"upgrade policy {mode}" + (" with automatic OS upgrades" if automatic_os else "")
        raise errors.ConfigError(
            "scale_set.url",
            f"scale set {ref.name} has {what}: Azure would reimage running instances, busy ones too",
            f"az vmss update -g {ref.resource_group} -n {ref.name} --set upgradePolicy.mode=Manual "
            "upgradePolicy.automaticOSUpgradePolicy.enableAutomaticOSUpgrade=false",
        )


# --------------------------------------------------------------------------------------------- image bake

_VM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/\s]+)/resourceGroups/(?P<rg>[^/\s]+)"
    r"/providers/Microsoft\.Compute/virtualMachines/(?P<name>[^/\s]+)/?$",
    re.IGNORECASE,
)
_GALLERY_IMAGE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/\s]+)/resourceGroups/(?P<rg>[^/\s]+)"
    r"/providers/Microsoft\.Compute/galleries/(?P<gallery>[^/\s]+)/images/(?P<image>[^/\s]+)/?$",
    re.IGNORECASE,
)
_IMAGE_VERSION = re.compile(r"^\d{1,9}\.\d{1,9}\.\d{1,9}$")
"""A gallery image version name: MajorVersion.MinorVersion.Patch, each a 32-bit integer."""


@dataclasses.dataclass(frozen=True, slots=True)
class BakedImage:
    """What ``scalebus image bake`` prints: the image version the scale set model can name."""

    image_version_id: str
    source_vm_id: str
    provisioning_state: str
    already_existed: bool = False


def _match(pattern: re.Pattern[str], value: str, *, option: str, shape: str) -> re.Match[str]:
    match = pattern.match(value.strip())
    if match is None:
        raise errors.UserInputError(f"{option} {value!r} is not {shape}")
    return match


class GalleryImageBaker:
    """Captures a prepared VM into an Azure Compute Gallery image version: deallocate, generalize, create the
    version from the VM ("Create an image definition and an image version", https://learn.microsoft.com/en-us/
    azure/virtual-machines/image-version, "VM as the source"). Each step is one write whose long-running
    operation is polled to its end; running it again for a version that this VM already made returns that
    version (a retried pipeline step), another source's version of the same name is refused."""

    def __init__(
        self,
        *,
        subscription_id: str,
        credential: TokenCredential,
        arm_endpoint: str = DEFAULT_ARM_ENDPOINT,
        connection_verify: str = "",
        polling_interval_s: float = 15.0,
    ) -> None:
        self._subscription_id = subscription_id
        self._polling_interval_s = polling_interval_s
        self._client = ComputeManagementClient(
            credential,
            subscription_id,
            base_url=arm_endpoint.rstrip("/"),
            credential_scopes=[arm_token_scope(arm_endpoint)],
            connection_verify=connection_verify or True,
            retry_total=0,
            logging_enable=False,
        )

    def close(self) -> None:
        self._client.close()

    def bake(self, *, vm_id: str, image_definition_id: str, version: str) -> BakedImage:
        vm = _match(_VM_ID, vm_id, option="--vm", shape="a VM resource id (az vm show --query id)")
        image = _match(
            _GALLERY_IMAGE_ID,
            image_definition_id,
            option="--gallery-image",
            shape="a gallery image definition id (az sig image-definition show --query id)",
        )
        if _IMAGE_VERSION.match(version) is None:
            raise errors.UserInputError(f"--version {version!r} is not MAJOR.MINOR.PATCH (for example 1.4.0)")
        names = (image["rg"], image["gallery"], image["image"], version)
        existing = self._existing_version(names, vm_id)
        if existing is not None:
            return existing
        definition = self._read(
            "read gallery image",
            lambda: self._client.gallery_images.get(image["rg"], image["gallery"], image["image"]),
        )
        self._operation(
            f"deallocate {vm['name']}",
            lambda **kw: self._client.virtual_machines.begin_deallocate(
                vm["rg"], vm["name"], polling_interval=self._polling_interval_s, **kw
            ),
        )
        self._write(
            f"generalize {vm['name']}", lambda: self._client.virtual_machines.generalize(vm["rg"], vm["name"])
        )
        body = compute_models.GalleryImageVersion(
            location=str(definition.location),
            properties=compute_models.GalleryImageVersionProperties(
                storage_profile=compute_models.GalleryImageVersionStorageProfile(
                    source=compute_models.GalleryArtifactVersionFullSource(virtual_machine_id=vm_id.strip())
                )
            ),
        )
        made = self._operation(
            f"create image version {version}",
            lambda **kw: self._client.gallery_image_versions.begin_create_or_update(
                *names, body, polling_interval=self._polling_interval_s, **kw
            ),
        )
        log.info("image_version_created", image_version_id=made.id, source_vm_id=vm_id)
        return BakedImage(str(made.id), vm_id.strip(), _provisioning(made))

    def _existing_version(self, names: tuple[str, str, str, str], vm_id: str) -> BakedImage | None:
        try:
            found = self._read("read image version", lambda: self._client.gallery_image_versions.get(*names))
        except errors.InstanceNotFoundError:
            return None
        storage = found.properties.storage_profile if found.properties is not None else None
        source = getattr(getattr(storage, "source", None), "virtual_machine_id", None) or ""
        if source.lower() != vm_id.strip().lower():
            raise errors.UserInputError(
                f"image version {names[3]} of {names[2]} already exists from another source "
                f"({source or 'unknown'}); "
                "pick a new --version"
            )
        return BakedImage(str(found.id), vm_id.strip(), _provisioning(found), already_existed=True)

    def _read(self, what: str, call: Callable[[], Any]) -> Any:
        @_retry.retry_control_plane_read
        def attempt() -> Any:
            with _errors.translated(_errors.SCALE_SET, what=what):
                return call()

        return attempt()

    def _write(self, what: str, call: Callable[[], Any]) -> Any:
        @_retry.retry_control_plane_write
        def attempt() -> Any:
            with _errors.translated(_errors.SCALE_SET, what=what):
                return call()

        return attempt()

    def _operation(self, what: str, begin: Callable[..., LROPoller[Any]]) -> Any:
        """One write, then its operation polled to the end (a failed poll resumes from the continuation token)."""
        poller: LROPoller[Any] = self._write(what, begin)
        token = poller.continuation_token()
        pending = [poller]

        @_retry.retry_long_running_poll
        def wait() -> Any:
            current = pending.pop() if pending else None
            with _errors.translated(_errors.SCALE_SET, what=what):
                return (current or begin(continuation_token=token)).result()

        return wait()


def _provisioning(version: Any) -> str:
    props = version.properties
    state = getattr(props, "provisioning_state", None) if props is not None else None
    return str(getattr(state, "value", state) or "")


def open_image_baker(
    cfg: settings.ScaleSetSettings, *, subscription_id: str, credential: TokenCredential | None = None
) -> GalleryImageBaker:
    """A baker for one subscription, at ``scale_set.arm_endpoint``, with ``DefaultAzureCredential`` unless told
    otherwise (a pipeline's workload identity, or a VM's managed identity)."""
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return GalleryImageBaker(
        subscription_id=subscription_id,
        credential=credential,
        arm_endpoint=cfg.arm_endpoint,
        connection_verify=cfg.connection_verify,
        polling_interval_s=cfg.polling_interval_s,
    )


def subscription_of(resource_id: str) -> str:
    """The subscription a resource id names (``--vm``'s, for the baker's client)."""
    match = re.match(r"^/subscriptions/([^/\s]+)/", resource_id.strip(), re.IGNORECASE)
    if match is None:
        raise errors.UserInputError(f"{resource_id!r} is not an ARM resource id (/subscriptions/...)")
    return match.group(1)
