"""The secret port over Azure Key Vault, through ``azure-keyvault-secrets`` (``SecretClient``).

Boundary: this module turns ``get_secret`` into a string and Key Vault failures into ``errors.SecretError``; the
worker decides what a missing secret means for a job. Authentication is the SDK's challenge protocol: the first
request goes out without a token, the vault answers 401 with ``WWW-Authenticate: Bearer authorization=<tenant
authority>, resource=https://vault.azure.net``, and the SDK asks the credential (the VM's managed identity through
``DefaultAzureCredential``) for that resource's token. The SDK checks that the challenge's resource matches the
vault's host before it sends a token; ``secrets.verify_challenge_resource = false`` turns that off, for emulators
on another host name only.

The SDK's own retries are off: ``_retry.retry_secret_read`` retries throttling (Key Vault answers 429 with
``Retry-After`` above its per-vault limits) and 5xx. Messages name the vault and the secret, never a value.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from azure.core.credentials import TokenCredential
from azure.keyvault.secrets import SecretClient

from scalebus import errors
from scalebus.backends.azure import _errors, _retry
from scalebus.settings import SECRET_NAME_PATTERN, SecretsSettings

_NAME = re.compile(SECRET_NAME_PATTERN)
_FIX = "use https://<vault>.vault.azure.net (or local://<folder> for the embedded default)"


def parse_vault_url(url: str) -> str:
    """``https://<vault>.vault.azure.net[/]`` → the vault's base URL; a ``ConfigError`` for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise errors.ConfigError("secrets.url", f"{url!r}: Key Vault is reached over https only", _FIX)
    if not parts.hostname or parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise errors.ConfigError("secrets.url", f"{url!r} is not a vault URL (host only, no path)", _FIX)
    return f"https://{parts.netloc}"


def open_secret_source(cfg: SecretsSettings, *, credential: TokenCredential | None = None) -> KeyVaultSecretSource:
    """The vault named by ``secrets.url``; authenticates with ``DefaultAzureCredential`` unless told otherwise
    (on a VM that is its managed identity, through IMDS)."""
    vault_url = parse_vault_url(cfg.url)  # a ConfigError before any credential is built
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    return KeyVaultSecretSource(
        vault_url,
        credential=credential,
        connection_verify=cfg.connection_verify,
        verify_challenge_resource=cfg.verify_challenge_resource,
    )


class KeyVaultSecretSource:
    """``base.SecretSource`` over one vault; ``get`` returns the current version of a secret."""

    def __init__(
        self,
        vault_url: str,
        *,
        credential: TokenCredential,
        connection_verify: str = "",
        verify_challenge_resource: bool = True,
    ) -> None:
        self.vault_url = parse_vault_url(vault_url)
        options: dict[str, Any] = {"connection_verify": connection_verify or True}
        self._client = SecretClient(
            self.vault_url,
            credential,
            verify_challenge_resource=verify_challenge_resource,
            retry_total=0,
            logging_enable=False,
            **options,
        )

    def get(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise errors.SecretNotFoundError(f"secret {name!r}: not a valid secret name (letters, digits, '-')")
        return self._read(name)

    @_retry.retry_secret_read
    def _read(self, name: str) -> str:
        what = f"read secret {name!r} from {self.vault_url}"
        try:
            with _errors.translated(_errors.SECRETS, what=what):
                secret = self._client.get_secret(name)
        except errors.SecretError as exc:
            if exc.__cause__ is not None and _errors.disabled_secret(exc.__cause__):
                raise errors.SecretNotFoundError(f"{what}: the secret is disabled") from exc.__cause__
            raise
        except ValueError as exc:  # the SDK refuses a challenge whose resource does not match the vault's host
            raise errors.SecretError(
                f"{what}: the vault's auth challenge names a resource that does not match its host; check "
                "secrets.url (secrets.verify_challenge_resource = false only for an emulator)"
            ) from exc
        if secret.value is None:
            raise errors.SecretNotFoundError(f"{what}: the secret has no value")
        return secret.value

    def close(self) -> None:
        self._client.close()
