"""A wire-level fake of ARM's Microsoft.KeyVault vault listing, over HTTPS on 127.0.0.1 (trustme certificate).

Served: ``GET /subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/vaults?api-version=...[&$top=N]``
(the ``Vaults_ListBySubscription`` operation that ``azure-mgmt-keyvault``'s ``vaults.list_by_subscription``
calls), answering ``{"value": [Vault...], "nextLink": ...}`` a page at a time; ``nextLink`` carries a
``$skiptoken``, and the SDK's pager follows it until a page has none. A Vault has ``id``, ``name``, ``type``
(``Microsoft.KeyVault/vaults``), ``location``, ``tags`` and ``properties`` {``sku``, ``tenantId``, ``vaultUri``
(with its trailing slash), ``enableRbacAuthorization``, ``provisioningState``}. Followed (read, not copied):
``examples/listVaultBySubscription.json`` and the ``Vault`` / ``VaultProperties`` / ``VaultListResult``
definitions of ``keyvault.json`` in Azure/azure-rest-api-specs
(``specification/keyvault/resource-manager/Microsoft.KeyVault/stable/2019-09-01``; later versions keep the shape),
and the request ``azure-mgmt-keyvault`` 14.1 builds (``build_vaults_list_by_subscription_request``, installed in
the venv).

Authentication: a request without ``Authorization: Bearer <token>`` gets ARM's 401 ``AuthenticationFailed``
("Authentication failed. The 'Authorization' header is missing."). Access: with ``access`` set, listing needs
``Microsoft.KeyVault/vaults/read`` ("Azure permissions for Security",
https://learn.microsoft.com/en-us/azure/role-based-access-control/permissions/security) at the subscription; a
caller without it gets 403 ``AuthorizationFailed`` (:func:`tests.fakes.rbac.arm_denial`). ARM decides per request
at the request's scope, so a role on one resource group does not make the subscription-wide list succeed.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import urllib.parse
from typing import Any

import trustme

from tests.fakes import rbac
from tests.fakes._http import BackgroundServer, ServedFake, json_handler

LIST_VAULTS = "Microsoft.KeyVault/vaults/read"
READER = rbac.RoleDefinition("Reader", actions=("*/read",))
"""The built-in Reader role ("Azure built-in roles", General: ``Actions: */read``)."""
_LIST = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.KeyVault/vaults/?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class FakeVault:
    subscription: str
    resource_group: str
    name: str
    vault_uri: str

    @property
    def resource_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.KeyVault/vaults/{self.name}"
        )


class ArmKeyVaultFake(ServedFake):
    """The vaults of any number of subscriptions; ``page_size`` vaults per page (small, so paging is exercised)."""

    def __init__(
        self, ca: trustme.CA, *, page_size: int = 2, tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    ):
        self.ca = ca
        self.page_size = page_size
        self.tenant = tenant
        self.access: rbac.AccessPolicy | None = None
        self.requests: collections.Counter[str] = collections.Counter()
        self._vaults: list[FakeVault] = []
        self._lock = threading.Lock()

    def start(self) -> ArmKeyVaultFake:
        self._server = BackgroundServer(json_handler(self.handle), name="fake-arm-keyvault", ca=self.ca)
        return self

    def add_vault(self, subscription: str, resource_group: str, name: str, *, vault_uri: str) -> FakeVault:
        vault = FakeVault(subscription, resource_group, name, vault_uri.rstrip("/") + "/")
        with self._lock:
            self._vaults.append(vault)
        return vault

    def reset(self) -> None:
        with self._lock:
            self._vaults.clear()
            self.requests.clear()
        self.access = None

    def handle(self, method: str, raw_path: str, headers: Any) -> tuple[int, dict[str, str], Any]:
        parts = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            message = "Authentication failed. The 'Authorization' header is missing."
            return 401, {}, {"error": {"code": "AuthenticationFailed", "message": message}}
        match = _LIST.match(parts.path)
        if method != "GET" or match is None:
            return 404, {}, {"error": {"code": "NotFound", "message": f"{method} {parts.path} is not served"}}
        if "api-version" not in query:
            message = "The api-version query parameter (?api-version=) is required for all requests."
            return 400, {}, {"error": {"code": "MissingApiVersionParameter", "message": message}}
        subscription = match["sub"]
        self.requests["list"] += 1
        principal = auth[len("Bearer ") :]
        scope = f"/subscriptions/{subscription}"
        if self.access is not None and not self.access.allows(principal, LIST_VAULTS, scope):
            return rbac.arm_denial(principal, LIST_VAULTS, scope)
        return 200, {}, self._page(subscription, query)

    def _page(self, subscription: str, query: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            mine = [v for v in self._vaults if v.subscription.lower() == subscription.lower()]
        start = int(query.get("$skiptoken", "0") or 0)
        size = min(self.page_size, int(query.get("$top", self.page_size)))
        page: dict[str, Any] = {"value": [self._body(v) for v in mine[start : start + size]]}
        if start + size < len(mine):
            next_query = urllib.parse.urlencode(
                {"api-version": query["api-version"], "$top": str(size), "$skiptoken": str(start + size)}
            )
            page["nextLink"] = (
                f"{self.endpoint}/subscriptions/{subscription}/providers/Microsoft.KeyVault/vaults?{next_query}"
            )
        return page

    def _body(self, vault: FakeVault) -> dict[str, Any]:
        return {
            "id": vault.resource_id,
            "name": vault.name,
            "type": "Microsoft.KeyVault/vaults",
            "location": "westeurope",
            "tags": {},
            "properties": {
                "sku": {"family": "A", "name": "standard"},
                "tenantId": self.tenant,
                "vaultUri": vault.vault_uri,
                "enableRbacAuthorization": True,
                "provisioningState": "Succeeded",
            },
        }
