"""Key Vault secrets against a real vault (opt-in: ``--azure-live``).

Environment: ``SCALEBUS_LIVE_KEYVAULT_URL`` (``https://<vault>.vault.azure.net``, Azure RBAC mode) and
``SCALEBUS_LIVE_KEYVAULT_SECRET``, the name of an existing, enabled secret. The identity needs *Key Vault Secrets
User* on the vault or on that secret; credentials come from ``DefaultAzureCredential``. Nothing is written.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from scalebus import errors
from scalebus.backends.azure import keyvault
from scalebus.settings import SecretsSettings

pytestmark = pytest.mark.azure_live


@pytest.fixture
def live_source() -> Iterator[keyvault.KeyVaultSecretSource]:
    url = os.environ.get("SCALEBUS_LIVE_KEYVAULT_URL", "")
    if not url or not os.environ.get("SCALEBUS_LIVE_KEYVAULT_SECRET"):
        pytest.skip("set SCALEBUS_LIVE_KEYVAULT_URL and SCALEBUS_LIVE_KEYVAULT_SECRET")
    source = keyvault.open_secret_source(SecretsSettings(url=url, cache_s=0))
    yield source
    source.close()


def test_reads_an_existing_secret(live_source: keyvault.KeyVaultSecretSource) -> None:
    assert live_source.get(os.environ["SCALEBUS_LIVE_KEYVAULT_SECRET"])


def test_a_missing_secret_is_secret_not_found(live_source: keyvault.KeyVaultSecretSource) -> None:
    with pytest.raises(errors.SecretNotFoundError):
        live_source.get(f"scalebus-live-missing-{uuid.uuid4().hex[:8]}")
