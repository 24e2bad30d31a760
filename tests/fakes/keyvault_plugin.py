"""pytest fixtures for the Key Vault fake (HTTPS, the session's test CA) and credentials that really authenticate.

``keyvault_server`` is session-scoped; ``keyvault_fake`` hands each test an empty vault. Tokens come from the IMDS
fake through azure-identity's ``ManagedIdentityCredential`` (``AZURE_POD_IDENTITY_AUTHORITY_HOST`` points at it,
set for the test only), exactly as on a VM: neither the SDK nor the credential is mocked.
``keyvault_secrets_factory`` returns ``factory() -> (SecretSource, put)`` for the secrets contract suite. The vault
enforces Azure RBAC: the managed identity holds the built-in *Key Vault Secrets User* on the vault, as the README
tells deployers to assign it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from azure.core.credentials import TokenCredential

from scalebus.backends import base
from scalebus.backends.azure import imds, keyvault
from scalebus.settings import SecretsSettings
from tests.fakes import rbac
from tests.fakes.imds import ImdsFake
from tests.fakes.keyvault import KeyVaultFake

SecretsFactory = Callable[[], tuple[base.SecretSource, Callable[[str, str], None]]]


@pytest.fixture(scope="session")
def keyvault_server(azure_test_ca: trustme.CA, imds_server: ImdsFake) -> Iterator[KeyVaultFake]:
    fake = KeyVaultFake(azure_test_ca).start()
    fake.accept_token(imds_server.token)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def keyvault_fake(keyvault_server: KeyVaultFake, imds_server: ImdsFake) -> Iterator[KeyVaultFake]:
    """An empty vault, no faults, counts at zero, the managed identity a *Key Vault Secrets User* on it."""
    keyvault_server.reset()
    keyvault_server.access = vault_access(keyvault_server, imds_server.token)
    yield keyvault_server
    keyvault_server.reset()


def vault_access(vault: KeyVaultFake, principal: str) -> rbac.AccessPolicy:
    access = rbac.AccessPolicy()
    access.assign(principal, rbac.BUILT_IN["Key Vault Secrets User"], vault.vault_id)
    return access


@pytest.fixture
def managed_identity(imds_fake: ImdsFake, monkeypatch: pytest.MonkeyPatch) -> TokenCredential:
    """The "VM's" managed identity: a real ``ManagedIdentityCredential`` asking the IMDS fake for tokens."""
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds_fake.endpoint)  # restored after the test
    return imds.managed_identity_credential(imds_endpoint=imds_fake.endpoint)


@pytest.fixture
def keyvault_settings(keyvault_fake: KeyVaultFake, azure_test_ca_path: Path) -> SecretsSettings:
    """``[secrets]`` for the fake: its URL, the test CA, and no challenge-resource check (127.0.0.1 is not
    ``*.vault.azure.net``)."""
    return SecretsSettings(
        url=keyvault_fake.endpoint,
        connection_verify=str(azure_test_ca_path),
        verify_challenge_resource=False,
        cache_s=0,
    )


@pytest.fixture
def keyvault_secrets_factory(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> Iterator[SecretsFactory]:
    opened: list[keyvault.KeyVaultSecretSource] = []

    def factory() -> tuple[base.SecretSource, Callable[[str, str], None]]:
        source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
        opened.append(source)

        def put(name: str, value: str) -> None:
            keyvault_fake.set_secret(name, value)

        return source, put

    yield factory
    for source in opened:
        source.close()
