"""One redaction step for every text that leaves a process: log lines, error messages, dead-letter reasons, status.

Two kinds of secret are masked. Credentials with a recognisable shape (a SAS ``sig=``, ``AccountKey=``,
``SharedAccessKey=``, an ``Authorization`` header, a bearer token, a bare JWT, a PEM private key) are found by
pattern wherever they appear. Secret *values* with no shape (a Key Vault secret, an API token in the environment)
are registered by the process that fetched them (:func:`register`) and masked wherever they appear, also
percent-encoded or JSON-escaped. Values shorter than :data:`MIN_SECRET_CHARS` are not registered: masking every
``"1"`` or ``"true"`` would make logs unreadable and says nothing about the secret.

The registry is one per process (:data:`default`): a secret the worker fetched must be masked in every log line
of that process, whichever module writes it. Redaction never raises and never needs I/O.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping

MASK = "***"
MIN_SECRET_CHARS = 6
"""Shortest value :func:`register` accepts."""

_CREDENTIAL_KEYS = (
    r"sig|\w*(?:AccountKey|SharedAccessKey|SharedAccessSignature|token|client_secret|password|passwd|api_?key)"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # key=value and key%3Dvalue (a URL quoted inside another), up to the next separator.
    (re.compile(rf"(?i)\b({_CREDENTIAL_KEYS})(=|%3D)[^;&\s\"'<>,]+"), rf"\1\2{MASK}"),
    # "AccountKey": "..." in JSON or a dict repr.
    (re.compile(rf"(?i)([\"']({_CREDENTIAL_KEYS})[\"']\s*:\s*[\"'])[^\"']+"), rf"\1{MASK}"),
    # Authorization: Bearer <t> / SharedKey acct:<sig> / a bare credential (the scheme is kept).
    (
        re.compile(
            r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|sharedkey|sharedaccesssignature)\s+)?)"
            r"[^\s\"',;]+"
        ),
        rf"\1{MASK}",
    ),
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/-]{16,}=*"), rf"\1{MASK}"),
    # A JWT (header.payload.signature, each base64url; a header always starts with '{"', base64 eyJ).
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*)?"), MASK),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S), MASK),
)
_SECRET_NAME = re.compile(
    r"(?i)(KEY|SECRET|TOKEN|PASSWORD|PASSWD|PWD|CREDENTIAL|CONNECTION_?STRING|CONN_?STR|SAS|AUTH|SIGNATURE|PRIVATE)"
)


class Redactor:
    """Masks credential shapes and registered secret values. Thread-safe: workers register from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._compiled: re.Pattern[str] | None = None

    def register(self, value: str) -> bool:
        """Mask ``value`` (and its encoded forms) from now on; ``False`` if it is too short to be masked."""
        forms = {value, value.strip()}
        forms |= {json.dumps(v)[1:-1] for v in list(forms)} | {urllib.parse.quote(v, safe="") for v in list(forms)}
        forms = {f for f in forms if len(f) >= MIN_SECRET_CHARS}
        if not forms:
            return False
        with self._lock:
            if forms <= self._values:
                return True
            self._values |= forms
            longest_first = sorted(self._values, key=len, reverse=True)
            self._compiled = re.compile("|".join(re.escape(v) for v in longest_first))
        return True

    def register_env(self, environ: Mapping[str, str]) -> int:
        """Register the values of variables whose names say they hold a secret; how many were registered."""
        return sum(self.register(value) for name, value in environ.items() if looks_secret(name))

    def redact(self, text: str) -> str:
        """``text`` with every credential shape and registered value replaced by :data:`MASK`."""
        compiled = self._compiled  # one read: a concurrent register swaps the reference, never mutates it
        if compiled is not None:
            text = compiled.sub(MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def redact_value(self, value: object) -> object:
        """Redact strings anywhere inside ``value`` (dicts, lists, tuples); other objects become their redacted
        ``repr``, which is what a log renderer would print for them; numbers, booleans and ``None`` pass."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {self.redact_value(k): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(v) for v in value]
        return self.redact(repr(value))


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret (``*_KEY``, ``*TOKEN*``, ``*SAS*``…).

    Names that say where a secret is rather than holding one are not: scalebus's own settings variables
    (``SCALEBUS_SECRETS__URL``, ``SCALEBUS_STORAGE__CONNECTION_STRING_ENV``: the settings never hold a secret
    value), names ending in ``_URL``, ``_ENV``, ``_PATH``, ``_DIR``, ``_FILE``, ``_SOCK``, ``_NAME``, ``_HOST``
    or ``AUTHORITY``, and the shell's ``PWD`` / ``OLDPWD``."""
    upper = name.upper()
    if upper in _NOT_SECRETS or upper.startswith("SCALEBUS_") or upper.endswith(_LOCATION_SUFFIXES):
        return False
    return bool(_SECRET_NAME.search(name))


_LOCATION_SUFFIXES = ("_URL", "_ENV", "_PATH", "_DIR", "_FILE", "_SOCK", "_NAME", "_HOST", "AUTHORITY")
_NOT_SECRETS = frozenset({"PWD", "OLDPWD"})
"""The shell's working directories: ``PWD`` is also short for password in names like ``DB_PWD``."""


default = Redactor()
"""The process's registry: what :func:`register` fills and :func:`redact` (and the log processor) masks."""


def register(value: str) -> bool:
    """Mask ``value`` in everything this process redacts from now on (see :meth:`Redactor.register`)."""
    return default.register(value)


def register_all(values: Iterable[str]) -> None:
    """Register several values (secrets read from a vault or a folder)."""
    for value in values:
        default.register(value)


def register_env(environ: Mapping[str, str]) -> int:
    """Register the values of secret-looking variables in ``environ`` (see :meth:`Redactor.register_env`)."""
    return default.register_env(environ)


def redact(text: str) -> str:
    """``text`` with credentials and registered secrets masked, for messages, dead-letter reasons and status."""
    return default.redact(text)
