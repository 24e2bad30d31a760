"""A wire-level fake of Azure Resource Manager's Microsoft.Compute scale-set API, over HTTPS on 127.0.0.1.

It serves what ``VmssScaleSet`` calls through the real ``azure-mgmt-compute`` client, so tests exercise the SDK's
serialisation, bearer-token policy (which refuses plain HTTP, hence TLS with a ``trustme`` CA), long-running
operation polling and error mapping:

- ``GET|PATCH|PUT .../virtualMachineScaleSets/<n>`` (PATCH ``sku.capacity`` scales out or in);
- ``GET .../virtualMachineScaleSets/<n>/virtualMachines`` (Uniform instances; ``$expand=instanceView``);
- ``GET .../resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines?$filter='virtualMachineScaleSet/id'
  eq '<id>'`` (Flexible: VMs of the scale set, the VM name is the instance id);
- ``GET|PUT .../virtualMachineScaleSets/<n>/virtualMachines/<id>`` (``protectionPolicy.protectFromScaleIn``;
  on Flexible only from api-version 2023-09-01, as Azure documents);
- ``GET .../virtualMachineScaleSets/<n>/virtualMachines/<id>/instanceView`` (Uniform) and
  ``GET .../virtualMachines/<vm>/instanceView`` (Flexible): the statuses alone, as the REST operations
  "Virtual Machine Scale Set VMs - Get Instance View" and "Virtual Machines - Instance View" return them
  (examples ``VirtualMachineScaleSetVM_GetInstanceView_MaximumSet_Gen.json``,
  ``VirtualMachine_InstanceView.json``); their RBAC actions are ``.../virtualMachines/instanceView/read``
  ("Azure permissions for Compute");
- ``POST .../virtualMachineScaleSets/<n>/delete`` with ``{"instanceIds": [...]}``;
- ``GET /subscriptions/<s>/providers/Microsoft.Compute/locations/<loc>/operations/<op>`` — the
  ``Azure-AsyncOperation`` status monitor, and with ``monitor=true`` the ``Location`` result URL;
- image capture (``scalebus image bake``): ``POST .../virtualMachines/<vm>/deallocate`` (202 + LRO headers, as
  ``ComputeRP/stable/2026-04-01/examples/virtualMachineExamples/VirtualMachine_Deallocate_MaximumSet_Gen.json``),
  ``POST .../virtualMachines/<vm>/generalize`` (200, no body, ``.../virtualMachineExamples/
  VirtualMachine_Generalize.json``; refused with 409 ``OperationNotAllowed`` while the VM runs, as "Create a
  legacy managed image of a generalized VM" https://learn.microsoft.com/en-us/azure/virtual-machines/
  capture-image-resource says it must be deallocated first), ``GET .../galleries/<g>/images/<i>`` (the
  definition: ``GalleryRP/stable/2022-08-03/examples/galleryExamples/GalleryImage_Get.json``) and
  ``GET|PUT .../galleries/<g>/images/<i>/versions/<v>`` with ``storageProfile.source.virtualMachineId``
  (``.../galleryExamples/GalleryImageVersion_Create_WithVmAsSource.json``: 201 + ``Azure-AsyncOperation``,
  ``provisioningState`` Creating then Succeeded; an ungeneralized source is refused, a missing definition is
  404 ``ParentResourceNotFound``). The version's source VM needs ``virtualMachines/read`` too: ARM's linked
  access check, ``LinkedAuthorizationFailed`` in "Troubleshoot common Azure deployment errors";
- the scale set's model: ``properties.virtualMachineProfile.storageProfile.imageReference.id`` on GET and
  PATCH (``virtualMachineScaleSetExamples/VirtualMachineScaleSet_Update_MaximumSet_Gen.json``) and
  ``properties.upgradePolicy`` (``mode``, ``automaticOSUpgradePolicy``); every instance reports the image it
  booted in ``properties.storageProfile.imageReference`` (``id``, and ``exactVersion`` for a gallery version,
  as ``VirtualMachineScaleSetVM_Get_WithUserData.json`` and ``virtualMachineExamples/VirtualMachine_Get.json``
  show), and Uniform instances ``latestModelApplied``. A model PATCH leaves existing instances on their image
  (the ``Manual`` upgrade policy; the fake does not play Automatic or Rolling upgrades).

Bodies follow the Azure/azure-rest-api-specs examples for api-version **2026-04-01** (the default of
azure-mgmt-compute 39.0), under ``specification/compute/resource-manager/Microsoft.Compute/Compute/Compute/
examples/2026-04-01/``: ``virtualMachineScaleSetExamples/VirtualMachineScaleSetVM_List_MaximumSet_Gen.json`` and
``..._MinimumSet_Gen.json`` (instance shape: ``instanceId``, ``properties.provisioningState``,
``properties.instanceView.statuses``, ``properties.protectionPolicy``, ``properties.timeCreated``),
``VirtualMachineScaleSetVM_Update_MinimumSet_Gen.json`` (PUT on one instance, 200/202 + ``location``),
``VirtualMachineScaleSet_Update_MinimumSet_Gen.json`` (PATCH on the scale set) and
``virtualMachineExamples/VirtualMachine_List_MaximumSet_Gen.json`` (Flexible VMs with
``properties.virtualMachineScaleSet.id``). Asynchronous operations follow the ARM async pattern (initial
200/202 with ``Azure-AsyncOperation`` and ``Location``; status body ``{"status": "InProgress"|"Succeeded"|
"Failed", "startTime", "endTime", "name"}``).

Access: with ``access`` set (a :class:`tests.fakes.rbac.AccessPolicy`), the bearer token names the caller and
each request needs its Azure RBAC action at the request's scope (the resource it addresses; for the Flexible VM
listing that is the resource group, because those VMs are siblings of the scale set, not children): the actions
are the ``Microsoft.Compute`` operations listed in "Azure permissions for Compute"
(https://learn.microsoft.com/en-us/azure/role-based-access-control/permissions/compute). A missing grant answers
403 ``AuthorizationFailed`` (:func:`tests.fakes.rbac.arm_denial`). The asynchronous-operation status URL sits at
subscription scope, yet callers holding roles at resource-group scope poll it every day, so its action
(``Microsoft.Compute/locations/operations/read``) is recorded but not checked.

Faults, each from Azure's documented behaviour:

- :meth:`inject` answers the next requests of a kind with a status, an error code and message; 409 uses
  Compute's two conflict answers (``Conflict`` "Operation ... is not allowed since ... conflict with a concurrent
  request" and ``OperationNotAllowed`` "... is marked for deletion"), as listed in "Troubleshoot common Azure
  deployment errors" (https://learn.microsoft.com/en-us/azure/azure-resource-manager/troubleshooting/
  common-deployment-errors) and seen in the VMSS error examples of the specs above.
- :meth:`end_next_operation` makes the next write's long-running operation end ``Canceled`` or ``Failed`` (for
  example ``OperationPreempted``, "preempted by a more recent operation") without applying it: the terminal states
  of the ARM async pattern (https://github.com/Azure/azure-resource-manager-rpc/blob/master/v1.0/
  async-api-reference.md, "Azure-AsyncOperation resource format": ``Succeeded``, ``Failed``, ``Canceled``).
- ``page_size`` splits instance lists into pages linked by ``nextLink`` (the ``VirtualMachineScaleSetVMListResult``
  and ``VirtualMachineListResult`` definitions of the specs carry ``value`` and ``nextLink``).
- ``ratelimit_remaining`` adds ``x-ms-ratelimit-remaining-resource`` (``Microsoft.Compute/HighCostGet3Min;<n>``)
  and ``x-ms-ratelimit-remaining-subscription-reads|writes`` to every answer, counting down per request, as in
  "Understand how Azure Resource Manager throttles requests" (https://learn.microsoft.com/en-us/azure/
  azure-resource-manager/management/request-limits-and-throttling) and "Troubleshooting API throttling errors"
  (https://learn.microsoft.com/en-us/troubleshoot/azure/virtual-machines/windows/troubleshooting-throttling-errors).
- :meth:`set_instance_state` forces a state (a ``Failed`` VM that still runs, a ``deallocated`` one);
  :meth:`forget_time_created` drops the optional ``timeCreated`` (absent before api-version 2021-11-01 and on
  older VMs: the specs mark it read-only and optional).
- ``create_scale_set(overprovision=True)`` reports ``properties.overprovision`` true on a Uniform scale set
  (``VirtualMachineScaleSetProperties.overprovision``) and plays it: "Design considerations for scale sets",
  section "Overprovisioning" (https://learn.microsoft.com/en-us/azure/virtual-machine-scale-sets/
  virtual-machine-scale-sets-design-overview) says the scale set "spins up more VMs than you asked for, then
  deletes the extra VMs" once the requested ones are provisioned, that this is Uniform-only, and that the extras
  can confuse applications that see VMs appear and disappear. A scale-out by capacity therefore also boots
  extras (one per five added, at least one: Azure does not document the number), listed like any instance and
  running from when the requested ones are ready until ``overprovision_linger_s`` later, when they vanish; they
  use up instance ids (the gaps real Uniform scale sets show) and never count toward ``sku.capacity``.
- :meth:`evict_spot` plays a Spot eviction: "Use Azure Spot Virtual Machines"
  (https://learn.microsoft.com/en-us/azure/virtual-machines/spot-vms, "Eviction policy") and "Azure Spot Virtual
  Machines for Virtual Machine Scale Sets" (https://learn.microsoft.com/en-us/azure/virtual-machine-scale-sets/
  use-spot): with ``evictionPolicy`` ``Deallocate`` (the default) an evicted instance stays, stopped-deallocated
  (``PowerState/deallocated``, provisioning ``Succeeded``), and keeps its place in the capacity; with ``Delete``
  it is deleted (``Deleting`` for ``delete_delay_s``, then gone) and the capacity drops by one. The scale set's
  model then reports ``virtualMachineProfile.priority`` ``Spot`` and its ``evictionPolicy``
  (``VirtualMachineScaleSetVMProfile`` in the specs).

Simplifications: without ``access`` any non-empty bearer is accepted (``expected_token`` narrows it to one);
deleting an unknown instance id answers 404 ``NotFound`` for the whole batch; scale-in by capacity removes the
newest unprotected instances. Every request is counted per kind (``count``), so tests can assert "one write per
decision".
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import http.server
import json
import re
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme

from tests.fakes import rbac
from tests.fakes._http import BackgroundServer, ServedFake

API_VERSION_FLEX_PROTECTION = "2023-09-01"
DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-0000000000aa"
DEFAULT_RESOURCE_GROUP = "rg-scalebus"

WRITE_KINDS = frozenset(
    {
        "PATCH scaleset",
        "PUT scaleset",
        "POST delete",
        "PUT instance",
        "POST vm_deallocate",
        "POST vm_generalize",
        "PUT image_version",
    }
)
DEFAULT_IMAGE = (
    f"/subscriptions/{DEFAULT_SUBSCRIPTION}/resourceGroups/{DEFAULT_RESOURCE_GROUP}/providers/"
    "Microsoft.Compute/galleries/scalebus/images/scalebus-node/versions/1.0.0"
)
"""The image a scale set's model names unless ``create_scale_set(image=...)`` says otherwise."""

