"""The secret port: one suite over a secrets folder and Key Vault (the HTTPS fake, a real managed-identity token).

What the worker relies on: the current value comes back exactly, a new version replaces the old, a missing or
malformed name is a permanent ``SecretNotFoundError`` that names the secret, and no error ever carries a value.
"""

from __future__ import annotations

import pytest

from scalebus import errors

VALUE = "tok-Ω 9f8e7d6c\nsecond line"


def test_get_returns_the_value_exactly(secrets_factory) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    put("genomics-api-token", VALUE)
    put("other", "x")
    assert source.get("genomics-api-token") == VALUE
    assert source.get("other") == "x"
    source.close()


def test_a_new_version_replaces_the_old(secrets_factory) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    put("rotating", "old-value")
    assert source.get("rotating") == "old-value"
    put("rotating", "new-value")
    assert source.get("rotating") == "new-value"


def test_missing_secret_is_permanent_and_named(secrets_factory) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    put("present", VALUE)
    with pytest.raises(errors.SecretNotFoundError, match="'absent'") as caught:
        source.get("absent")
    assert isinstance(caught.value, errors.PermanentBackendError)
    assert not caught.value.transient
    assert VALUE not in str(caught.value)


@pytest.mark.parametrize("name", ["../present", "a_b", "", "x" * 128, "a/b", "a b"])
def test_names_outside_key_vaults_rule_are_not_found(secrets_factory, name: str) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    put("present", VALUE)
    with pytest.raises(errors.SecretNotFoundError):
        source.get(name)


def test_longest_valid_name_works(secrets_factory) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    name = "A-1" + "z" * 124
    put(name, "v")
    assert source.get(name) == "v"


def test_close_twice_is_harmless(secrets_factory) -> None:  # type: ignore[no-untyped-def]
    source, put = secrets_factory()
    put("present", VALUE)
    assert source.get("present") == VALUE
    source.close()
    source.close()
