"""How long to hold back after failures that are not the job's fault (pure: it never sleeps).

A storage outage or a full scratch disk fails every job the same way, on every worker. Abandoning at once and
taking the next message would spend each job's delivery count in seconds and empty the queue into the dead-letter
queue. Two delays answer it, both doubling from ``base_s`` up to ``cap_s``:

* **The message** is given back with ``JobQueue.release_later``, hidden for :func:`release_delay` of its own
  ``released`` count, and the release does not spend its delivery count. An outage of N seconds then costs each
  job about log2(N / base_s) + 1 releases and none of its deliveries. A job released :data:`MAX_RELEASES` times is
  abandoned like any other failure (so a job that always looks like an outage still ends in the dead-letter
  queue, after its max delivery count).
* **The worker** waits :class:`Backoff` before it takes the next message, counted over consecutive environment
  failures and reset by any other outcome, so a fleet stops hammering a store that is down.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_RELEASES = 12
"""Releases after which an environment failure is abandoned (and counts a delivery): with a 60 s cap that is
about ten minutes of outage per job before its own budget starts to be spent."""


def release_delay(released: int, *, cap_s: float, base_s: float = 1.0) -> float:
    """Seconds to hide a job released ``released`` times before (0, 1, ...) before it is delivered again."""
    return min(cap_s, base_s * 2.0 ** min(max(released, 0), 62))


def releasable(released: int) -> bool:
    """Whether a job released ``released`` times may be released once more, rather than abandoned."""
    return released < MAX_RELEASES


@dataclass(slots=True)
class Backoff:
    """Consecutive environment failures and the delay each one earns (``cap_s`` of 0: no delay)."""

    cap_s: float
    base_s: float = 1.0
    failures: int = 0

    def after(self, *, environment: bool) -> float:
        """Record one job's outcome; the seconds to hold back before the next one."""
        if not environment:
            self.failures = 0
            return 0.0
        self.failures += 1
        return min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 62))
