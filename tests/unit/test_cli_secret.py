"""``scalebus secret get`` over the Key Vault fakes and the ARM vault-listing fake, with their access rules.

The CLI runs in this process against real servers: vaults listed through ``azure-mgmt-keyvault`` over ARM (paged),
secrets read through ``azure-keyvault-secrets`` with the managed identity's token from the IMDS fake. Nothing of
either SDK is mocked; who may list and who may read is decided by the fakes' role assignments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trustme

from scalebus import logs
from scalebus.cli import app, secret
from tests.fakes import rbac
from tests.fakes.arm_keyvault import READER, ArmKeyVaultFake
from tests.fakes.imds import ImdsFake
from tests.fakes.keyvault import KeyVaultFake
from tests.fakes.keyvault_plugin import vault_access

SUB = "00000000-0000-0000-0000-0000000000aa"
SCALE_SET = (
    f"/subscriptions/{SUB}/resourceGroups/rg-scalebus/providers/Microsoft.Compute/virtualMachineScaleSets/vmss"
)


@pytest.fixture(scope="module")
def arm_keyvault(azure_test_ca: trustme.CA) -> Iterator[ArmKeyVaultFake]:
    with ArmKeyVaultFake(azure_test_ca, page_size=2) as fake:
        yield fake


@pytest.fixture(scope="module")
def other_vaults(azure_test_ca: trustme.CA, imds_server: ImdsFake) -> Iterator[tuple[KeyVaultFake, KeyVaultFake]]:
    """Two more vaults: ``kv-b`` the identity may read, ``kv-c`` it may not (no role there)."""
    with KeyVaultFake(azure_test_ca) as b, KeyVaultFake(azure_test_ca) as c:
        for vault, name in ((b, "kv-b"), (c, "kv-c")):
            vault.accept_token(imds_server.token)
            vault.vault_id = (
                f"/subscriptions/{SUB}/resourceGroups/rg-data/providers/Microsoft.KeyVault/vaults/{name}"
            )
        yield b, c


@pytest.fixture
def fleet(
    keyvault_fake: KeyVaultFake,
    other_vaults: tuple[KeyVaultFake, KeyVaultFake],
    arm_keyvault: ArmKeyVaultFake,
    imds_fake: ImdsFake,
    azure_test_ca_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[KeyVaultFake, KeyVaultFake, KeyVaultFake]]:
    """Three vaults listed over ARM (two pages), the identity a Reader on the subscription and a Secrets User
    on ``kv-scalebus`` and ``kv-b``; the CLI configured for them."""
    a = keyvault_fake
    b, c = other_vaults
    for vault in (b, c):
        vault.reset()
    b.access = vault_access(b, imds_fake.token)
    c.access = rbac.AccessPolicy()  # no role: every read is refused
    arm_keyvault.reset()
    arm_keyvault.access = rbac.AccessPolicy()
    arm_keyvault.access.assign(imds_fake.token, READER, f"/subscriptions/{SUB}")
    for vault, name in ((a, "kv-scalebus"), (c, "kv-c"), (b, "kv-b")):
        arm_keyvault.add_vault(SUB, "rg", name, vault_uri=vault.endpoint)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds_fake.endpoint)  # restored after the test
    for key, value in {
        "SCALEBUS_SCALE_SET__URL": SCALE_SET,
        "SCALEBUS_SCALE_SET__ARM_ENDPOINT": arm_keyvault.endpoint,
        "SCALEBUS_SCALE_SET__CONNECTION_VERIFY": str(azure_test_ca_path),
        "SCALEBUS_SECRETS__CONNECTION_VERIFY": str(azure_test_ca_path),
        "SCALEBUS_SECRETS__VERIFY_CHALLENGE_RESOURCE": "false",
        "SCALEBUS_IDENTITY__IMDS_ENDPOINT": imds_fake.endpoint,
        "SCALEBUS_LOG__FORMAT": "json",
    }.items():
        monkeypatch.setenv(key, value)
    yield a, b, c
    structlog.reset_defaults()
    for handler in [h for h in logging.root.handlers if isinstance(h, logs._SinkHandler)]:
        logging.root.removeHandler(handler)


def run(*argv: str) -> int:
    try:
        app.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_all_vaults_says_where_it_was_found_and_where_it_could_not_look(
    fleet: tuple[KeyVaultFake, KeyVaultFake, KeyVaultFake],
    arm_keyvault: ArmKeyVaultFake,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _a, b, c = fleet
    b.set_secret("genomics-api-token", "value-in-b-0123456789")
    c.set_secret("genomics-api-token", "value-in-c-0123456789")
    assert run("secret", "get", "genomics-api-token", "--all-vaults", "-o", "json") == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["found_in"] == b.endpoint
    assert record["value"] is None
    results = {s["name"]: s["result"] for s in record["searched"]}
    assert results == {"kv-scalebus": "not found", "kv-c": "refused", "kv-b": "found"}
    assert arm_keyvault.requests["list"] == 2, "the third vault is on ARM's second page"
    assert "value-in-b" not in captured.out + captured.err, "no value without --show"


def test_show_prints_the_value_as_it_is_and_redacts_the_rest(
    fleet: tuple[KeyVaultFake, KeyVaultFake, KeyVaultFake], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _b, _c = fleet
    # Shaped like a credential, so redaction would mask it: --show must not.
    a.set_secret("storage-sas", "sv=2024&sp=r&sig=SIGNATUREVALUE")
    assert run("secret", "get", "storage-sas", "--vault", a.endpoint, "--show", "-o", "json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["value"] == "sv=2024&sp=r&sig=SIGNATUREVALUE"
    assert record["searched"] == [{"vault": a.endpoint, "name": None, "result": "found", "detail": None}]


def test_a_secret_found_nowhere_ends_in_exit_1_after_saying_where_it_looked(
    fleet: tuple[KeyVaultFake, KeyVaultFake, KeyVaultFake], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("secret", "get", "missing", "--all-vaults", "-o", "json") == 1
    captured = capsys.readouterr()
    assert [s["result"] for s in json.loads(captured.out)["searched"]] == ["not found", "refused", "not found"]
    assert "not found in 3 place(s) (1 refused this identity)" in captured.err


def test_listing_vaults_needs_read_on_the_subscription(
    fleet: tuple[KeyVaultFake, KeyVaultFake, KeyVaultFake],
    arm_keyvault: ArmKeyVaultFake,
    imds_fake: ImdsFake,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arm_keyvault.access = rbac.AccessPolicy()
    arm_keyvault.access.assign(imds_fake.token, READER, f"/subscriptions/{SUB}/resourceGroups/rg")
    assert run("secret", "get", "anything", "--all-vaults", "-o", "json") == 1
    err = capsys.readouterr().err
    assert "Microsoft.KeyVault/vaults/read" in err and "HTTP 403" in err


def test_vault_and_all_vaults_together_is_a_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("secret", "get", "x", "--vault", "https://kv.vault.azure.net", "--all-vaults") == 2
    assert "not both" in capsys.readouterr().err


def test_find_secret_takes_the_first_place_that_has_it() -> None:
    places = [secret.Place("https://a"), secret.Place("https://b"), secret.Place("https://c")]
    values = {"https://b": "from-b", "https://c": "from-c"}

    def read(place: secret.Place, name: str) -> str:
        if place.url not in values:
            from scalebus import errors

            raise errors.SecretNotFoundError(f"{name} not in {place.url}")
        return values[place.url]

    record, value = secret.find_secret("s", places, read)
    assert (record["found_in"], record["also_in"], value) == ("https://b", ["https://c"], "from-b")
