"""The analytics' secrets: ``worker.secret_env`` (variable → secret name) resolved through a ``base.SecretSource``.

The worker resolves the mapping before it stages a job and hands the values to the analytics as environment
variables only, so the analytics never touch Key Vault or its SDK. A value read is reused for ``secrets.cache_s``
(a rotated secret is picked up within that time, and a fleet of short jobs stays inside the vault's request
limits). Values are never logged: logs and errors carry variable and secret names, and :meth:`SecretEnv.mask`
scrubs values out of any text that came from the analytics (its stderr, quoted in a dead-letter reason).

A missing secret raises ``SecretNotFoundError``, which names the variable and the secret; the worker
dead-letters the job with reason ``SecretNotFound`` (:mod:`scalebus.worker.job` says why it does not abandon
it). :meth:`SecretEnv.check` runs the same resolution once when the worker starts, so a fleet with a wrong
mapping takes no job at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import structlog

from scalebus import errors, redact
from scalebus.backends import base

log = structlog.get_logger(__name__)

MASK = "***"


class SecretEnv:
    """Environment variables for the analytics, read from ``source`` and cached for ``cache_s`` seconds."""

    def __init__(
        self,
        source: base.SecretSource,
        mapping: Mapping[str, str],
        *,
        cache_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._mapping = dict(mapping)
        self._cache_s = cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str]] = {}
        self._seen: set[str] = set()

    def resolve(self) -> dict[str, str]:
        """Every mapped variable with its secret's current value (cached up to ``cache_s``)."""
        return {var: self._value(var, name) for var, name in self._mapping.items()}

    def check(self) -> None:
        """Resolve once at start-up: a secret that does not exist stops the worker before it takes a job."""
        if not self._mapping:
            return
        try:
            self.resolve()
        except errors.SecretNotFoundError as exc:
            raise errors.ConfigError(
                "worker.secret_env", str(exc), "create the secret in [secrets] url or fix the mapping"
            ) from None
        except errors.SecretError as exc:  # transient, or access: each job tries again and says why
            log.warning("secrets_check_failed", error=str(exc), secrets=sorted(self._mapping.values()))
            return
        log.info("secrets_resolved", variables=sorted(self._mapping))

    def mask(self, text: str) -> str:
        """``text`` with every secret value this worker has read replaced by ``***``."""
        with self._lock:
            values = sorted(self._seen, key=len, reverse=True)
        for value in values:
            text = text.replace(value, MASK)
        return text

    def close(self) -> None:
        self._source.close()

    def _value(self, var: str, name: str) -> str:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        try:
            value = self._source.get(name)
        except errors.SecretNotFoundError as exc:
            raise errors.SecretNotFoundError(f"${var}: {exc}") from exc
        redact.register(value)  # every log line and error of this process masks it from now on
        with self._lock:
            self._cache[name] = (now, value)
            if value:
                self._seen.add(value)
        return value
