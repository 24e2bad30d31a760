"""A thread-safe time-to-live cache for one value: how depth sources stay inside a service's read budget.

Service Bus throttles its admin API (KEDA was throttled for polling it, kedacore/keda#5227) and Monitor counts
queries; a controller, a status command and tests may all ask at once. Each source keeps one of these.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TtlCache(Generic[T]):
    """Holds the last value ``load`` returned for ``ttl_s`` seconds; concurrent callers share one load."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: tuple[float, T] | None = None

    def get(self, load: Callable[[], T]) -> T:
        with self._lock:
            now = self._clock()
            if self._value is not None and now - self._value[0] < self._ttl_s:
                return self._value[1]
            value = load()
            self._value = (now, value)
            return value