_PROVIDER = r"/providers/Microsoft\.Compute"
_RG = r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)" + _PROVIDER
_ROUTES: list[tuple[str, re.Pattern[str]]] = [
    ("scaleset", re.compile(_RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)$", re.I)),
    ("instances", re.compile(_RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)/virtualMachines$", re.I)),
    (
        "instance",
        re.compile(_RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)/virtualMachines/(?P<iid>[^/]+)$", re.I),
    ),
    ("delete", re.compile(_RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)/delete$", re.I)),
    ("vms", re.compile(_RG + r"/virtualMachines$", re.I)),
    (
        "instance_view",
        re.compile(
            _RG + r"/virtualMachineScaleSets/(?P<name>[^/]+)/virtualMachines/(?P<iid>[^/]+)/instanceView$", re.I
        ),
    ),
    ("vm_instance_view", re.compile(_RG + r"/virtualMachines/(?P<vm>[^/]+)/instanceView$", re.I)),
    ("vm_deallocate", re.compile(_RG + r"/virtualMachines/(?P<vm>[^/]+)/deallocate$", re.I)),
    ("vm_generalize", re.compile(_RG + r"/virtualMachines/(?P<vm>[^/]+)/generalize$", re.I)),
    ("gallery_image", re.compile(_RG + r"/galleries/(?P<gallery>[^/]+)/images/(?P<image>[^/]+)$", re.I)),
    (
        "image_version",
        re.compile(
            _RG + r"/galleries/(?P<gallery>[^/]+)/images/(?P<image>[^/]+)/versions/(?P<version>[^/]+)$", re.I
        ),
    ),
    (
        "operation",
        re.compile(
            r"^/subscriptions/(?P<sub>[^/]+)" + _PROVIDER + r"/locations/(?P<loc>[^/]+)/operations/(?P<op>[^/]+)$",
            re.I,
        ),
    ),
]


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class FakeInstance:
    instance_id: str
    name: str
    vm_id: str
    created_at: float
    ready_at: float
    provisioning_state: str = "Creating"
    power_state: str = "starting"
    protected: bool = False
    gone_at: float | None = None
    time_created_known: bool = True
    image: str = DEFAULT_IMAGE
    """The image this instance booted (its ``storageProfile.imageReference.id``): the model when it was made."""
    extra: bool = False
    """Booted by overprovisioning: Azure deletes it once the requested instances are ready."""


@dataclasses.dataclass
class FakeScaleSet:
    subscription: str
    resource_group: str
    name: str
    mode: str
    location: str
    capacity: int = 0
    overprovision: bool = False
    provisioning_delay_s: float = 0.0
    next_index: int = 0
    unique_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    image: str = DEFAULT_IMAGE
    """The model's ``virtualMachineProfile.storageProfile.imageReference.id``: what new instances boot."""
    upgrade_mode: str = "Manual"
    """``upgradePolicy.mode``: Manual, Automatic or Rolling."""
    eviction_policy: str | None = None
    """``Delete`` or ``Deallocate`` on a Spot scale set (:meth:`ArmComputeFake.make_spot`); ``None``: Regular."""
    instances: dict[str, FakeInstance] = dataclasses.field(default_factory=dict)

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachineScaleSets/{self.name}"
        )


@dataclasses.dataclass
class _Operation:
    op_id: str
    subscription: str
    location: str
    started_at: float
    done_at: float
    error: dict[str, str] | None = None
    status: str = "Succeeded"


@dataclasses.dataclass
class _Fault:
    status: int
    retry_after_s: float | None
    code: str
    message: str


@dataclasses.dataclass
class _Outcome:
    status: str
    code: str
    message: str


CONFLICT_CONCURRENT = (
    "Conflict",
    "Operation 'PATCH' is not allowed since the Virtual Machine Scale Set is in a conflict with a concurrent "
    "request; retry the operation later.",
)
CONFLICT_MARKED_FOR_DELETION = (
    "OperationNotAllowed",
    "Operation is not allowed since the virtual machine scale set instance is marked for deletion.",
)
PREEMPTED = ("OperationPreempted", "Operation execution has been preempted by a more recent operation.")

_DEFAULT_CODES = {
    409: CONFLICT_CONCURRENT[0],
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

# (route, method) -> (RBAC action, which scope: "resource" = the scale set, "group", "subscription").
_ACTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("scaleset", "GET"): ("Microsoft.Compute/virtualMachineScaleSets/read", "resource"),
    ("scaleset", "PATCH"): ("Microsoft.Compute/virtualMachineScaleSets/write", "resource"),
    ("scaleset", "PUT"): ("Microsoft.Compute/virtualMachineScaleSets/write", "resource"),
    ("instances", "GET"): ("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read", "resource"),
    ("instance", "GET"): ("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read", "instance"),
    ("instance", "PUT"): ("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write", "instance"),
    ("delete", "POST"): ("Microsoft.Compute/virtualMachineScaleSets/delete/action", "resource"),
    ("vms", "GET"): ("Microsoft.Compute/virtualMachines/read", "group"),
    (
        "instance_view",
        "GET",
    ): ("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/instanceView/read", "instance"),
    ("vm_instance_view", "GET"): ("Microsoft.Compute/virtualMachines/instanceView/read", "vm"),
    ("operation", "GET"): ("Microsoft.Compute/locations/operations/read", "subscription"),
    ("vm_deallocate", "POST"): ("Microsoft.Compute/virtualMachines/deallocate/action", "vm"),
    ("vm_generalize", "POST"): ("Microsoft.Compute/virtualMachines/generalize/action", "vm"),
    ("gallery_image", "GET"): ("Microsoft.Compute/galleries/images/read", "gallery_image"),
    ("image_version", "GET"): ("Microsoft.Compute/galleries/images/versions/read", "image_version"),
    ("image_version", "PUT"): ("Microsoft.Compute/galleries/images/versions/write", "image_version"),
}


@dataclasses.dataclass
class FakeVm:
    """A standalone VM prepared for capture: running until deallocated, then generalized."""

    name: str
    power_state: str = "running"
    generalized: bool = False


@dataclasses.dataclass
class FakeImageVersion:
    source_vm_id: str
    location: str
    ready_at: float


class ArmComputeFake(ServedFake):
    """The fake ARM endpoint. ``start()`` it (or use it as a context manager), then point clients at ``endpoint``
    with ``connection_verify=ca_path``."""

    def __init__(self, workdir: Path, *, expected_token: str | None = None) -> None:
        self._workdir = workdir
        self.expected_token = expected_token
        self.ca_path = workdir / "arm-ca.pem"
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._scale_sets: dict[tuple[str, str, str], FakeScaleSet] = {}
        self._operations: dict[str, _Operation] = {}
        self._faults: dict[str, collections.deque[_Fault]] = collections.defaultdict(collections.deque)
        self._counts: collections.Counter[str] = collections.Counter()
        self._requests: list[tuple[float, str]] = []
        self._server: BackgroundServer | None = None
        self.delete_delay_s = 0.0
        """How long deleted instances stay in ``Deleting`` (and their delete operation in progress)."""
        self.scale_in_delay_s = 0.0
        self.overprovision_linger_s = 0.0
        """How long overprovisioned extras keep running after the requested instances are ready."""
        self.access: rbac.AccessPolicy | None = None
        """Role assignments to enforce; ``None`` accepts any bearer token."""
        self.page_size: int | None = None
        """Instance lists come in pages of this many, linked by ``nextLink``; ``None``: one page."""
        self.ratelimit_remaining: int | None = None
        """Set to start the ``x-ms-ratelimit-remaining-*`` countdown from this many requests."""
        self.expanded_listings = 0
        """Instance-list pages asked for with ``$expand=instanceView``."""
        self._outcomes: dict[str, collections.deque[_Outcome]] = collections.defaultdict(collections.deque)
        self._vms: dict[str, FakeVm] = {}
        """Standalone VMs by lowercased resource id (image capture)."""
        self._gallery_images: dict[str, str] = {}
        """Gallery image definitions: lowercased resource id -> location."""
        self._image_versions: dict[str, FakeImageVersion] = {}
        self.capture_delay_s = 0.0
        self._principal = ""
        """The caller of the request being handled (set and read under ``_lock``)."""
        """How long an image version stays ``Creating`` (its operation in progress)."""

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> ArmComputeFake:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_path))
        self._server = BackgroundServer(_handler_for(self), name="arm-compute-fake", ca=ca)
        return self

    # ----------------------------------------------------------------------------------------- test controls

    def create_scale_set(
        self,
        name: str | None = None,
        *,
        mode: str = "Uniform",
        capacity: int = 0,
        subscription: str = DEFAULT_SUBSCRIPTION,
        resource_group: str = DEFAULT_RESOURCE_GROUP,
        location: str = "westus",
        provisioning_delay_s: float = 0.0,
        overprovision: bool = False,
        image: str = DEFAULT_IMAGE,
        upgrade_mode: str = "Manual",
    ) -> str:
        """Add a scale set (instances already running if ``capacity`` > 0); returns its ARM resource id."""
        assert mode in ("Uniform", "Flexible")
        name = name or f"vmss-{secrets.token_hex(4)}"
        vmss = FakeScaleSet(subscription, resource_group, name, mode, location, overprovision=overprovision)
        vmss.image, vmss.upgrade_mode = image, upgrade_mode
        vmss.provisioning_delay_s = provisioning_delay_s
        now = time.time()
        with self._lock:
            self._scale_sets[self._key(subscription, resource_group, name)] = vmss
            for _ in range(capacity):
                inst = self._new_instance(vmss, now)
                inst.ready_at = now
            vmss.capacity = capacity
            self._advance(vmss, now)
        return vmss.resource_id

    def create_vm(
        self, name: str, *, subscription: str = DEFAULT_SUBSCRIPTION, resource_group: str = DEFAULT_RESOURCE_GROUP
    ) -> str:
        """Add a running standalone VM (a machine prepared for capture); returns its resource id."""
        vm_id = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/"
            f"virtualMachines/{name}"
        )
        with self._lock:
            self._vms[vm_id.lower()] = FakeVm(name)
        return vm_id

    def vm(self, vm_id: str) -> FakeVm:
        with self._lock:
            return self._vms[vm_id.lower()]

    def create_gallery_image(
        self,
        gallery: str,
        image: str,
        *,
        location: str = "westus",
        subscription: str = DEFAULT_SUBSCRIPTION,
        resource_group: str = DEFAULT_RESOURCE_GROUP,
    ) -> str:
        """Add a gallery image definition (the gallery is implied); returns its resource id."""
        image_id = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/"
            f"galleries/{gallery}/images/{image}"
        )
        with self._lock:
            self._gallery_images[image_id.lower()] = location
        return image_id

    def image_version_source(self, version_id: str) -> str | None:
        """The VM an image version was captured from, or ``None`` if there is no such version."""
        with self._lock:
            found = self._image_versions.get(version_id.lower())
            return found.source_vm_id if found else None

    def scale_set(self, resource_id: str) -> FakeScaleSet:
        sub, rg, name = _parse_id(resource_id)
        with self._lock:
            return self._scale_sets[self._key(sub, rg, name)]

    def set_provisioning_delay(self, resource_id: str, delay_s: float) -> None:
        self.scale_set(resource_id).provisioning_delay_s = delay_s

    def add_instances(self, resource_id: str, count: int, *, ready_in_s: float = 0.0) -> list[str]:
        """Add instances as Azure would on scale-out (capacity follows); ``Creating`` until ``ready_in_s``."""
        now = time.time()
        with self._lock:
            vmss = self._scale_set_locked(resource_id)
            added = []
            for _ in range(count):
                inst = self._new_instance(vmss, now)
                inst.ready_at = now + ready_in_s
                added.append(inst.instance_id)
            vmss.capacity += count
            self._advance(vmss, now)
            return added

    def set_instance_state(self, resource_id: str, instance_id: str, *, provisioning: str, power: str) -> None:
        """Force one instance's provisioning state and ``PowerState/<power>`` (e.g. a Failed VM), for good."""
        with self._lock:
            inst = self._scale_set_locked(resource_id).instances[instance_id]
            inst.provisioning_state, inst.power_state = provisioning, power
            inst.ready_at = float("inf")
            inst.gone_at = None

    def fail_instance(self, resource_id: str, instance_id: str) -> None:
        """Mark one instance's provisioning as Failed (a broken VM the controller should delete)."""
        self.set_instance_state(resource_id, instance_id, provisioning="Failed", power="stopped")

    def wait_for_requests(self, kind: str, count: int, *, timeout_s: float = 10.0) -> bool:
        """Block until ``count`` requests of ``kind`` have arrived (an event to await, not a sleep)."""
        with self._seen:
            return self._seen.wait_for(lambda: self._counts[kind] >= count, timeout=timeout_s)

    def instance_ids(self, resource_id: str) -> list[str]:
        with self._lock:
            vmss = self._scale_set_locked(resource_id)
            self._advance(vmss, time.time())
            return list(vmss.instances)

    def inject(
        self,
        kind: str,
        status: int,
        *,
        retry_after_s: float | None = None,
        times: int = 1,
        error: tuple[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``kind`` (e.g. ``"PATCH scaleset"``) with ``status`` and
        ``error`` = (code, message), e.g. :data:`CONFLICT_MARKED_FOR_DELETION`."""
        code, message = error or (_DEFAULT_CODES.get(status, "Fault"), f"Injected fault {status}.")
        with self._lock:
            for _ in range(times):
                self._faults[kind].append(_Fault(status, retry_after_s, code, message))

    def end_next_operation(
        self, kind: str, status: str = "Canceled", *, error: tuple[str, str] = PREEMPTED, times: int = 1
    ) -> None:
        """The next ``times`` writes of ``kind`` are accepted but their operation ends ``status`` (``Canceled``
        or ``Failed``) with ``error`` and changes nothing."""
        assert status in ("Canceled", "Failed")
        with self._lock:
            for _ in range(times):
                self._outcomes[kind].append(_Outcome(status, *error))

    def clear_faults(self) -> None:
        """Drop injected faults and operation outcomes not yet used (a clean fake for the next test)."""
        with self._lock:
            self._faults.clear()
            self._outcomes.clear()

    def make_spot(self, resource_id: str, *, eviction_policy: str = "Deallocate") -> None:
        """Make a scale set Spot, evicted per ``eviction_policy`` (``Deallocate`` or ``Delete``)."""
        assert eviction_policy in ("Deallocate", "Delete")
        with self._lock:
            self._scale_set_locked(resource_id).eviction_policy = eviction_policy

    def evict_spot(self, resource_id: str, instance_id: str) -> None:
        """Azure takes the capacity back from one Spot instance, as the scale set's eviction policy says."""
        now = time.time()
        with self._lock:
            vmss = self._scale_set_locked(resource_id)
            assert vmss.eviction_policy is not None, "make_spot first: only Spot instances are evicted"
            inst = vmss.instances[instance_id]
            if vmss.eviction_policy == "Deallocate":
                inst.provisioning_state, inst.power_state = "Succeeded", "deallocated"
                inst.ready_at, inst.gone_at = float("inf"), None
                return
            inst.provisioning_state, inst.power_state = "Deleting", "stopping"
            inst.gone_at = now + self.delete_delay_s
            vmss.capacity = max(0, vmss.capacity - 1)
            self._advance(vmss, now)

    def _boot_extras(self, vmss: FakeScaleSet, added: int, now: float, *, requested_ready_at: float) -> None:
        """Overprovisioning on a Uniform scale set: extra instances that run until shortly after the requested
        ones are ready, then disappear (see the module docstring)."""
        if vmss.mode != "Uniform" or not vmss.overprovision or added <= 0:
            return
        for _ in range(max(1, added // 5)):
            extra = self._new_instance(vmss, now)
            extra.extra = True
            extra.gone_at = requested_ready_at + self.overprovision_linger_s

    def forget_time_created(self, resource_id: str, instance_id: str) -> None:
        """Answer this instance without ``timeCreated`` from now on."""
        with self._lock:
            self._scale_set_locked(resource_id).instances[instance_id].time_created_known = False

    def count(self, kind: str | None = None) -> int:
        """Requests seen of one kind (``"GET scaleset"``, ``"POST delete"``, ...), or all of them."""
        with self._lock:
            return self._counts[kind] if kind else sum(self._counts.values())

    def writes(self) -> int:
        """Requests that change state (capacity, deletes, protection), including rejected attempts."""
        with self._lock:
            return sum(n for kind, n in self._counts.items() if kind in WRITE_KINDS)

    def request_times(self, kind: str) -> list[float]:
        with self._lock:
            return [at for at, k in self._requests if k == kind]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()
            self.expanded_listings = 0

    # ----------------------------------------------------------------------------------------- request handling

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], Any]:
        parsed = urllib.parse.urlsplit(raw_path)
        query = {k.lower(): v for k, v in urllib.parse.parse_qsl(parsed.query)}
        route, match = _route(parsed.path)
        kind = f"{method} {route or 'unknown'}"
        if route == "operation" and query.get("monitor") == "true":
            kind = f"{method} operation-result"
        now = time.time()
        with self._lock:
            self._counts[kind] += 1
            self._requests.append((now, kind))
            self._seen.notify_all()
            fault = self._faults[kind].popleft() if self._faults.get(kind) else None
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            return _error(401, "AuthenticationFailed", "Authentication failed: no bearer token.")
        if self.expected_token is not None and auth != f"Bearer {self.expected_token}":
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        denial = self._authorize(auth[len("Bearer ") :], method, route, match)
        if denial is not None:
            return denial
        if fault is not None:
            extra = {"Retry-After": f"{fault.retry_after_s:g}"} if fault.retry_after_s is not None else {}
            status, hdrs, payload = _error(fault.status, fault.code, fault.message)
            return status, {**hdrs, **extra}, payload
        if "api-version" not in query:
            return _error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        if match is None:
            return _error(404, "NotFound", f"No route for {parsed.path}.")
        try:
            payload_in = json.loads(body) if body else {}
        except ValueError:
            return _error(400, "InvalidRequestContent", "The request content was invalid.")
        handler = getattr(self, f"_do_{method.lower()}_{route}", None)
        if handler is None:
            return _error(405, "MethodNotAllowed", f"{method} is not supported on {route}.")
        with self._lock:
            outcome = self._outcomes[kind].popleft() if self._outcomes.get(kind) else None
            if outcome is not None:
                result = self._ended_operation(route or "", match.groupdict(), query, now, outcome)
            else:
                self._principal = auth[len("Bearer ") :]  # for linked access checks, read under the lock
                result = handler(match.groupdict(), query, payload_in, now)
            status, headers_out, payload = self._page(result, parsed.path, query)
            return status, {**headers_out, **self._ratelimit_headers(method)}, payload

    # access, paging, throttling headers -----------------------------------------------------------------

    def _authorize(
        self, principal: str, method: str, route: str | None, match: re.Match[str] | None
    ) -> tuple[int, dict[str, str], Any] | None:
        if self.access is None or route is None or match is None:
            return None
        needed = _ACTIONS.get((route, method))
        if needed is None:
            return None
        action, level = needed
        if level == "subscription":
            self.access.note(principal, action)
            return None
        p = match.groupdict()
        group = f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}"
        gallery_image = f"{group}/providers/Microsoft.Compute/galleries/{p.get('gallery')}/images/{p.get('image')}"
        scope = {
            "vm": f"{group}/providers/Microsoft.Compute/virtualMachines/{p.get('vm')}",
            "gallery_image": gallery_image,
            "image_version": f"{gallery_image}/versions/{p.get('version')}",
            "group": group,
            "resource": f"{group}/providers/Microsoft.Compute/virtualMachineScaleSets/{p.get('name')}",
            "instance": f"{group}/providers/Microsoft.Compute/virtualMachineScaleSets/{p.get('name')}"
            f"/virtualMachines/{p.get('iid')}",
        }[level]
        if self.access.allows(principal, action, scope):
            return None
        return rbac.arm_denial(principal, action, scope)

    def _page(
        self, result: tuple[int, dict[str, str], Any], path: str, query: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        status, headers, payload = result
        if self.page_size is None or status != 200 or not isinstance(payload, dict) or "value" not in payload:
            return result
        start = int(query.get("$skiptoken") or 0)
        items = payload["value"]
        page: dict[str, Any] = {"value": items[start : start + self.page_size]}
        if start + self.page_size < len(items):
            rest = {**query, "$skiptoken": str(start + self.page_size)}
            page["nextLink"] = f"{self.endpoint}{path}?{urllib.parse.urlencode(rest)}"
        return status, headers, page

    def _ratelimit_headers(self, method: str) -> dict[str, str]:
        if self.ratelimit_remaining is None:
            return {}
        self.ratelimit_remaining = max(0, self.ratelimit_remaining - 1)
        n = self.ratelimit_remaining
        kind = "reads" if method == "GET" else "writes"
        return {
            f"x-ms-ratelimit-remaining-subscription-{kind}": str(n * 10),
            "x-ms-ratelimit-remaining-resource": f"Microsoft.Compute/HighCostGet3Min;{n},"
            f"Microsoft.Compute/HighCostGet30Min;{n * 5}",
        }

    def _ended_operation(
        self, route: str, p: dict[str, str], q: dict[str, str], now: float, outcome: _Outcome
    ) -> tuple[int, dict[str, str], Any]:
        """A write accepted (as its route answers: 202 for the batch delete, 200 and the resource otherwise) whose
        operation ends ``Canceled``/``Failed`` without changing anything."""
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        op = self._new_operation(vmss, now, now)
        op.status, op.error = outcome.status, {"code": outcome.code, "message": outcome.message}
        if route == "delete":
            return 202, self._lro_headers(op, q, with_location=True), None
        if route == "scaleset":
            return 200, self._lro_headers(op, q, with_location=False), self._scale_set_body(vmss)
        inst = vmss.instances.get(p.get("iid", ""))
        if inst is None:
            return _error(404, "NotFound", f"The entity was not found: instance {p.get('iid')}.")
        return 200, self._lro_headers(op, q, with_location=False), self._vmss_vm_body(vmss, inst)

    # GET/PATCH/PUT scale set ----------------------------------------------------------------------------

    def _do_get_scaleset(self, p: dict[str, str], _q: dict[str, str], _b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        self._advance(vmss, now)
        return 200, {}, self._scale_set_body(vmss)

    def _do_patch_scaleset(self, p: dict[str, str], q: dict[str, str], b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        self._advance(vmss, now)
        done_at = now
        capacity = (b.get("sku") or {}).get("capacity")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            return _error(400, "InvalidParameter", "sku.capacity must be a non-negative integer.")
        image = _model_image(b)
        if image is not None:
            vmss.image = image  # existing instances keep theirs: the upgrade policy is Manual
        if capacity is not None:
            done_at = self._resize(vmss, capacity, now)
        op = self._new_operation(vmss, now, done_at)
        body = self._scale_set_body(vmss, provisioning_state="Updating" if done_at > now else "Succeeded")
        return 200, self._lro_headers(op, q, with_location=False), body

    def _do_put_scaleset(self, p: dict[str, str], q: dict[str, str], b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            mode = (b.get("properties") or {}).get("orchestrationMode", "Uniform")
            vmss = FakeScaleSet(p["sub"], p["rg"], p["name"], mode, b.get("location", "westus"))
            self._scale_sets[self._key(p["sub"], p["rg"], p["name"])] = vmss
            created = True
        else:
            created = False
        self._advance(vmss, now)
        capacity = (b.get("sku") or {}).get("capacity", vmss.capacity)
        done_at = self._resize(vmss, int(capacity), now)
        op = self._new_operation(vmss, now, done_at)
        body = self._scale_set_body(vmss, provisioning_state="Creating" if created else "Updating")
        return (201 if created else 200), self._lro_headers(op, q, with_location=False), body

    # instances ------------------------------------------------------------------------------------------

    def _do_get_instances(self, p: dict[str, str], q: dict[str, str], _b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        if vmss.mode == "Flexible":
            return _error(
                400,
                "OperationNotAllowed",
                "Listing scale set VMs is not supported for scale sets with Flexible orchestration mode; "
                "list virtualMachines with a virtualMachineScaleSet/id filter.",
            )
        self._advance(vmss, now)
        expand = q.get("$expand", "").lower() == "instanceview"
        self.expanded_listings += int(expand)
        return 200, {}, {"value": [self._instance_body(vmss, i, expand) for i in vmss.instances.values()]}

    def _do_get_vms(self, p: dict[str, str], q: dict[str, str], _b: Any, now: float) -> Any:
        wanted = re.fullmatch(
            r"\s*'?virtualMachineScaleSet/id'?\s+eq\s+'?([^']+)'?\s*", q.get("$filter", ""), re.I
        )
        items: list[dict[str, Any]] = []
        expand = q.get("$expand", "").lower() == "instanceview"
        self.expanded_listings += int(expand)
        for vmss in self._scale_sets.values():
            if (
                vmss.mode != "Flexible"
                or vmss.subscription != p["sub"]
                or vmss.resource_group.lower() != p["rg"].lower()
            ):
                continue
            if wanted and wanted.group(1).lower() != vmss.resource_id.lower():
                continue
            self._advance(vmss, now)
            items.extend(self._instance_body(vmss, i, expand) for i in vmss.instances.values())
        return 200, {}, {"value": items}

    def _do_get_instance_view(self, p: dict[str, str], _q: dict[str, str], _b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        self._advance(vmss, now)
        inst = vmss.instances.get(p["iid"])
        if inst is None:
            return _error(404, "NotFound", f"The entity was not found: instance {p['iid']}.")
        return 200, {}, _instance_view(inst)

    def _do_get_vm_instance_view(self, p: dict[str, str], _q: dict[str, str], _b: Any, now: float) -> Any:
        for vmss in self._scale_sets.values():
            if vmss.mode != "Flexible" or vmss.resource_group.lower() != p["rg"].lower():
                continue
            self._advance(vmss, now)
            inst = vmss.instances.get(p["vm"])
            if inst is not None:
                return 200, {}, _instance_view(inst)
        return _error(
            404,
            "ResourceNotFound",
            f"The Resource 'Microsoft.Compute/virtualMachines/{p['vm']}' under resource group '{p['rg']}' "
            "was not found.",
        )

    def _do_get_instance(self, p: dict[str, str], _q: dict[str, str], _b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        self._advance(vmss, now)
        inst = vmss.instances.get(p["iid"])
        if inst is None:
            return _error(404, "NotFound", f"The entity was not found: instance {p['iid']}.")
        return 200, {}, self._vmss_vm_body(vmss, inst)

    def _do_put_instance(self, p: dict[str, str], q: dict[str, str], b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        if vmss.mode == "Flexible" and q["api-version"] < API_VERSION_FLEX_PROTECTION:
            return _error(
                400,
                "OperationNotAllowed",
                "Instance protection on Flexible scale sets needs api-version "
                f"{API_VERSION_FLEX_PROTECTION} or later.",
            )
        self._advance(vmss, now)
        inst = vmss.instances.get(p["iid"])
        if inst is None or inst.provisioning_state == "Deleting":
            return _error(404, "NotFound", f"The entity was not found: instance {p['iid']}.")
        policy = (b.get("properties") or {}).get("protectionPolicy")
        if policy is not None and "protectFromScaleIn" in policy:
            inst.protected = bool(policy["protectFromScaleIn"])
        op = self._new_operation(vmss, now, now)
        return 200, self._lro_headers(op, q, with_location=False), self._vmss_vm_body(vmss, inst)

    def _do_post_delete(self, p: dict[str, str], q: dict[str, str], b: Any, now: float) -> Any:
        vmss = self._find(p)
        if vmss is None:
            return self._not_found(p)
        ids = b.get("instanceIds")
        if not isinstance(ids, list) or not ids:
            return _error(400, "InvalidParameter", "instanceIds must be a non-empty list.")
        self._advance(vmss, now)
        unknown = [i for i in ids if i not in vmss.instances]
        if unknown:
            return _error(404, "NotFound", f"The entity was not found: instances {', '.join(map(str, unknown))}.")
        gone_at = now + self.delete_delay_s
        for iid in ids:
            inst = vmss.instances[iid]
            if inst.provisioning_state != "Deleting":
                inst.provisioning_state = "Deleting"
                inst.power_state = "stopping"
                inst.gone_at = gone_at
                vmss.capacity = max(0, vmss.capacity - 1)
        op = self._new_operation(vmss, now, gone_at)
        self._advance(vmss, now)
        return 202, self._lro_headers(op, q, with_location=True), None

    # image capture: deallocate, generalize, gallery image versions ---------------------------------------

    def _vm_of(self, p: dict[str, str]) -> FakeVm | None:
        vm_id = (
            f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/Microsoft.Compute/"
            f"virtualMachines/{p['vm']}"
        )
        return self._vms.get(vm_id.lower())

    def _vm_not_found(self, p: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        return _error(
            404,
            "ResourceNotFound",
            f"The Resource 'Microsoft.Compute/virtualMachines/{p['vm']}' under resource group '{p['rg']}' "
            "was not found.",
        )

    def _do_post_vm_deallocate(self, p: dict[str, str], q: dict[str, str], _b: Any, now: float) -> Any:
        vm = self._vm_of(p)
        if vm is None:
            return self._vm_not_found(p)
        vm.power_state = "deallocated"
        op = self._bare_operation(p["sub"], "westus", now, now)
        return 202, self._lro_headers(op, q, with_location=True), None

    def _do_post_vm_generalize(self, p: dict[str, str], _q: dict[str, str], _b: Any, _now: float) -> Any:
        vm = self._vm_of(p)
        if vm is None:
            return self._vm_not_found(p)
        if vm.power_state not in ("deallocated", "stopped"):
            return _error(
                409,
                "OperationNotAllowed",
                f"Operation 'generalize' is not allowed on VM '{vm.name}' since the VM is running. "
                "Please stop or deallocate the VM and retry the operation.",
            )
        vm.generalized = True
        return 200, {}, None

    def _do_get_gallery_image(self, p: dict[str, str], _q: dict[str, str], _b: Any, _now: float) -> Any:
        image_id = self._gallery_image_id(p)
        location = self._gallery_images.get(image_id.lower())
        if location is None:
            return _error(404, "ResourceNotFound", f"The gallery image '{p['image']}' was not found.")
        body = {
            "id": image_id,
            "name": p["image"],
            "type": "Microsoft.Compute/galleries/images",
            "location": location,
            "properties": {
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "identifier": {"publisher": "scalebus", "offer": "node", "sku": p["image"]},
                "provisioningState": "Succeeded",
            },
        }
        return 200, {}, body

    def _do_get_image_version(self, p: dict[str, str], _q: dict[str, str], _b: Any, now: float) -> Any:
        version_id = f"{self._gallery_image_id(p)}/versions/{p['version']}"
        found = self._image_versions.get(version_id.lower())
        if found is None:
            return _error(404, "ResourceNotFound", f"The gallery image version '{p['version']}' was not found.")
        return 200, {}, self._image_version_body(version_id, found, now)

    def _do_put_image_version(self, p: dict[str, str], q: dict[str, str], b: Any, now: float) -> Any:
        image_id = self._gallery_image_id(p)
        if image_id.lower() not in self._gallery_images:
            return _error(404, "ParentResourceNotFound", f"The gallery image '{p['image']}' was not found.")
        source = (((b.get("properties") or {}).get("storageProfile") or {}).get("source")) or {}
        vm_id = str(source.get("virtualMachineId") or source.get("id") or "")
        vm = self._vms.get(vm_id.lower())
        if vm is None:
            return _error(400, "InvalidParameter", f"The source virtual machine '{vm_id}' was not found.")
        if not vm.generalized:
            return _error(
                409,
                "OperationNotAllowed",
                "The source virtual machine must be generalized before it is captured into a gallery image "
                "definition whose osState is Generalized.",
            )
        denial = self._linked_read(self._principal, vm_id)
        if denial is not None:
            return denial
        version_id = f"{image_id}/versions/{p['version']}"
        found = FakeImageVersion(vm_id, str(b.get("location") or "westus"), ready_at=now + self.capture_delay_s)
        self._image_versions[version_id.lower()] = found
        op = self._bare_operation(p["sub"], found.location, now, found.ready_at)
        return 201, self._lro_headers(op, q, with_location=False), self._image_version_body(version_id, found, now)

    def _linked_read(self, principal: str, vm_id: str) -> tuple[int, dict[str, str], Any] | None:
        """ARM's linked access check: a write that names another resource needs read on it too."""
        action = "Microsoft.Compute/virtualMachines/read"
        if self.access is None or self.access.allows(principal, action, vm_id):
            return None
        status, headers, payload = rbac.arm_denial(principal, action, vm_id)
        payload["error"]["code"] = "LinkedAuthorizationFailed"
        return status, headers, payload

    @staticmethod
    def _gallery_image_id(p: dict[str, str]) -> str:
        return (
            f"/subscriptions/{p['sub']}/resourceGroups/{p['rg']}/providers/Microsoft.Compute/"
            f"galleries/{p['gallery']}/images/{p['image']}"
        )

    @staticmethod
    def _image_version_body(version_id: str, found: FakeImageVersion, now: float) -> dict[str, Any]:
        return {
            "id": version_id,
            "name": version_id.rsplit("/", 1)[-1],
            "type": "Microsoft.Compute/galleries/images/versions",
            "location": found.location,
            "properties": {
                "publishingProfile": {"targetRegions": [{"name": found.location, "regionalReplicaCount": 1}]},
                "storageProfile": {"source": {"virtualMachineId": found.source_vm_id}},
                "provisioningState": "Succeeded" if now >= found.ready_at else "Creating",
            },
        }

    def _bare_operation(self, subscription: str, location: str, now: float, done_at: float) -> _Operation:
        op = _Operation(str(uuid.uuid4()), subscription, location, started_at=now, done_at=done_at)
        self._operations[op.op_id] = op
        return op

    # operations -----------------------------------------------------------------------------------------

    def _do_get_operation(self, p: dict[str, str], q: dict[str, str], _b: Any, now: float) -> Any:
        op = self._operations.get(p["op"])
        if op is None:
            return _error(404, "NotFound", "The operation was not found.")
        for vmss in self._scale_sets.values():
            self._advance(vmss, now)
        done = now >= op.done_at
        if q.get("monitor") == "true":
            return (200, {}, None) if done else (202, {"Location": self._op_url(op, q, monitor=True)}, None)
        body: dict[str, Any] = {"name": op.op_id, "startTime": _iso(op.started_at)}
        if not done:
            body["status"] = "InProgress"
        elif op.error is not None:
            body.update(status=op.status if op.status != "Succeeded" else "Failed", endTime=_iso(op.done_at))
            body["error"] = op.error
        else:
            body.update(status="Succeeded", endTime=_iso(op.done_at))
        return 200, {}, body

    # ----------------------------------------------------------------------------------------- state

    @staticmethod
    def _key(sub: str, rg: str, name: str) -> tuple[str, str, str]:
        return sub.lower(), rg.lower(), name.lower()

    def _find(self, p: dict[str, str]) -> FakeScaleSet | None:
        return self._scale_sets.get(self._key(p["sub"], p["rg"], p["name"]))

    def _scale_set_locked(self, resource_id: str) -> FakeScaleSet:
        return self._scale_sets[self._key(*_parse_id(resource_id))]

    def _not_found(self, p: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        return _error(
            404,
            "ResourceNotFound",
            f"The Resource 'Microsoft.Compute/virtualMachineScaleSets/{p['name']}' under resource group "
            f"'{p['rg']}' was not found.",
        )

    def _new_instance(self, vmss: FakeScaleSet, now: float) -> FakeInstance:
        index = vmss.next_index
        vmss.next_index += 1
        if vmss.mode == "Uniform":
            iid, name = str(index), f"{vmss.name}_{index}"
        else:
            iid = name = f"{vmss.name}_{secrets.token_hex(4)}"
        inst = FakeInstance(iid, name, str(uuid.uuid4()), created_at=now, ready_at=now + vmss.provisioning_delay_s)
        inst.image = vmss.image
        vmss.instances[iid] = inst
        return inst

    def _resize(self, vmss: FakeScaleSet, capacity: int, now: float) -> float:
        """Create or remove instances to match ``capacity``; returns when the operation completes."""
        live = [i for i in vmss.instances.values() if i.provisioning_state != "Deleting" and not i.extra]
        done_at = now
        if capacity > len(live):
            for _ in range(capacity - len(live)):
                done_at = max(done_at, self._new_instance(vmss, now).ready_at)
            self._boot_extras(vmss, capacity - len(live), now, requested_ready_at=done_at)
        elif capacity < len(live):
            victims = sorted((i for i in live if not i.protected), key=lambda i: i.created_at, reverse=True)
            for inst in victims[: len(live) - capacity]:
                inst.provisioning_state, inst.power_state = "Deleting", "stopping"
                inst.gone_at = now + self.scale_in_delay_s
                done_at = max(done_at, inst.gone_at)
        vmss.capacity = capacity
        return done_at

    def _advance(self, vmss: FakeScaleSet, now: float) -> None:
        for iid, inst in list(vmss.instances.items()):
            if inst.gone_at is not None and now >= inst.gone_at:
                del vmss.instances[iid]
            elif inst.provisioning_state == "Creating" and now >= inst.ready_at:
                inst.provisioning_state, inst.power_state = "Succeeded", "running"

    def _new_operation(self, vmss: FakeScaleSet, now: float, done_at: float) -> _Operation:
        op = _Operation(str(uuid.uuid4()), vmss.subscription, vmss.location, started_at=now, done_at=done_at)
        self._operations[op.op_id] = op
        return op

    def _op_url(self, op: _Operation, q: dict[str, str], *, monitor: bool) -> str:
        query = {"p": "scalebus", "api-version": q.get("api-version", "")}
        if monitor:
            query["monitor"] = "true"
        return (
            f"{self.endpoint}/subscriptions/{op.subscription}/providers/Microsoft.Compute/locations/{op.location}"
            f"/operations/{op.op_id}?{urllib.parse.urlencode(query)}"
        )

    def _lro_headers(self, op: _Operation, q: dict[str, str], *, with_location: bool) -> dict[str, str]:
        headers = {"Azure-AsyncOperation": self._op_url(op, q, monitor=False)}
        if with_location:
            headers["Location"] = self._op_url(op, q, monitor=True)
        return headers

    def _scale_set_body(self, vmss: FakeScaleSet, *, provisioning_state: str = "Succeeded") -> dict[str, Any]:
        props: dict[str, Any] = {
            "orchestrationMode": vmss.mode,
            "provisioningState": provisioning_state,
            "uniqueId": vmss.unique_id,
            "singlePlacementGroup": False,
            "timeCreated": _iso(time.time()),
        }
        props["upgradePolicy"] = {
            "mode": vmss.upgrade_mode,
            "automaticOSUpgradePolicy": {"enableAutomaticOSUpgrade": False},
        }
        props["virtualMachineProfile"] = {
            "storageProfile": {"imageReference": {"id": vmss.image}},
            **_spot_profile(vmss),
        }
        if vmss.mode == "Uniform":
            props["overprovision"] = vmss.overprovision
        else:
            props["platformFaultDomainCount"] = 1
        return {
            "name": vmss.name,
            "id": vmss.resource_id,
            "type": "Microsoft.Compute/virtualMachineScaleSets",
            "location": vmss.location,
            "sku": {"name": "Standard_D2s_v5", "tier": "Standard", "capacity": vmss.capacity},
            "properties": props,
        }

    def _vmss_vm_body(self, vmss: FakeScaleSet, inst: FakeInstance) -> dict[str, Any]:
        """One instance through the scale-set VM API (both modes; Flexible since 2023-09-01)."""
        body = self._instance_body(vmss, inst, expand=True)
        body.setdefault("instanceId", inst.instance_id)
        body["properties"]["protectionPolicy"] = {
            "protectFromScaleIn": inst.protected,
            "protectFromScaleSetActions": False,
        }
        return body

    def _instance_body(self, vmss: FakeScaleSet, inst: FakeInstance, expand: bool) -> dict[str, Any]:
        props: dict[str, Any] = {
            "vmId": inst.vm_id,
            "provisioningState": inst.provisioning_state,
            "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
            "storageProfile": {"imageReference": _image_reference(inst.image)},
        }
        if inst.time_created_known:
            props["timeCreated"] = _iso(inst.created_at)
        if expand:
            props["instanceView"] = _instance_view(inst)
        rg_prefix = (
            f"/subscriptions/{vmss.subscription}/resourceGroups/{vmss.resource_group}/providers/Microsoft.Compute"
        )
        if vmss.mode == "Uniform":
            return {
                "name": inst.name,
                "id": f"{vmss.resource_id}/virtualMachines/{inst.instance_id}",
                "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                "location": vmss.location,
                "instanceId": inst.instance_id,
                "sku": {"name": "Standard_D2s_v5", "tier": "Standard"},
                "properties": {
                    **props,
                    "latestModelApplied": inst.image == vmss.image,
                    "protectionPolicy": {
                        "protectFromScaleIn": inst.protected,
                        "protectFromScaleSetActions": False,
                    },
                },
            }
        props["virtualMachineScaleSet"] = {"id": vmss.resource_id}
        return {
            "name": inst.name,
            "id": f"{rg_prefix}/virtualMachines/{inst.name}",
            "type": "Microsoft.Compute/virtualMachines",
            "location": vmss.location,
            "properties": props,
        }


def _instance_view(inst: FakeInstance) -> dict[str, Any]:
    """An instance view: ``computerName`` and the provisioning and power statuses, as
    ``VirtualMachineScaleSetVM_GetInstanceView_MaximumSet_Gen.json`` and ``VirtualMachine_InstanceView.json``."""
    return {
        "computerName": inst.name,
        "statuses": [
            {
                "code": f"ProvisioningState/{inst.provisioning_state.lower()}",
                "level": "Error" if inst.provisioning_state == "Failed" else "Info",
                "displayStatus": f"Provisioning {inst.provisioning_state.lower()}",
            },
            {"code": f"PowerState/{inst.power_state}", "level": "Info", "displayStatus": f"VM {inst.power_state}"},
        ],
    }


def _spot_profile(vmss: FakeScaleSet) -> dict[str, str]:
    """``priority`` and ``evictionPolicy`` of a Spot scale set's VM profile (nothing on a Regular one)."""
    return {} if vmss.eviction_policy is None else {"priority": "Spot", "evictionPolicy": vmss.eviction_policy}


def _model_image(body: Any) -> str | None:
    """The image id a scale-set PATCH puts in its model, if it names one."""
    profile = (body.get("properties") or {}).get("virtualMachineProfile") or {}
    reference = (profile.get("storageProfile") or {}).get("imageReference") or {}
    return reference.get("id") if isinstance(reference, dict) else None


def _image_reference(image: str) -> dict[str, str]:
    """``storageProfile.imageReference`` of a VM booted from ``image``: a gallery image version also reports its
    ``exactVersion`` (as in ``virtualMachineExamples/VirtualMachine_Get.json``)."""
    reference = {"id": image}
    if "/versions/" in image.lower():
        reference["exactVersion"] = image.rsplit("/", 1)[-1]
    return reference


def _route(path: str) -> tuple[str | None, re.Match[str] | None]:
    for name, pattern in _ROUTES:
        match = pattern.match(path)
        if match:
            return name, match
    return None, None


def _parse_id(resource_id: str) -> tuple[str, str, str]:
    match = _ROUTES[0][1].match(resource_id)
    assert match, f"not a scale set id: {resource_id}"
    return match["sub"], match["rg"], match["name"]


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], Any]:
    return status, {}, {"error": {"code": code, "message": message}}


def _handler_for(fake: ArmComputeFake) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, payload = fake.handle(self.command, self.path, self.headers, body)
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            if data:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_PATCH(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def handle(self) -> None:
            # A client closing a kept-alive TLS connection mid-read is routine, not a test failure.
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                super().handle()

    return Handler


@contextlib.contextmanager
def running(workdir: Path, **kwargs: Any) -> Iterator[ArmComputeFake]:
    fake = ArmComputeFake(workdir, **kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()
