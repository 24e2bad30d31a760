"""The small parts every transfer shares: a bandwidth throttle, progress counting, a first-failure thread pool.

Staging, publishing and ingest all move many files on bounded threads under one bandwidth cap and report
progress the same way, so these live once here. Nothing in this module knows about plans, manifests or stores.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from scalebus.backends import base

PROGRESS_INTERVAL_S = 0.2
"""``on_progress`` is called at most this often (plus once at the end)."""

Resolver = Callable[[str], base.ObjectStore]
"""The store that serves a URI. Staging helper processes get it pickled, so it must be picklable to use them."""
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StageStats:
    """What one staging (in or out) did. ``already_published``: publish found the marker and did nothing.

    ``cpu_s`` is the CPU time (user + system) the whole process used meanwhile, plus that of its helper
    processes: the client cost of the transfer when nothing else runs in the process (``scalebus stage``), an
    upper bound for it in a worker. ``processes``: how many processes downloaded (``staging.processes``).
    """

    files: int
    bytes: int
    skipped_files: int
    skipped_bytes: int
    seconds: float
    already_published: bool = False
    cpu_s: float = 0.0
    processes: int = 1
    cached_files: int = 0
    """Files placed from the VM's input cache instead of downloaded (:class:`InputCache`; counted in ``files``)."""
    cached_bytes: int = 0
    first_byte_s: float | None = None
    """Seconds from the start of the staging to the first byte written (``None``: nothing was fetched)."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``-o json`` and log events."""
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 3), "files_per_s": round(self.files_per_s, 3)}


