"""Acting on scheduled events: a Spot eviction (``Preempt``) or a deletion (``Terminate``) ends this instance.

A Spot VM gets about 30 s of notice. A worker that ignores it dies with its message locked, and the job waits
out the lock (up to 5 minutes on Service Bus) before anyone else may take it. So on such a notice the worker
takes no new work and, unless the running job is sure to end before the VM goes, stops the analytics and
**abandons** the message at once: another worker receives it immediately, nothing partial is published. Once
no job is held it acknowledges the event (when it names this instance alone: an acknowledgement lets the event
start for every instance it names) so the eviction need not wait for ``not_before``, and exits without deleting
itself: the platform is deleting it. ``Reboot``, ``Redeploy`` and ``Freeze`` leave the instance alive, so they
are only logged.

:func:`decide` is the whole policy, pure (notices, the time, the job in, a decision out); :class:`EvictionWatch`
is the thin loop that polls the ``NoticeSource``, logs each notice once and hands decisions to the worker.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from scalebus import errors
from scalebus.backends import base

log = structlog.get_logger(__name__)

SETTLE_MARGIN_S = 10.0
"""Time kept, after the analytics' latest possible end, to publish the outputs and settle the message."""


@dataclass(frozen=True, slots=True)
class RunningJob:
    """The job this worker holds, as far as the eviction policy cares."""

    job_id: str
    ends_by: float = math.inf
    """The latest time the analytics can still be running (its start plus its timeout), epoch seconds;
    infinite while it has not started (staging takes as long as it takes)."""


@dataclass(frozen=True, slots=True)
class EvictionDecision:
    eviction: base.Notice | None = None
    """The notice that ends this instance soonest, if any: take no new work, and exit once the job is done."""
    release_job: bool = False
    """Stop the analytics and abandon the message now: the job cannot end before the instance does."""
    acknowledge: tuple[str, ...] = ()
    """Events to approve now (nothing held any more, and they name this instance alone)."""


def decide(
    notices: Sequence[base.Notice],
    *,
    now: float,
    job: RunningJob | None,
    acknowledge: bool,
    acknowledged: frozenset[str] = frozenset(),
) -> EvictionDecision:
    """What to do about the current notices. ``acknowledged``: event ids already approved by this worker."""
    losing = [n for n in notices if n.kind in base.INSTANCE_LOSING_NOTICES]
    if not losing:
        return EvictionDecision()
    eviction = min(losing, key=lambda n: starts_at(n, now))
    release = job is not None and job.ends_by + SETTLE_MARGIN_S > starts_at(eviction, now)
    ack: tuple[str, ...] = ()
    if acknowledge and job is None:
        ack = tuple(
            n.event_id
            for n in losing
            if not n.started and not n.others_affected and n.event_id and n.event_id not in acknowledged
        )
    return EvictionDecision(eviction=eviction, release_job=release, acknowledge=ack)


def starts_at(notice: base.Notice, now: float) -> float:
    """When the event may start: its ``not_before``, or now if it has started or gave no time."""
    if notice.started or notice.not_before is None:
        return now
    return notice.not_before


class EvictionWatch:
    """Polls ``source`` every ``poll_s`` in a daemon thread; calls ``on_decision`` whenever a notice that ends
    this instance is pending. ``job`` reports the job held right now (called from the watch thread)."""

    def __init__(
        self,
        source: base.NoticeSource,
        *,
        instance_id: str,
        poll_s: float,
        acknowledge: bool,
        job: Callable[[], RunningJob | None],
        on_decision: Callable[[EvictionDecision], None],
    ) -> None:
        self._source = source
        self._instance_id = instance_id
        self._poll_s = poll_s
        self._acknowledge = acknowledge
        self._job = job
        self._on_decision = on_decision
        self._seen: set[str] = set()
        self._acknowledged: set[str] = set()
        self._last: list[base.Notice] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        """Polls that failed (the source unreachable or refusing); each is logged and the next poll retries."""

    def start(self) -> None:
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="eviction-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self._poll_s))

    def check(self) -> EvictionDecision:
        """One poll: read the notices, log new ones, decide, and hand over a decision that matters."""
        try:
            notices = self._source.pending()
        except errors.BackendError as exc:
            self.failures += 1
            log.warning("scheduled_events_read_failed", instance_id=self._instance_id, error=str(exc))
            notices = self._last  # an eviction already seen stays in force
        self._last = notices
        self._log_new(notices)
        decision = decide(
            notices,
            now=time.time(),
            job=self._job(),
            acknowledge=self._acknowledge,
            acknowledged=frozenset(self._acknowledged),
        )
        if decision.eviction is not None:
            self._on_decision(decision)
        return decision

    def acknowledge_released(self) -> None:
        """The worker holds no job any more: approve the eviction so it need not wait for ``not_before``."""
        decision = decide(
            self._last,
            now=time.time(),
            job=None,
            acknowledge=self._acknowledge,
            acknowledged=frozenset(self._acknowledged),
        )
        for event_id in decision.acknowledge:
            try:
                self._source.acknowledge(event_id)
            except errors.BackendError as exc:
                log.warning(
                    "eviction_acknowledge_failed", instance_id=self._instance_id, event_id=event_id, error=str(exc)
                )
                continue
            self._acknowledged.add(event_id)
            log.info("eviction_acknowledged", instance_id=self._instance_id, event_id=event_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self._poll_s)

    def _log_new(self, notices: Sequence[base.Notice]) -> None:
        now = time.time()
        for notice in notices:
            if notice.event_id in self._seen:
                continue
            self._seen.add(notice.event_id)
            fields = {
                "instance_id": self._instance_id,
                "event_id": notice.event_id,
                "kind": notice.kind.value,
                "seconds_left": round(starts_at(notice, now) - now, 1),
                "started": notice.started,
            }
            if notice.kind in base.INSTANCE_LOSING_NOTICES:
                log.warning("eviction_notice", **fields)
            else:
                log.info("scheduled_event_notice", **fields)
