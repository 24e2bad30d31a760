"""Finding a secret across Key Vaults: the vaults ARM lists for the identity, and reading a secret from any vault.

``scalebus secret get --all-vaults`` lists the subscription's vaults through ``azure-mgmt-keyvault``
(``vaults.list_by_subscription``, which needs ``Microsoft.KeyVault/vaults/read`` at the subscription; the pager
follows ``nextLink``), then reads the secret from each vault through :mod:`.keyvault`'s adapter. The two planes
are apart: a role that lists vaults (Reader) grants no secret, and a role that reads secrets (Key Vault Secrets
User on one vault) lists nothing. A vault that refuses the read is reported as refused
(``errors.AccessDeniedError``), not as a missing secret, so the search says where it could not look.

Boundary: SDK objects stay here; callers get :class:`Vault` values and strings. ARM calls go through
``_retry.retry_control_plane_read``; the SDK's own retries are off, as in the other ARM adapters.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from azure.core.credentials import TokenCredential
from azure.mgmt.keyvault import KeyVaultManagementClient

from scalebus import errors
from scalebus.backends.azure import _errors, _retry, keyvault
from scalebus.backends.azure.compute import DEFAULT_ARM_ENDPOINT, arm_token_scope
from scalebus.settings import SecretsSettings

_VAULTS = _errors.ErrorKinds(errors.SecretError, errors.TransientSecretError, errors.SecretError)


@dataclasses.dataclass(frozen=True, slots=True)
class Vault:
    """One vault as ARM lists it."""

    name: str
    resource_id: str
    url: str
    """The data-plane URL (``properties.vaultUri``) without the trailing slash."""


class VaultSearch:
    """Lists a subscription's vaults over ARM and reads secrets from vaults by URL (one client per vault)."""

    def __init__(
        self,
        *,
        credential: TokenCredential,
        secrets: SecretsSettings,
        subscription_id: str = "",
        arm_endpoint: str = DEFAULT_ARM_ENDPOINT,
        arm_connection_verify: str = "",
    ) -> None:
        self._credential = credential
        self._secrets = secrets
        self._subscription_id = subscription_id
        self._arm_endpoint = arm_endpoint
        self._arm_connection_verify = arm_connection_verify
        self._arm: KeyVaultManagementClient | None = None
        self._sources: dict[str, keyvault.KeyVaultSecretSource] = {}
        self._lock = threading.Lock()

    @_retry.retry_control_plane_read
    def list_vaults(self) -> list[Vault]:
        """Every vault of the subscription, in ARM's order (all pages)."""
        if not self._subscription_id:
            raise errors.ConfigError(
                "--subscription",
                "no subscription to list vaults in",
                "give --subscription <id>, or set scale_set.url to the scale set's resource id",
            )
        what = f"list Key Vaults in subscription {self._subscription_id}"
        with _errors.translated(_VAULTS, what=what):
            try:
                listed = list(self._arm_client().vaults.list_by_subscription())
            except Exception as exc:
                if _status(exc) == 403:
                    raise errors.AccessDeniedError(
                        f"{what}: refused (HTTP 403); the identity needs Microsoft.KeyVault/vaults/read there "
                        "(Reader, say)"
                    ) from exc
                raise
        return [_vault(v) for v in listed if getattr(getattr(v, "properties", None), "vault_uri", None)]

    def read(self, vault_url: str, name: str) -> str:
        """The current value of ``name`` in the vault at ``vault_url``: ``SecretNotFoundError`` if it is not
        there, ``AccessDeniedError`` if the vault refuses this identity."""
        source = self._source(vault_url)
        try:
            return source.get(name)
        except errors.SecretNotFoundError:
            raise
        except errors.SecretError as exc:
            if _status(exc.__cause__) == 403:
                raise errors.AccessDeniedError(
                    f"read secret {name!r} from {source.vault_url}: refused (HTTP 403); the identity needs "
                    "Key Vault Secrets User on the vault"
                ) from exc.__cause__
            raise

    def close(self) -> None:
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
            arm, self._arm = self._arm, None
        for source in sources:
            source.close()
        if arm is not None:
            arm.close()

    def _arm_client(self) -> KeyVaultManagementClient:
        with self._lock:
            if self._arm is None:
                self._arm = KeyVaultManagementClient(
                    self._credential,
                    self._subscription_id,
                    base_url=self._arm_endpoint.rstrip("/"),
                    credential_scopes=[arm_token_scope(self._arm_endpoint)],
                    connection_verify=self._arm_connection_verify or True,
                    retry_total=0,
                    logging_enable=False,
                )
            return self._arm

    def _source(self, vault_url: str) -> keyvault.KeyVaultSecretSource:
        base_url = keyvault.parse_vault_url(vault_url)
        with self._lock:
            if base_url not in self._sources:
                self._sources[base_url] = keyvault.KeyVaultSecretSource(
                    base_url,
                    credential=self._credential,
                    connection_verify=self._secrets.connection_verify,
                    verify_challenge_resource=self._secrets.verify_challenge_resource,
                )
            return self._sources[base_url]


def open_vault_search(
    secrets: SecretsSettings,
    *,
    subscription_id: str = "",
    arm_endpoint: str = DEFAULT_ARM_ENDPOINT,
    arm_connection_verify: str = "",
    credential: TokenCredential | None = None,
) -> VaultSearch:
    """A :class:`VaultSearch` signed in as ``credential`` (default ``DefaultAzureCredential``: on a VM its
    managed identity, on a workstation the ``az login`` user)."""
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return VaultSearch(
        credential=credential,
        secrets=secrets,
        subscription_id=subscription_id,
        arm_endpoint=arm_endpoint,
        arm_connection_verify=arm_connection_verify,
    )


def _vault(listed: Any) -> Vault:
    return Vault(
        name=str(listed.name or ""),
        resource_id=str(listed.id or ""),
        url=str(listed.properties.vault_uri).rstrip("/"),
    )


def _status(exc: BaseException | None) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None
