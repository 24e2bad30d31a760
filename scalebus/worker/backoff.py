"""How long the worker holds back after failures that are not the job's fault (pure: it never sleeps).

A storage outage or a full scratch disk fails every job the same way, on every worker. Abandoning at once and
taking the next message would spend each job's delivery count in seconds and empty the queue into the dead-letter
queue. So after each consecutive environment failure the worker holds the message (its lock renewed) for a delay
that doubles from ``base_s`` up to ``cap_s``, then lets it go; any other outcome resets the count. A fleet-wide
outage of N seconds then costs each worker about log2(N / base_s) deliveries, not N / (job start-up time).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Consecutive environment failures and the delay each one earns (``cap_s`` of 0: no delay)."""

    cap_s: float
    base_s: float = 1.0
    failures: int = 0

    def after(self, *, environment: bool) -> float:
        """Record one job's outcome; the seconds to hold its message before letting it go."""
        if not environment:
            self.failures = 0
            return 0.0
        self.failures += 1
        return min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 62))
