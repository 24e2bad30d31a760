"""Who am I, on an Azure VM: the Instance Metadata Service (IMDS) behind ``base.InstanceIdentity``.

IMDS answers on a link-local address, only from inside the VM, only with the ``Metadata: true`` header and never
through a proxy (so proxies are bypassed here). ``/metadata/instance`` tells the subscription, resource group,
scale set name and the VM's own name and resource id. A **Uniform** instance's resource id ends in
``virtualMachineScaleSets/<vmss>/virtualMachines/<instanceId>`` (its name is ``<vmss>_<instanceId>``); a
**Flexible** instance is a plain VM whose name is its instance id for the scale-set API; from api-version
2021-03-01 IMDS also names its scale set's resource id in ``compute.virtualMachineScaleSet.id``, which is preferred
(https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service, "Instance metadata" schema).
A VM outside any scale set has an empty ``vmScaleSetName``: that is an ``IdentityError``, never a guess.

IMDS answers 410 for up to 70 seconds after a VM boots, and 429/5xx while busy (the same page, "Errors and
debugging"): those are retried for about 90 s and then raised as a *transient* error, which is not an
``IdentityError`` ("not a scale-set instance" is a verdict; "IMDS is not ready" is not).

:func:`managed_identity_credential` builds the credential the VM's managed identity uses for ARM. azure-identity
reads the IMDS host only from ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (at request time), so a non-default endpoint
is handed to it through that variable.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import structlog
from azure.core.credentials import TokenCredential
from azure.identity import ManagedIdentityCredential

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import _errors, _retry

log = structlog.get_logger(__name__)

DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
INSTANCE_API_VERSION = "2021-03-01"
_IMDS_HOST_ENV = "AZURE_POD_IDENTITY_AUTHORITY_HOST"
TRANSIENT_STATUS = errors.TRANSIENT_HTTP_STATUS | {410}
"""The shared transient statuses, plus 410 Gone: IMDS (and Scheduled Events, served by it) answers it while the
VM's metadata service is (re)starting, and Azure documents it as "retry after some time"."""


class TransientIdentityError(errors.TransientBackendError):
    """IMDS throttled (5 requests/s per VM), not ready yet after boot (410) or briefly unavailable: worth a retry
    later. Deliberately not an ``IdentityError``, which means "this is not a scale-set instance"."""


class ImdsIdentity:
    """``base.InstanceIdentity`` from IMDS ``/metadata/instance``."""

    def __init__(self, endpoint: str = DEFAULT_IMDS_ENDPOINT, *, timeout_s: float = 2.0) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._timeout_s = timeout_s
        # IMDS must never be reached through a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def whoami(self) -> base.InstanceInfo:
        compute = self._read_compute()
        return instance_info(compute)

    def close(self) -> None:
        """Nothing to release: each call is one short HTTP request on a connection of its own."""

    def _read_compute(self) -> dict[str, Any]:
        url = f"{self._endpoint}/metadata/instance?{urllib.parse.urlencode({'api-version': INSTANCE_API_VERSION})}"

        @_retry.retry_instance_metadata
        def attempt() -> dict[str, Any]:
            request = urllib.request.Request(url, headers={"Metadata": "true"})
            try:
                with self._opener.open(request, timeout=self._timeout_s) as response:
                    document = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                exc.close()  # its body is not needed, and an open one leaks the socket
                if exc.code in TRANSIENT_STATUS:
                    raise TransientIdentityError(
                        f"IMDS answered HTTP {exc.code}", retry_after_s=_errors.retry_after_s(exc)
                    ) from exc
                raise errors.IdentityError(f"IMDS answered HTTP {exc.code}: not an Azure VM?") from exc
            except (urllib.error.URLError, OSError) as exc:
                raise errors.IdentityError(
                    f"IMDS at {self._endpoint} is unreachable ({type(exc).__name__}): not running on an Azure VM"
                ) from exc
            except ValueError as exc:
                raise errors.IdentityError("IMDS answered something that is not JSON") from exc
            compute = document.get("compute") if isinstance(document, dict) else None
            if not isinstance(compute, dict):
                raise errors.IdentityError("IMDS instance metadata has no 'compute' section")
            return compute

        result: dict[str, Any] = attempt()
        return result


def instance_info(compute: dict[str, Any]) -> base.InstanceInfo:
    """This VM's place in its scale set, from IMDS's ``compute`` document (pure; see the module docstring)."""
    vmss = str(compute.get("vmScaleSetName") or "")
    name = str(compute.get("name") or "")
    subscription = str(compute.get("subscriptionId") or "")
    group = str(compute.get("resourceGroupName") or "")
    resource_id = str(compute.get("resourceId") or "")
    scale_set_ref = compute.get("virtualMachineScaleSet")
    scale_set_id = str(scale_set_ref.get("id") or "") if isinstance(scale_set_ref, dict) else ""
    if scale_set_id and not vmss:
        vmss = scale_set_id.rstrip("/").rsplit("/", 1)[-1]
    if not vmss:
        raise errors.IdentityError(
            f"VM {name or '?'} is not an instance of a VM scale set (IMDS vmScaleSetName is empty)"
        )
    if not (subscription and group and name):
        raise errors.IdentityError("IMDS instance metadata lacks subscriptionId, resourceGroupName or name")
    scale_set = scale_set_id.rstrip("/") or (
        f"/subscriptions/{subscription}/resourceGroups/{group}"
        f"/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}"
    )
    marker = f"/virtualmachinescalesets/{vmss.lower()}/virtualmachines/"
    at = resource_id.lower().find(marker)
    if at >= 0:  # Uniform: .../virtualMachineScaleSets/<vmss>/virtualMachines/<instanceId>
        instance_id = resource_id[at + len(marker) :].strip("/")
    elif name.lower().startswith(vmss.lower() + "_") and "/virtualmachines/" not in resource_id.lower():
        instance_id = name[len(vmss) + 1 :]  # Uniform, when resourceId is missing
    else:  # Flexible: the VM name is the instance id
        instance_id = name
    if not instance_id:
        raise errors.IdentityError(f"cannot tell the instance id of {name} in scale set {vmss}")
    return base.InstanceInfo(instance_id=instance_id, scale_set=scale_set, name=name)


def managed_identity_credential(*, imds_endpoint: str = DEFAULT_IMDS_ENDPOINT) -> TokenCredential:
    """The VM's system-assigned managed identity, asking the IMDS at ``imds_endpoint`` for tokens."""
    endpoint = imds_endpoint.rstrip("/")
    if endpoint != DEFAULT_IMDS_ENDPOINT:
        # azure-identity has no argument for the IMDS host; this variable is its documented override. The default
        # endpoint leaves the variable alone (AKS pod identity sets it itself).
        os.environ[_IMDS_HOST_ENV] = endpoint
    return ManagedIdentityCredential()
