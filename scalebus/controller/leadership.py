"""One controller of many acts: this one's hold on the controllers' lease, and whether it may write right now.

The controller loop asks :meth:`Leadership.lead` before each round: it acquires the lease when nobody holds it
and says whether this controller leads. While it leads, a background thread renews the lease every quarter of
its duration, whatever a round is doing (an ARM listing can take many seconds). This controller counts its lease
from *before* each acquire or renewal was sent (the service started counting later) and stops acting two thirds
of a duration after that: the last third is the margin for clock rates and for a write that passed the check to
reach the service. A renewal that fails with a transient error leaves the lease to run out on that count and the
thread keeps trying; one that finds the lease taken (``LeaseLostError``) ends this tenure, and :meth:`lead`
tries to acquire again each poll, as a standby does.

:meth:`Leadership.still_leader` is the fence: the step calls it right before every capacity write, deletion and
protection write, from whichever thread makes the call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from scalebus import errors
from scalebus.backends import base

log = structlog.get_logger(__name__)

RENEW_FRACTION = 0.25
"""Renew after this share of the lease's duration."""
ACT_FRACTION = 2 / 3
"""Act for at most this share of the duration after the last acquire or renewal was sent."""


class Leadership:
    """This controller's tenure on ``lease`` as ``holder``. Thread-safe; :meth:`close` releases what it holds."""

    def __init__(self, lease: base.Lease, *, holder: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease = lease
        self._holder = holder
        self._clock = clock
        self._lock = threading.Lock()
        self._grant: base.LeaseGrant | None = None
        self._valid_until = 0.0
        self._suspended = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self._holder

    @property
    def token(self) -> int | None:
        """The fencing token of the tenure held now (valid or not), ``None`` while standing by."""
        with self._lock:
            return None if self._grant is None else self._grant.token

    def still_leader(self) -> bool:
        """Whether this controller holds the lease and may act: checked right before each write."""
        with self._lock:
            return self._grant is not None and self._clock() < self._valid_until

    def lead(self) -> bool:
        """Whether this controller leads for the round about to run; acquires the lease when it holds none."""
        if self.still_leader():
            return True
        with self._lock:
            held = self._grant is not None
        if held:  # renewals late or failing: stop acting until one lands (or the lease is found taken)
            if not self._suspended:
                self._suspended = True
                log.warning("leadership_suspended", holder=self._holder, token=self.token)
            return False
        return self._acquire()

    def renew_now(self) -> None:
        """One renewal attempt (what the background thread does every quarter of the lease)."""
        with self._lock:
            grant = self._grant
        if grant is None:
            return
        sent = self._clock()
        try:
            self._lease.renew(grant)
        except errors.LeaseLostError as exc:
            with self._lock:
                if self._grant is grant:
                    self._grant, self._valid_until = None, 0.0
            log.warning("leadership_lost", holder=self._holder, token=grant.token, error=str(exc))
            return
        except errors.BackendError as exc:
            log.warning("lease_renew_failed", holder=self._holder, error=str(exc), transient=exc.transient)
            return
        with self._lock:
            if self._grant is grant:
                self._valid_until = sent + ACT_FRACTION * self._lease.duration_s
        if self._suspended:
            self._suspended = False
            log.info("leadership_resumed", holder=self._holder, token=grant.token)

    def close(self) -> None:
        """Stop renewing and release the lease, so a standby takes over at once; safe to call twice."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self._lease.duration_s)
            self._renewer = None
        with self._lock:
            grant, self._grant, self._valid_until = self._grant, None, 0.0
        if grant is None:
            return
        try:
            self._lease.release(grant)
        except errors.BackendError as exc:  # it runs out on its own
            log.warning("lease_release_failed", holder=self._holder, error=str(exc))
            return
        log.info("leadership_released", holder=self._holder, token=grant.token)

    def _acquire(self) -> bool:
        sent = self._clock()
        try:
            grant = self._lease.acquire(self._holder)
        except errors.BackendError as exc:
            log.warning("lease_acquire_failed", holder=self._holder, error=str(exc), transient=exc.transient)
            return False
        if grant is None:
            return False
        with self._lock:
            self._grant = grant
            self._valid_until = sent + ACT_FRACTION * self._lease.duration_s
        self._suspended = False
        log.info("leadership_acquired", holder=self._holder, token=grant.token)
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_forever, name="scalebus-lease", daemon=True)
            self._renewer.start()
        return True

    def _renew_forever(self) -> None:
        while not self._stop.wait(RENEW_FRACTION * self._lease.duration_s):
            self.renew_now()