@dataclass(frozen=True, slots=True)
class Progress:
    """Work done so far, counting only files that need transferring (skipped files are not in the totals)."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float
    totals_final: bool = True
    """Whether the totals are complete. A staging plans while it lists, so its totals grow until the listing
    ends: until then ``files_done == files_total`` does not mean finished."""


class InputCache(Protocol):
    """Verified input files kept on this VM's disk between jobs, keyed by (URI, etag, size)
    (:mod:`scalebus.transfer.cache`). Staging asks it before fetching a file, offers it every file it fetched."""

    def place(self, obj: base.RemoteObject, target: Path) -> bool:
        """Put a verified copy of ``obj`` at ``target`` (a link or a copy; ``target``'s directory exists);
        ``False`` if the cache has none (then nothing is at ``target``). Never serves a stale or partial file."""

    def keep(self, obj: base.RemoteObject, path: Path) -> None:
        """Offer the file just verified and renamed into place at ``path`` to the cache. Never raises: a cache
        that cannot take it (full disk, another file system) only logs."""


OnProgress = Callable[[Progress], None]
"""What a transfer calls with its progress (at most every :data:`PROGRESS_INTERVAL_S`, and once at the end)."""


class ProgressTracker:
    """Counts files and bytes done from many threads; calls ``callback`` at most every ``PROGRESS_INTERVAL_S``
    (and once at ``finish``)."""

    def __init__(self, files_total: int, bytes_total: int, started: float, callback: OnProgress | None) -> None:
        self._files_total = files_total
        self._bytes_total = bytes_total
        self._started = started
        self._callback = callback
        self._lock = threading.Lock()
        self._files = 0
        self._bytes = 0
        self._reported_at = 0.0
        self._totals_final = True

    def add(self, *, files: int, nbytes: int) -> None:
        with self._lock:
            self._files += files
            self._bytes += nbytes
            if self._callback is None:
                return
            now = time.monotonic()
            if now - self._reported_at < PROGRESS_INTERVAL_S:
                return
            self._reported_at = now
            snapshot = self._snapshot(now)
        self._callback(snapshot)

    def add_total(self, *, files: int, nbytes: int) -> None:
        """More work planned: a staging that plans while it lists grows its totals as pages arrive (the
        snapshots say their totals are not final until :meth:`totals_complete`)."""
        with self._lock:
            self._totals_final = False
            self._files_total += files
            self._bytes_total += nbytes

    def totals_complete(self) -> None:
        """The listing has ended: the totals grow no more."""
        with self._lock:
            self._totals_final = True

    def finish(self) -> None:
        with self._lock:
            self._totals_final = True
        if self._callback is not None:
            with self._lock:
                snapshot = self._snapshot(time.monotonic())
            self._callback(snapshot)

    def _snapshot(self, now: float) -> Progress:
        return Progress(
            self._files, self._files_total, self._bytes, self._bytes_total, now - self._started, self._totals_final
        )


class Throttle:
    """A shared bandwidth cap: each read reserves its bytes on a timeline advancing at ``rate`` bytes/s (0: no
    cap)."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self._rate = float(rate_bytes_per_s)
        self._lock = threading.Lock()
        self._next = 0.0  # when the booked bytes end: the past (nothing booked yet)

    @property
    def rate_bytes_per_s(self) -> float:
        return self._rate

    def set_rate(self, rate_bytes_per_s: int) -> None:
        with self._lock:
            self._rate = float(rate_bytes_per_s)

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit under the cap."""
        if self._rate <= 0 or nbytes <= 0:
            return
        with self._lock:
            wait_s = self.reserve(nbytes, now=time.monotonic())
        if wait_s > 0:
            time.sleep(wait_s)

    def reserve(self, nbytes: int, *, now: float) -> float:
        """Book ``nbytes`` on the timeline; the seconds to wait before reading them (callers hold no lock)."""
        if self._rate <= 0 or nbytes <= 0:
            return 0.0
        start = max(now, self._next)
        self._next = start + nbytes / self._rate
        return start - now


def run_parallel(
    fn: Callable[[T], None],
    items: Iterable[T],
    *,
    max_workers: int,
    threads_allowed: Callable[[], int] | None = None,
    check: Callable[[], None] | None = None,
    name: str | None = None,
    park_s: float | None = None,
) -> None:
    """Run ``fn`` over ``items`` on at most ``max_workers`` threads (this one among them); stop at and re-raise
    the first failure (calls in flight finish).

    ``items`` is read lazily, under a lock, as threads free up, so it may be a generator that prepares work as it
    goes (its errors fail the run like ``fn``'s). Before taking each item a thread ends if its index has reached
    ``threads_allowed()`` (the run continues on fewer threads), and ``check()`` may raise to fail the run. With
    ``park_s``, such a thread waits instead (re-checking every ``park_s`` seconds) and resumes if the limit
    rises; it ends with the run.
    """
    n_threads = max(1, min(max_workers, len(items))) if isinstance(items, Sized) else max(1, max_workers)
    pool = _FirstFailurePool(fn, iter(items), threads_allowed=threads_allowed, check=check, park_s=park_s)
    names = [None if name is None else f"{name}-{i}" for i in range(1, n_threads)]
    threads = [thread_in_context(pool.work, i, name=n) for i, n in enumerate(names, start=1)]
    for thread in threads:
        thread.start()
    pool.work(0)
    for thread in threads:
        thread.join()
    if pool.failure is not None:
        raise pool.failure


class _FirstFailurePool:
    """The loop each thread of :func:`run_parallel` runs, and the first failure any of them met."""

    def __init__(
        self,
        fn: Callable[[T], None],
        items: Iterable[T],
        *,
        threads_allowed: Callable[[], int] | None,
        check: Callable[[], None] | None,
        park_s: float | None = None,
    ) -> None:
        self._fn: Callable[[Any], None] = fn
        self._items = iter(items)
        self._threads_allowed = threads_allowed
        self._check = check
        self._park_s = park_s
        self._lock = threading.Lock()
        self._parked = threading.Condition(self._lock)
        self._exhausted = False
        self.failure: BaseException | None = None

    def work(self, index: int) -> None:
        while (item := self._next(index)) is not _END:
            try:
                self._fn(item)
            except BaseException as exc:
                with self._lock:
                    if self.failure is None:
                        self.failure = exc
                    self._parked.notify_all()
                return

    def _next(self, index: int) -> Any:
        """The next item for thread ``index``, or :data:`_END` when it should stop."""
        with self._lock:
            while self._threads_allowed is not None and index >= self._threads_allowed():
                if self._park_s is None or self.failure is not None or self._exhausted:
                    return _END
                self._parked.wait(self._park_s)
            if self.failure is not None or self._exhausted:
                return _END
            try:
                if self._check is not None:
                    self._check()
                item = next(self._items, _END)
            except BaseException as exc:
                self.failure = exc
                item = _END
            if item is _END:
                self._exhausted = True
                self._parked.notify_all()
            return item


_END: Any = object()


def thread_in_context(target: Callable[..., None], *args: object, name: str | None = None) -> threading.Thread:
    """A daemon thread that runs with a copy of the caller's context, so its log lines carry the job's bound
    ``job_id`` / ``message_id`` / ``instance_id`` (a new thread otherwise starts with an empty context)."""
    context = contextvars.copy_context()
    return threading.Thread(target=context.run, args=(target, *args), name=name, daemon=True)
