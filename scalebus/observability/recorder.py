"""The seams the controller and worker loops report through, their no-op default, and the pure parts behind them.

The loops take a recorder in their constructor (default: one that records nothing) and call it a few times per
round or job; they never see ``prometheus_client``. Two things here are decisions, so they are pure and tested
with plain values: which bounded label a free-text policy reason or a dead-letter reason gets (a label with
unbounded values is a new time series per value: https://prometheus.io/docs/practices/naming/#labels), and
whether a loop is alive (:class:`Health`, clock passed in).
"""

from __future__ import annotations

import enum
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from scalebus import errors
from scalebus.backends import base

# --------------------------------------------------------------------------------------------- shapes read


class InstanceLike(Protocol):
    @property
    def state(self) -> base.InstanceState: ...


class ObservationLike(Protocol):
    """What a controller round saw (``controller.policy.Observation`` fits)."""

    @property
    def depth(self) -> base.DepthSample: ...

    @property
    def capacity(self) -> int: ...

    @property
    def now(self) -> float: ...

    @property
    def instances(self) -> Sequence[InstanceLike]: ...


class DecisionLike(Protocol):
    """What a controller round decided (``controller.policy.Decision`` fits)."""

    @property
    def capacity(self) -> int | None: ...

    @property
    def delete(self) -> tuple[str, ...]: ...

    @property
    def reason(self) -> str: ...

    @property
    def demand(self) -> int: ...


# --------------------------------------------------------------------------------------------- recorders


class ControllerMetrics(Protocol):
    """What the controller loop reports: each round, done or failed, and how long until the next."""

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None: ...

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None: ...

    def standing_by(self, *, next_in_s: float) -> None:
        """A standby controller (another holds the lease) checked the lease and waits ``next_in_s``: alive."""


class WorkerMetrics(Protocol):
    """What the worker loop and its job path report."""

    def loop_tick(self, *, next_in_s: float) -> None:
        """The receive loop is about to wait up to ``next_in_s`` for a message."""

    def job_received(self, message: base.ReceivedMessage) -> None: ...

    def job_settled(self, *, verdict: str, reason: str, cause: str, seconds: float) -> None:
        """A received message was settled (``verdict``: complete, dead_letter, abandon, let_go, given_back)."""

    def job_staged(self, *, files: int, size_bytes: int, seconds: float) -> None: ...

    def job_ran(self, *, seconds: float) -> None: ...


class NullControllerMetrics:
    """Records nothing: the default, and what the simulator and tests use."""

    def round_done(self, obs: ObservationLike, decision: DecisionLike, *, next_in_s: float) -> None:
        return None

    def round_failed(self, exc: errors.BackendError, *, next_in_s: float) -> None:
        return None

    def standing_by(self, *, next_in_s: float) -> None:
        return None


class NullWorkerMetrics:
    """Records nothing: the default."""

    def loop_tick(self, *, next_in_s: float) -> None:
        return None

    def job_received(self, message: base.ReceivedMessage) -> None:
        return None

    def job_settled(self, *, verdict: str, reason: str, cause: str, seconds: float) -> None:
        return None

    def job_staged(self, *, files: int, size_bytes: int, seconds: float) -> None:
        return None

    def job_ran(self, *, seconds: float) -> None:
        return None


NO_CONTROLLER_METRICS = NullControllerMetrics()
NO_WORKER_METRICS = NullWorkerMetrics()

# --------------------------------------------------------------------------------------------- bounded labels


class DecisionReason(enum.StrEnum):
    """Why a round wrote what it wrote, or nothing: ``reason`` of ``scalebus_controller_decisions_total``."""

    SCALE_OUT = "scale_out"
    DELETE = "delete"
    SATISFIED = "satisfied"
    AT_MAX = "at_max"
    CONFIRMING = "confirming"
    BOOT_BACKOFF = "boot_backoff"
    WRITE_IN_FLIGHT = "write_in_flight"
    WRITE_BUDGET = "write_budget"
    OTHER = "other"


_REASON_MARKS = (
    ("backing off scale-out", DecisionReason.BOOT_BACKOFF),
    ("still running", DecisionReason.WRITE_IN_FLIGHT),
    ("write budget", DecisionReason.WRITE_BUDGET),
    ("to confirm", DecisionReason.CONFIRMING),
    ("at max_instances", DecisionReason.AT_MAX),
    ("already provisioned", DecisionReason.SATISFIED),
)
"""Phrases of the policy's reason sentence (its first clause: deletions are appended after ``;``)."""


def classify_decision(decision: DecisionLike) -> DecisionReason:
    """The bounded reason of one round's decision: a write wins, then named deletions, then the sentence."""
    if decision.capacity is not None:
        return DecisionReason.SCALE_OUT
    if decision.delete:
        return DecisionReason.DELETE
    head = decision.reason.partition(";")[0]
    for phrase, reason in _REASON_MARKS:
        if phrase in head:
            return reason
    return DecisionReason.OTHER


_REASON_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,47}")


class LabelBound:
    """Keeps a label's values few: identifier-shaped values pass until ``limit`` distinct ones were seen, the rest
    become ``other``. Dead-letter reasons are CamelCase names our code chooses (``InvalidJson``,
    ``SecretNotFound``...), but the queue or a future backend could bring others."""

    def __init__(self, limit: int = 32) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not _REASON_SHAPE.fullmatch(value):
            return "other" if value else ""
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return "other"
            self._seen.add(value)
            return value


ERROR_KINDS = ("access_denied", "transient", "permanent", "other")


def error_kind(exc: BaseException) -> str:
    """A failed port call's ``kind`` label: what an operator does about it differs by these."""
    if isinstance(exc, errors.AccessDeniedError):
        return "access_denied"
    if isinstance(exc, errors.TransientBackendError):
        return "transient"
    if isinstance(exc, errors.PermanentBackendError):
        return "permanent"
    return "other"


# --------------------------------------------------------------------------------------------- health


class Health:
    """Whether a loop is alive (``/healthz``) and ready (``/readyz``).

    A loop ticks before each wait and says how long the wait may be; it is alive while the clock has not passed
    that wait plus ``stall_s`` (the round's own work: ARM calls, retries). While it holds a job (:meth:`hold`)
    it is alive until its next tick: a job is bounded by its own timeout and lock. Start-up counts as a tick.
    """

    def __init__(self, *, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stall_s = stall_s
        self._clock = clock
        self._lock = threading.Lock()
        self._deadline = clock() + stall_s
        self._held = False
        self._ready = False

    def tick(self, *, next_in_s: float) -> None:
        with self._lock:
            self._deadline = self._clock() + max(0.0, next_in_s) + self._stall_s
            self._held = False

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def mark_ready(self) -> None:
        with self._lock:
            self._ready = True

    def live(self) -> tuple[bool, str]:
        with self._lock:
            late = self._clock() - self._deadline
            if self._held or late <= 0:
                return True, "ok"
            return False, f"the loop has not ticked for {late + self._stall_s:.0f} s past its announced wait"

    def ready(self) -> tuple[bool, str]:
        alive, why = self.live()
        if not alive:
            return False, why
        with self._lock:
            return (True, "ok") if self._ready else (False, "starting: the first round is not done")
