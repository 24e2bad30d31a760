"""Translate azure-core / SDK exceptions into scalebus errors.

Adapters wrap every SDK call in :func:`translated` so nothing from ``azure.*`` leaks past a port. Whether an
error is transient follows from the HTTP status or the exception type, never from a message string. Messages
carry the status and error code only: SDK messages can quote URLs with SAS tokens, so they are not copied.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Iterator
from dataclasses import dataclass

from azure.core import exceptions as core_exc

from scalebus import errors

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class ErrorKinds:
    """Which scalebus types one service maps to."""

    base: type[errors.BackendError]
    transient: type[errors.TransientBackendError]
    not_found: type[errors.BackendError]


def retry_after_s(response: object) -> float | None:
    """Seconds from a ``Retry-After`` (or ``x-ms-retry-after-ms``) header, if the response has one."""
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    millis = headers.get("x-ms-retry-after-ms") or headers.get("retry-after-ms")
    if millis:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000.0)
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time())


def to_scalebus(exc: BaseException, kinds: ErrorKinds, *, what: str) -> errors.BackendError:
    """The scalebus error for one SDK exception (the caller chains it with ``from exc``)."""
    if isinstance(exc, core_exc.ResourceNotFoundError):
        return kinds.not_found(f"{what}: not found")
    if isinstance(exc, core_exc.ClientAuthenticationError):
        return kinds.base(f"{what}: authentication failed ({_status(exc)}); check the identity and its roles")
    if isinstance(exc, core_exc.HttpResponseError):
        status = exc.status_code or 0
        if status in _TRANSIENT_STATUS:
            return kinds.transient(
                f"{what}: HTTP {status} {_code(exc)}".rstrip(), retry_after_s=retry_after_s(exc.response)
            )
        return kinds.base(f"{what}: HTTP {status} {_code(exc)}".rstrip())
    if isinstance(exc, core_exc.ServiceRequestError | core_exc.ServiceResponseError | OSError | TimeoutError):
        return kinds.transient(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, core_exc.AzureError):
        return kinds.base(f"{what}: {type(exc).__name__}")
    return kinds.base(f"{what}: unexpected {type(exc).__name__}")


@contextlib.contextmanager
def translated(kinds: ErrorKinds, *, what: str) -> Iterator[None]:
    """Run SDK calls; re-raise their failures as scalebus errors with the cause chained."""
    try:
        yield
    except errors.ScalebusError:
        raise
    except (core_exc.AzureError, OSError, TimeoutError) as exc:
        raise to_scalebus(exc, kinds, what=what) from exc


def _status(exc: core_exc.AzureError) -> str:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _code(exc: core_exc.HttpResponseError) -> str:
    return str(getattr(exc, "error_code", None) or getattr(exc, "reason", "") or "")


QUEUE = ErrorKinds(errors.QueueError, errors.TransientQueueError, errors.QueueNotFoundError)
SCALE_SET = ErrorKinds(errors.ScaleSetError, errors.TransientScaleSetError, errors.InstanceNotFoundError)
STORAGE = ErrorKinds(errors.StorageError, errors.TransientStorageError, errors.ObjectNotFoundError)
