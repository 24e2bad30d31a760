"""A wire-level fake of the Azure Key Vault secrets data plane, over HTTPS on 127.0.0.1 (trustme certificate).

Served: ``GET /secrets/{secret-name}[/{secret-version}]?api-version=...`` answering a ``SecretBundle``
(``value``, ``id`` = ``<vault>/secrets/<name>/<version>``, ``attributes`` {``enabled``, ``created``, ``updated``
(epoch seconds), ``recoveryLevel``}, ``tags``, ``contentType``). An empty version means the newest. Errors use Key
Vault's ``{"error": {"code", "message"[, "innererror"]}}`` body: 404 ``SecretNotFound``; 403 ``Forbidden`` with
inner ``SecretDisabled`` for a disabled secret; 400 ``BadParameter`` without ``api-version``; injected faults
(429 ``Throttled`` with ``Retry-After``, 503) via :meth:`KeyVaultFake.fail_next`.

Authentication is Key Vault's challenge protocol: a request without ``Authorization: Bearer <token>`` (or with a
token this fake did not hand out) gets 401 with ``WWW-Authenticate: Bearer
authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"``; the SDK then asks
its credential for ``https://vault.azure.net/.default`` and repeats the request with the token. Tests get real
tokens from the IMDS fake through ``ManagedIdentityCredential`` and register them with :meth:`accept_token`.
The SDK checks that the challenge's resource matches the vault's host, which ``127.0.0.1`` never does, so clients
of this fake pass ``verify_challenge_resource=False`` (``secrets.verify_challenge_resource = false``).

Access (Azure RBAC mode): with ``access`` set (a :class:`tests.fakes.rbac.AccessPolicy`), reading a secret needs
the data action ``Microsoft.KeyVault/vaults/secrets/getSecret/action`` at the vault's resource id (``vault_id``) or
the secret's (``<vault_id>/secrets/<name>``), as "Provide access to Key Vault keys, certificates, and secrets with
Azure role-based access control" (https://learn.microsoft.com/en-us/azure/key-vault/general/rbac-guide) describes;
without it the answer is 403 ``Forbidden`` with inner code ``ForbiddenByRbac`` and the "Caller is not authorized
to perform action on resource" message of "Troubleshooting Azure Key Vault access policy issues"
(https://learn.microsoft.com/en-us/azure/key-vault/general/troubleshooting-access-issues).

Followed (read, not copied): the ``GetSecret`` operation, ``SecretBundle`` / ``SecretAttributes`` /
``KeyVaultError`` definitions and ``examples/GetSecret-example.json`` in Azure/azure-rest-api-specs
(``specification/keyvault/data-plane/Microsoft.KeyVault/stable/7.5``); the 401 challenge header as recorded in
Azure/azure-sdk-for-js's keyvault-secrets test recordings; and ``azure/keyvault/secrets/_shared/
challenge_auth_policy.py`` and ``http_challenge.py`` of azure-keyvault-secrets 4.12 (installed in the venv).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import urllib.parse
import uuid
from typing import Any

import trustme

from tests.fakes import rbac
from tests.fakes._http import BackgroundServer, ServedFake, json_handler

RESOURCE = "https://vault.azure.net"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
VAULT_ID = (
    "/subscriptions/00000000-0000-0000-0000-0000000000aa/resourceGroups/rg-scalebus"
    "/providers/Microsoft.KeyVault/vaults/kv-scalebus"
)
GET_SECRET = "Microsoft.KeyVault/vaults/secrets/getSecret/action"


@dataclasses.dataclass
class _Version:
    version: str
    value: str
    enabled: bool
    created: int
    content_type: str | None
    tags: dict[str, str]


class KeyVaultFake(ServedFake):
    """One vault. ``set_secret`` adds a version (the newest is current); ``requests`` counts GETs per name."""

    def __init__(self, ca: trustme.CA, *, tenant: str = TENANT) -> None:
        self.ca = ca
        self.tenant = tenant
        self.requests: collections.Counter[str] = collections.Counter()
        self.challenges = 0
        self._tokens: set[str] = set()
        self._secrets: dict[str, list[_Version]] = {}
        self._faults: list[tuple[int, float | None]] = []
        self._lock = threading.Lock()
        self.vault_id = VAULT_ID
        self.access: rbac.AccessPolicy | None = None
        """Role assignments to enforce; ``None``: every accepted token may read every secret."""

    def start(self) -> KeyVaultFake:
        self._server = BackgroundServer(json_handler(self.handle), name="fake-keyvault", ca=self.ca)
        return self

    # ------------------------------------------------------------------ test-side control

    def accept_token(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    def set_secret(
        self,
        name: str,
        value: str,
        *,
        enabled: bool = True,
        content_type: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        version = uuid.uuid4().hex
        with self._lock:
            self._secrets.setdefault(name.lower(), []).append(
                _Version(version, value, enabled, int(time.time()), content_type, dict(tags or {}))
            )
        return version

    def reset(self) -> None:
        """Forget secrets, faults and counts (tokens stay accepted): a clean vault for the next test."""
        with self._lock:
            self._secrets.clear()
            self._faults.clear()
            self.requests.clear()
            self.challenges = 0

    def delete_secret(self, name: str) -> None:
        with self._lock:
            self._secrets.pop(name.lower(), None)

    def fail_next(self, status: int, *, count: int = 1, retry_after_s: float | None = None) -> None:
        """Answer the next ``count`` authorised GETs with ``status`` (429 Throttled, 503 ServiceUnavailable)."""
        with self._lock:
            self._faults += [(status, retry_after_s)] * count

    # ------------------------------------------------------------------ the wire

    def handle(self, method: str, raw_path: str, headers: Any) -> tuple[int, dict[str, str], Any]:
        parts = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        segments = [urllib.parse.unquote(s) for s in parts.path.strip("/").split("/")]
        auth = headers.get("Authorization", "")
        with self._lock:
            authorised = auth.startswith("Bearer ") and auth[len("Bearer ") :] in self._tokens
            if not authorised:
                self.challenges += 1
                authority = f"https://login.microsoftonline.com/{self.tenant}"
                challenge = f'Bearer authorization="{authority}", resource="{RESOURCE}"'
                return (
                    401,
                    {"WWW-Authenticate": challenge},
                    _error("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
                )
            if "api-version" not in query:
                return 400, {}, _error("BadParameter", "The 'api-version' query parameter is missing.")
            if method != "GET" or len(segments) not in (2, 3) or segments[0] != "secrets":
                return 405, {}, _error("BadParameter", f"{method} {parts.path} is not served by this fake")
            name, version = segments[1], (segments[2] if len(segments) == 3 else "")
            self.requests[name] += 1
            denied = self._denied(auth[len("Bearer ") :], name)
            if denied is not None:
                return denied
            if self._faults:
                status, retry_after = self._faults.pop(0)
                extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                code = "Throttled" if status == 429 else "ServiceUnavailable"
                return status, extra, _error(code, "Injected fault.")
            return self._get(name, version)

    def _denied(self, principal: str, name: str) -> tuple[int, dict[str, str], Any] | None:
        scope = f"{self.vault_id}/secrets/{name}"
        if self.access is None or self.access.allows(principal, GET_SECRET, scope, data=True):
            return None
        message = (
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or "
            "role definitions were changed recently, please observe propagation time.\r\n"
            f"Caller: oid={principal}\r\nAction: '{GET_SECRET}'\r\nResource: '{scope.lower()}'\r\n"
            "Assignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null"
        )
        return 403, {}, _error("Forbidden", message, inner="ForbiddenByRbac")

    def _get(self, name: str, version: str) -> tuple[int, dict[str, str], Any]:
        versions = self._secrets.get(name.lower(), [])
        found = [v for v in versions if v.version == version] if version else versions[-1:]
        if not found:
            detail = f" with version ({version})" if version else ""
            return (
                404,
                {},
                _error(
                    "SecretNotFound", f"A secret with (name/id) {name}{detail} was not found in this key vault."
                ),
            )
        v = found[0]
        if not v.enabled:
            return (
                403,
                {},
                _error("Forbidden", "Operation get is not allowed on a disabled secret.", inner="SecretDisabled"),
            )
        base_url = self.endpoint
        bundle: dict[str, Any] = {
            "value": v.value,
            "id": f"{base_url}/secrets/{name}/{v.version}",
            "attributes": {
                "enabled": v.enabled,
                "created": v.created,
                "updated": v.created,
                "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": 90,
            },
            "tags": v.tags,
        }
        if v.content_type is not None:
            bundle["contentType"] = v.content_type
        return 200, {}, bundle


def _error(code: str, message: str, *, inner: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        body["innererror"] = {"code": inner}
    return {"error": body}
