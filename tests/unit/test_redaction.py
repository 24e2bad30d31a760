"""Redaction: credential shapes and registered secret values never reach a log line or a message."""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
import uuid
from typing import Literal

import pytest
import structlog

from scalebus import logs, redact


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> redact.Redactor:
    """A fresh process registry for the test (registered values would otherwise outlive it)."""
    fresh = redact.Redactor()
    monkeypatch.setattr(redact, "default", fresh)
    return fresh


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        pytest.param(
            "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2030-01-01&sp=r&sig=AbC%2BdEf%3D",
            "AbC%2BdEf",
            "se=2030-01-01&sp=r&sig=***",
            id="sas-url",
        ),
        pytest.param("quoted: sig%3DAbCdEfGh%26se", "AbCdEfGh", "sig%3D***", id="sas-percent-encoded"),
        pytest.param(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManage;SharedAccessKey=k3y+Val/ue=",
            "k3y+Val",
            "SharedAccessKeyName=RootManage;SharedAccessKey=***",
            id="servicebus-connection-string",
        ),
        pytest.param(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Eby8vdM02xNOcqFl==;EndpointSuffix=x",
            "Eby8vdM02xNOcqFl",
            "AccountName=acct;AccountKey=***;EndpointSuffix=x",
            id="storage-connection-string",
        ),
        pytest.param("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl", "Bearer ***", id="bearer-header"),
        pytest.param(
            '{"authorization": "SharedKey acct:c2lnbmF0dXJl"}', "c2lnbmF0dXJl", "SharedKey ***", id="sharedkey"
        ),
        pytest.param(
            "sent Bearer 0123456789abcdefghij to x", "0123456789abcdefghij", "Bearer ***", id="bare-bearer"
        ),
        pytest.param(
            "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlX2hlcmU end",
            "eyJzdWIiOiIxMjM0In0",
            "token *** end",
            id="jwt",
        ),
        pytest.param('{"AccountKey": "abcdefgh=="}', "abcdefgh", '"AccountKey": "***"', id="json-key"),
        pytest.param("refresh_token=r3fr3sh&x=1", "r3fr3sh", "x=1", id="refresh-token"),
        pytest.param(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "MIIEow", "***", id="pem"
        ),
    ],
)
def test_credential_shapes_are_masked(text: str, secret: str, kept: str) -> None:
    out = redact.Redactor().redact(text)
    assert secret not in out
    assert kept in out


