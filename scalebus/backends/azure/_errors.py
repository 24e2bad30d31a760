"""Translate azure-core / SDK exceptions into scalebus errors.

Adapters wrap every SDK call in :func:`translated` so nothing from ``azure.*`` leaks past a port. Whether an
error is transient follows from the HTTP status or the exception type, never from a message string. Messages
carry the status and error code only: SDK messages can quote URLs with SAS tokens, so they are not copied.

``azure.core`` is imported only once an SDK has imported it: the lean blob path (:mod:`._blobget`) uses this module
without any SDK, and importing azure-core costs a one-shot ``scalebus stage`` about a tenth of a second.
"""

from __future__ import annotations

import contextlib
import email.utils
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scalebus import errors

if TYPE_CHECKING:
    from azure.core import exceptions as core_exc


@dataclass(frozen=True, slots=True)
class ErrorKinds:
    """Which scalebus types one service maps to."""

    base: type[errors.BackendError]
    transient: type[errors.TransientBackendError]
    not_found: type[errors.BackendError]
    also_transient: frozenset[int] = frozenset()
    """Statuses this service answers for a passing state on top of the shared set (ARM's 409 Conflict)."""


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
    from azure.core import exceptions as core_exc

    if isinstance(exc, core_exc.ResourceNotFoundError):
        return kinds.not_found(f"{what}: not found")
    if isinstance(exc, core_exc.ClientAuthenticationError):
        return kinds.base(f"{what}: authentication failed ({_status(exc)}); check the identity and its roles")
    if isinstance(exc, core_exc.HttpResponseError):
        status = exc.status_code or 0
        if status in errors.TRANSIENT_HTTP_STATUS or status in kinds.also_transient:
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
    except (OSError, TimeoutError) as exc:
        raise to_scalebus(exc, kinds, what=what) from exc
    except Exception as exc:
        if not _is_azure_error(exc):
            raise
        raise to_scalebus(exc, kinds, what=what) from exc


def _is_azure_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``azure.core`` error; without azure-core imported, nothing can have raised one."""
    core = sys.modules.get("azure.core.exceptions")
    return core is not None and isinstance(exc, core.AzureError)


def _status(exc: core_exc.AzureError) -> str:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _code(exc: core_exc.HttpResponseError) -> str:
    """The service's error code (``AuthorizationFailed``, ``Conflict``); azure-mgmt-compute 39 leaves
    ``error_code`` unset and parses the code into ``error.code`` only."""
    parsed = getattr(getattr(exc, "error", None), "code", None)
    return str(getattr(exc, "error_code", None) or parsed or getattr(exc, "reason", "") or "")


QUEUE = ErrorKinds(errors.QueueError, errors.TransientQueueError, errors.QueueNotFoundError)
# ARM answers 409 while another operation holds the scale set or the instance is being deleted ("conflict with a
# concurrent request", "marked for deletion"): both pass once that operation ends.
SCALE_SET = ErrorKinds(
    errors.ScaleSetError, errors.TransientScaleSetError, errors.InstanceNotFoundError, frozenset({409})
)
STORAGE = ErrorKinds(errors.StorageError, errors.TransientStorageError, errors.ObjectNotFoundError)
SECRETS = ErrorKinds(errors.SecretError, errors.TransientSecretError, errors.SecretNotFoundError)


def disabled_secret(exc: BaseException) -> bool:
    """Key Vault answers 403 ``Forbidden`` with inner code ``SecretDisabled`` for a disabled secret: to the
    worker that is a missing secret, not an access problem."""
    from azure.core import exceptions as core_exc

    if not isinstance(exc, core_exc.HttpResponseError) or exc.status_code != 403:
        return False
    inner = getattr(getattr(exc, "error", None), "innererror", None) or {}
    return isinstance(inner, dict) and inner.get("code") == "SecretDisabled"
