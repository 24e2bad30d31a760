"""The Key Vault adapter on the wire: challenge auth with a managed-identity token, throttling, disabled secrets,
the challenge-resource guard, and ``secrets.url`` errors. Real ``SecretClient`` and ``ManagedIdentityCredential``
against the HTTPS Key Vault fake and the IMDS fake."""

from __future__ import annotations

import pytest
from azure.core.credentials import TokenCredential

from scalebus import errors
from scalebus.backends.azure import _retry, keyvault
from scalebus.settings import SecretsSettings
from tests.fakes import rbac
from tests.fakes.imds import ImdsFake
from tests.fakes.keyvault import GET_SECRET, KeyVaultFake


def test_challenge_then_managed_identity_token(
    keyvault_fake: KeyVaultFake,
    keyvault_settings: SecretsSettings,
    managed_identity: TokenCredential,
    imds_fake: ImdsFake,
) -> None:
    keyvault_fake.set_secret("genomics-api-token", "v1")
    tokens_before = imds_fake.count("/metadata/identity/oauth2/token")
    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        assert source.get("genomics-api-token") == "v1"
        assert source.get("genomics-api-token") == "v1"
    finally:
        source.close()
    assert keyvault_fake.requests["genomics-api-token"] == 2
    assert imds_fake.count("/metadata/identity/oauth2/token") == tokens_before + 1, "one token, reused"


def test_throttling_is_retried_after_retry_after(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> None:
    keyvault_fake.set_secret("s", "v")
    keyvault_fake.fail_next(429, count=2, retry_after_s=0.1)
    before = _retry.RETRY_COUNTS.get("secret_read", 0)
    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        assert source.get("s") == "v"
    finally:
        source.close()
    assert _retry.RETRY_COUNTS["secret_read"] == before + 2


def test_persistent_5xx_is_transient(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> None:
    keyvault_fake.set_secret("s", "v")
    keyvault_fake.fail_next(503, count=10, retry_after_s=0)
    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        with pytest.raises(errors.TransientSecretError, match="HTTP 503"):
            source.get("s")
    finally:
        source.close()


def test_disabled_secret_counts_as_missing(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> None:
    keyvault_fake.set_secret("off", "hidden-value", enabled=False)
    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        with pytest.raises(errors.SecretNotFoundError, match=r"'off'.*disabled") as caught:
            source.get("off")
    finally:
        source.close()
    assert "hidden-value" not in str(caught.value)


def test_no_managed_identity_is_an_access_error(
    keyvault_fake: KeyVaultFake,
    keyvault_settings: SecretsSettings,
    managed_identity: TokenCredential,
    imds_fake: ImdsFake,
) -> None:
    imds_fake.token_status = 400  # a VM with no identity assigned
    keyvault_fake.set_secret("s", "v")
    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        with pytest.raises(errors.SecretError, match="authentication failed") as caught:
            source.get("s")
    finally:
        source.close()
    assert not isinstance(caught.value, errors.SecretNotFoundError | errors.TransientBackendError)


def test_challenge_resource_is_checked_by_default(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> None:
    """The fake's challenge names https://vault.azure.net, which 127.0.0.1 is not: the SDK sends no token."""
    keyvault_fake.set_secret("s", "v")
    strict = keyvault_settings.model_copy(update={"verify_challenge_resource": True})
    source = keyvault.open_secret_source(strict, credential=managed_identity)
    try:
        with pytest.raises(errors.SecretError, match="verify_challenge_resource"):
            source.get("s")
    finally:
        source.close()
    assert keyvault_fake.requests["s"] == 0, "no authorised request reached the vault"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://genomics.vault.azure.net", "https only"),
        ("https://genomics.vault.azure.net/secrets/x", "no path"),
        ("https://", "no path"),
        ("genomics.vault.azure.net", "https only"),
    ],
    ids=["http", "path", "no-host", "no-scheme"],
)
def test_bad_vault_url_is_a_config_error(url: str, problem: str) -> None:
    with pytest.raises(errors.ConfigError, match=problem) as caught:
        keyvault.parse_vault_url(url)
    assert caught.value.key == "secrets.url"
    assert "https://<vault>.vault.azure.net" in caught.value.fix


def test_vault_url_keeps_host_and_port() -> None:
    assert keyvault.parse_vault_url("https://genomics.vault.azure.net/") == "https://genomics.vault.azure.net"
    assert keyvault.parse_vault_url("https://127.0.0.1:8443") == "https://127.0.0.1:8443"


def test_without_secrets_user_on_the_vault_reading_is_a_permanent_access_error(
    keyvault_fake: KeyVaultFake, keyvault_settings: SecretsSettings, managed_identity: TokenCredential
) -> None:
    keyvault_fake.set_secret("s", "v")
    keyvault_fake.access = rbac.AccessPolicy()  # the identity authenticates but holds no role

    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        with pytest.raises(errors.SecretError, match="403") as caught:
            source.get("s")
    finally:
        source.close()

    assert not caught.value.transient
    assert not isinstance(caught.value, errors.SecretNotFoundError), "no access is not a missing secret"
    assert [action for _, action, _ in keyvault_fake.access.denied] == [GET_SECRET]


def test_secrets_user_on_one_secret_reads_that_secret_only(
    keyvault_fake: KeyVaultFake,
    keyvault_settings: SecretsSettings,
    managed_identity: TokenCredential,
    imds_fake: ImdsFake,
) -> None:
    keyvault_fake.set_secret("mine", "v")
    keyvault_fake.set_secret("theirs", "w")
    keyvault_fake.access = rbac.AccessPolicy()
    keyvault_fake.access.assign(
        imds_fake.token, rbac.BUILT_IN["Key Vault Secrets User"], f"{keyvault_fake.vault_id}/secrets/mine"
    )

    source = keyvault.open_secret_source(keyvault_settings, credential=managed_identity)
    try:
        assert source.get("mine") == "v"
        with pytest.raises(errors.SecretError, match="403"):
            source.get("theirs")
    finally:
        source.close()