@pytest.mark.parametrize(
    "text",
    [
        "bearer tokens need TLS",
        "design=3 idle_token_s=5 key=samples/S01/a.fq",
        "staged 12 files (3.2 MB) from abfss://fs@acct.dfs.core.windows.net/samples/S01/",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact.Redactor().redact(text) == text


def test_registered_values_are_masked_in_their_encoded_forms_too() -> None:
    r = redact.Redactor()
    secret = 'pa ss"wo/rd\\é'
    assert r.register(secret + "\n")  # read from a file, with its trailing newline
    for form in (secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe="")):
        assert r.redact(f"<{form}>") == "<***>", form


def test_short_values_are_never_registered() -> None:
    r = redact.Redactor()
    assert not r.register("true")
    assert not r.register("12345")
    assert r.redact("true 12345") == "true 12345"
    assert r.register("123456")


def test_register_env_takes_secret_looking_names_only() -> None:
    r = redact.Redactor()
    count = r.register_env(
        {
            "API_TOKEN": "tok-value-1",
            "STORAGE_CONN_STR": "conn-value-2",
            "HOME": "/home/worker",
            "DB_PASSWORD": "pw",
        }
    )
    assert count == 2
    assert r.redact("tok-value-1 conn-value-2 /home/worker") == "*** *** /home/worker"


CANARY_KINDS = ("event", "kwarg", "nested", "exception", "sas", "connection")


def _emit_everything(canary: str) -> None:
    """One log line per way a secret can reach a log: the test asserts each one is masked."""
    log = structlog.get_logger("canary")
    log.info(f"event holds {canary}")
    log.info("kwarg", value=canary)
    log.warning("nested", detail={"inner": [f"deep {canary}", {"more": canary}]}, as_tuple=(canary,))
    try:
        raise RuntimeError(f"failed with {canary}")
    except RuntimeError:
        log.exception("exception")
    log.error("sas", url=f"https://acct.blob.core.windows.net/c/b?sv=2022&se=2030&sp=r&sig=SIG{canary}")
    log.error("connection", cs=f"Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey=KEY{canary}")
    log.info("object", obj=ValueError(canary))


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_canary_never_reaches_a_log_line(fmt: Literal["json", "console"], registry: redact.Redactor) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    buffer = io.StringIO()
    logs.configure(fmt=fmt, level="debug", stream=buffer)
    try:
        registry.register(canary)
        _emit_everything(canary)
        # The SAS signature and the key are masked by shape even where no value was registered.
        _emit_everything("unregistered")
    finally:
        structlog.reset_defaults()
    out = buffer.getvalue()
    assert canary not in out
    assert "SIGunregistered" not in out and "KEYunregistered" not in out
    assert "se=2030&sp=r&sig=***" in out, "what is not secret is kept"
    assert all(kind in out for kind in CANARY_KINDS), "every line was written"
    assert "RuntimeError" in out, "the traceback is still there, with the secret masked"


def test_the_canary_is_visible_without_the_redaction_step(registry: redact.Redactor) -> None:
    """The control: the same log calls through the same chain minus redaction do show the canary, so the test
    above fails if the redaction processor is taken out of logs.configure."""
    canary = f"canary-{uuid.uuid4().hex}"
    buffer = io.StringIO()
    registry.register(canary)
    structlog.configure(
        processors=[structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(file=buffer),
    )
    try:
        _emit_everything(canary)
    finally:
        structlog.reset_defaults()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 7
    assert all(canary in line for line in lines)


def test_sdk_messages_through_stdlib_logging_are_redacted(
    registry: redact.Redactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.root, "handlers", [])  # pytest's capture handler would keep basicConfig idle
    buffer = io.StringIO()
    logs.configure(fmt="json", stream=buffer)
    try:
        logging.getLogger("azure.core.pipeline").warning("GET %s failed", "https://a/c?sp=r&sig=SDKSIGNATURE")
    finally:
        structlog.reset_defaults()
        for handler in logging.root.handlers:
            handler.close()
    assert "SDKSIGNATURE" not in buffer.getvalue()
    assert "sig=***" in buffer.getvalue()


def test_module_functions_use_the_process_registry(registry: redact.Redactor) -> None:
    redact.register("module-level-secret")
    assert redact.redact("x module-level-secret y") == "x *** y"
    assert logs.redact("module-level-secret") == "***"
    assert registry.redact("module-level-secret") == "***"


def test_the_event_processor_redacts_every_value_before_rendering(registry: redact.Redactor) -> None:
    registry.register("processor-secret")
    event = {"event": "x processor-secret", "n": 3, "ok": True, "none": None, "d": {"k": ["processor-secret"]}}
    event["err"] = KeyError("processor-secret")
    out = logs.redact_event(None, "info", event)
    assert out == {
        "event": "x ***",
        "n": 3,
        "ok": True,
        "none": None,
        "d": {"k": ["***"]},
        "err": "KeyError('***')",
    }


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("DB_PWD", True),
        ("API_TOKEN", True),
        ("STORAGE_ACCOUNT_KEY", True),
        ("PWD", False),
        ("OLDPWD", False),
        ("SCALEBUS_SECRETS__URL", False),
        ("SCALEBUS_STORAGE__CONNECTION_STRING_ENV", False),
        ("SSH_AUTH_SOCK", False),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", False),
        ("XAUTHORITY", False),
    ],
)
def test_names_that_say_where_a_secret_is_are_not_secrets(name: str, secret: bool) -> None:
    assert redact.looks_secret(name) is secret
