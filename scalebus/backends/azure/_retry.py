"""Every tenacity policy in scalebus, each named for its intent.

Policies retry only :class:`~scalebus.errors.TransientBackendError` (so SDK calls must be wrapped in
``_errors.translated`` first), never wait less than a server's ``Retry-After``, and give up at a deadline so
callers above (the controller loop, systemd) decide what happens next. The deadline is checked *before* each
sleep: a wait that would end past it (a ``Retry-After`` longer than the budget left) stops at once with the last
transient error instead of sleeping. Nothing outside ``backends/azure`` imports tenacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import tenacity
from tenacity import wait as tenacity_wait

from scalebus import errors

T = TypeVar("T")


class _WaitHonouringRetryAfter(tenacity_wait.wait_base):
    """Exponential back-off with jitter, but never sooner than the server's Retry-After."""

    def __init__(self, *, initial_s: float, max_s: float) -> None:
        self._backoff = tenacity.wait_exponential_jitter(multiplier=initial_s, max=max_s)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = float(self._backoff(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        retry_after = getattr(exc, "retry_after_s", None)
        return max(backoff, float(retry_after)) if retry_after is not None else backoff


def _policy(*, name: str, attempts: int, deadline_s: float, initial_s: float, max_s: float) -> Any:
    return tenacity.retry(
        retry=tenacity.retry_if_exception_type(errors.TransientBackendError),
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_before_delay(deadline_s),
        wait=_WaitHonouringRetryAfter(initial_s=initial_s, max_s=max_s),
        reraise=True,
        before_sleep=_count_retry(name),
    )


RETRY_COUNTS: dict[str, int] = {}
"""Retries per policy name since process start (read by metrics and tests)."""


def _count_retry(name: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(_state: tenacity.RetryCallState) -> None:
        RETRY_COUNTS[name] = RETRY_COUNTS.get(name, 0) + 1

    return before_sleep


def retry_control_plane_read(fn: Callable[..., T]) -> Callable[..., T]:
    """Reads of ARM / admin / metric endpoints: a few quick retries, the caller polls again anyway."""
    decorated: Callable[..., T] = _policy(
        name="control_plane_read", attempts=4, deadline_s=30.0, initial_s=0.5, max_s=8.0
    )(fn)
    return decorated


def retry_control_plane_write(fn: Callable[..., T]) -> Callable[..., T]:
    """ARM writes (capacity, deletes): patient, honouring 429 Retry-After, bounded by a deadline."""
    decorated: Callable[..., T] = _policy(
        name="control_plane_write", attempts=6, deadline_s=120.0, initial_s=1.0, max_s=30.0
    )(fn)
    return decorated


def retry_data_plane(fn: Callable[..., T]) -> Callable[..., T]:
    """Storage reads/writes of one file or range: timeouts, 500, 503 ServerBusy, resets."""
    decorated: Callable[..., T] = _policy(
        name="data_plane", attempts=6, deadline_s=120.0, initial_s=0.2, max_s=10.0
    )(fn)
    return decorated


def retry_messaging(fn: Callable[..., T]) -> Callable[..., T]:
    """Service Bus sends and settlements that failed transiently (never lock-lost: that is permanent)."""
    decorated: Callable[..., T] = _policy(name="messaging", attempts=5, deadline_s=60.0, initial_s=0.5, max_s=8.0)(
        fn
    )
    return decorated


def retry_long_running_poll(fn: Callable[..., T]) -> Callable[..., T]:
    """Waiting on an accepted ARM operation: a poll that fails transiently resumes polling (never re-sends the
    write). The deadline is long because the operation itself (VMs provisioning) can take many minutes."""
    decorated: Callable[..., T] = _policy(
        name="long_running_poll", attempts=8, deadline_s=1800.0, initial_s=1.0, max_s=30.0
    )(fn)
    return decorated


def retry_secret_read(fn: Callable[..., T]) -> Callable[..., T]:
    """One Key Vault secret GET: throttling (429, honouring Retry-After), 5xx, resets. Short, because a job waits
    on it and an abandoned job comes back anyway."""
    decorated: Callable[..., T] = _policy(
        name="secret_read", attempts=4, deadline_s=30.0, initial_s=0.5, max_s=8.0
    )(fn)
    return decorated


def retry_blob_get(fn: Callable[..., T]) -> Callable[..., T]:
    """One GET on the lean path, of a blob (or range) or of a List Blobs page: resets, bodies cut short, 500,
    503 ServerBusy (never sooner than its Retry-After). Each attempt re-sends the whole GET on a fresh connection,
    from the sink's starting position."""
    decorated: Callable[..., T] = _policy(
        name="blob_get", attempts=6, deadline_s=120.0, initial_s=0.2, max_s=10.0
    )(fn)
    return decorated


def retry_instance_metadata(fn: Callable[..., T]) -> Callable[..., T]:
    """IMDS ``/metadata/instance`` (who am I): IMDS answers 410 for up to 70 s after a VM boots and asks for
    retries until then, so the deadline covers that window."""
    decorated: Callable[..., T] = _policy(
        name="instance_metadata", attempts=40, deadline_s=90.0, initial_s=0.5, max_s=5.0
    )(fn)
    return decorated


def retry_metadata_call(fn: Callable[..., T]) -> Callable[..., T]:
    """One IMDS scheduled-events GET or acknowledgement: IMDS throttles at 5 requests/s per VM and answers 5xx
    while busy. Short, because a Spot eviction gives 30 s in all and the worker polls again anyway."""
    decorated: Callable[..., T] = _policy(
        name="metadata_call", attempts=3, deadline_s=5.0, initial_s=0.2, max_s=1.0
    )(fn)
    return decorated
