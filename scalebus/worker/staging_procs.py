"""Staging on more than one core: the staging process and helper processes share one download plan.

Why: per small file the client spends about a millisecond of CPU, most of it Python holding the GIL (the HTTP
exchange, headers, bookkeeping), so one process tops out near 750 small files/s however many threads it runs; a
million index files would keep one core busy for over 20 minutes on a VM with 16. Large files do not need this:
socket reads, MD5 and disk writes release the GIL, and the threads of one process already use more than a core.

How: :func:`scalebus.worker.staging.stage_in` plans as always and cuts the fetch list into batches
(:func:`scalebus.worker.plan.batch_tasks`). Its own threads and the helper processes take batches from one
:class:`_Dispenser`: the staging process directly, helpers through a short queue that a feeder thread keeps
topped up, so whoever is faster takes more. Helpers are *spawned* (no locks or threads inherited mid-state),
rebuild their stores from the pickled resolver, and stream and verify each file exactly as the staging process
does. They only *report* finished files: the staging process alone appends them to the resume manifest and
counts progress, so a crash anywhere loses at most the unreported tail (fetched again on resume) and never
records a file that is not in place.

Failure: the first error anywhere (or ``cancel``) stops the dispenser and every process: reads in flight stop at
their next write, and the staging raises that error, with its type (transient or permanent) intact: errors
pickle with their type.
A helper that dies without reporting (killed, out of memory) is a ``StorageError``. Helpers ignore SIGINT (the
staging process stops them) and exit if the staging process dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from scalebus import errors, logs
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.worker import plan, staging

log = structlog.get_logger(__name__)

BATCHES_QUEUED_PER_HELPER = 2
"""Batches waiting for each helper: enough that a helper never waits for the feeder, few enough that the last
batches stay with whoever is free."""
REPORT_INTERVAL_S = 0.2
"""Helpers send their finished files at most this often (and once at the end)."""
STOP_GRACE_S = 60.0
"""After a failure or a cancel, how long helpers get to wind down (their reads stop at the next write) before
they are terminated."""
_POLL_S = 0.05

Batch = tuple[plan.FileTask, ...]


@dataclass(frozen=True, slots=True)
class _HelperSpec:
    """Everything a helper needs, sent once when it is spawned."""

    resolve: staging.Resolver
    sources: tuple[str, ...]
    dest: Path
    settings: StagingSettings
    log_config: logs.LogConfig | None
    log_context: dict[str, Any]
    """What the staging process bound (job_id, message_id, instance_id): helpers log with the same."""


class Team:
    """The staging process's side: spawn helpers, feed them, collect their reports, download its own share."""

    def __init__(
        self,
        resolve: staging.Resolver,
        sources: Sequence[str],
        dest: Path,
        settings: StagingSettings,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self._cancel = cancel
        context = structlog.contextvars.get_contextvars()
        self._spec = _HelperSpec(resolve, tuple(sources), dest, settings, logs.current(), context)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._dispenser = _Dispenser(())
        self._stop: Any = threading.Event()

    def run(
        self,
        stores: Sequence[base.ObjectStore],
        batches: Sequence[Batch],
        *,
        processes: int,
        manifest: staging.Manifest,
        progress: staging.ProgressTracker,
    ) -> float:
        """Download ``batches`` here and in ``processes - 1`` helpers; return the helpers' CPU seconds."""
        ctx = multiprocessing.get_context("spawn")
        n_helpers = processes - 1
        self._dispenser = _Dispenser(batches)
        tasks: Any = ctx.Queue(maxsize=BATCHES_QUEUED_PER_HELPER * n_helpers)
        results: Any = ctx.Queue()
        self._stop = ctx.Event()
        helpers = self._start_helpers(ctx, n_helpers, tasks, results)
        log.info("staging.helpers.started", helpers=n_helpers, pids=[h.pid for h in helpers], batches=len(batches))
        feeder = threading.Thread(target=_feed, args=(self._dispenser, tasks, n_helpers, self._stop), daemon=True)
        collector = _Collector(
            helpers, results, manifest=manifest, progress=progress, fail=self._fail, cancel=self._cancel
        )
        collecting = threading.Thread(target=collector.run, daemon=True)
        feeder.start()
        collecting.start()
        try:
            spec = self._spec
            own = staging.DownloadRun(
                stores=stores,
                dest=spec.dest,
                settings=spec.settings,
                manifest=manifest,
                progress=progress,
                should_stop=self._stopped,
            )
            own.execute(self._dispenser.tasks(), n_units=spec.settings.max_concurrency)
        except Exception as exc:
            self._fail(exc)
        except BaseException:
            self._fail(errors.StorageError("staging interrupted"))
            _terminate(helpers)
            raise
        finally:
            self._wait(collecting, helpers)
            feeder.join(STOP_GRACE_S)
            for q in (tasks, results):
                q.close()
                q.cancel_join_thread()
        if self._failure is not None:
            raise self._failure
        return collector.helpers_cpu_s

    def _start_helpers(
        self, ctx: multiprocessing.context.SpawnContext, n_helpers: int, tasks: Any, results: Any
    ) -> list[multiprocessing.process.BaseProcess]:
        helpers: list[multiprocessing.process.BaseProcess] = []
        try:
            for i in range(n_helpers):
                helper = ctx.Process(
                    target=helper_main,
                    args=(self._spec, tasks, results, self._stop),
                    name=f"scalebus-stage-{i + 1}",
                    daemon=True,
                )
                helper.start()
                helpers.append(helper)
        except Exception as exc:
            self._stop.set()
            _terminate(helpers)
            raise errors.StorageError(f"cannot start a staging helper process ({exc})") from exc
        return helpers

    def _stopped(self) -> bool:
        return self._stop.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _fail(self, exc: BaseException) -> None:
        """Remember the first failure and stop handing out work everywhere."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._dispenser.stop()
        self._stop.set()

    def _wait(self, collecting: threading.Thread, helpers: Sequence[multiprocessing.process.BaseProcess]) -> None:
        """Until every helper has reported its end. Helpers still working on their last batches (a large file can
        take long) are waited for; once stopped by a failure they get :data:`STOP_GRACE_S` to finish the reads
        in flight, then are terminated."""
        stopped_at: float | None = None
        while collecting.is_alive():
            collecting.join(_POLL_S * 4)
            if stopped_at is None and self._stop.is_set():
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE_S:
                self._fail(errors.StorageError(f"staging helpers did not stop within {STOP_GRACE_S:.0f} s"))
                _terminate(helpers)
                collecting.join(STOP_GRACE_S)
                return


class _Dispenser:
    """Hands out batches in plan order to whoever asks first; ``stop`` makes it hand out no more."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self._batches = iter(batches)
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def take(self) -> Batch | None:
        with self._lock:
            if self._stopped.is_set():
                return None
            return next(self._batches, None)

    def tasks(self) -> Iterator[plan.FileTask]:
        while (batch := self.take()) is not None:
            yield from batch

    def stop(self) -> None:
        self._stopped.set()


def _feed(dispenser: _Dispenser, tasks: Any, n_helpers: int, stop: Any) -> None:
    """Keep the helpers' queue topped up from the dispenser; one end-of-work marker per helper at the end."""
    while (batch := dispenser.take()) is not None:
        if not _put(tasks, batch, stop):
            return
    for _ in range(n_helpers):
        if not _put(tasks, None, stop):
            return


def _put(tasks: Any, item: Batch | None, stop: Any) -> bool:
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            tasks.put(item, timeout=_POLL_S * 2)
            return True
    return False


class _Collector:
    """Reads the helpers' reports: finished files into the manifest and the progress, failures and deaths to
    ``fail``; returns once every helper has exited."""

    def __init__(
        self,
        helpers: Sequence[multiprocessing.process.BaseProcess],
        results: Any,
        *,
        manifest: staging.Manifest,
        progress: staging.ProgressTracker,
        fail: Callable[[BaseException], None],
        cancel: threading.Event | None,
    ) -> None:
        self._cancel = cancel
        self._helpers = {h.pid: h for h in helpers}
        self._results = results
        self._manifest = manifest
        self._progress = progress
        self._fail = fail
        self._exited: set[int | None] = set()
        self.helpers_cpu_s = 0.0

    def run(self) -> None:
        while len(self._exited) < len(self._helpers):
            if self._cancel is not None and self._cancel.is_set():
                self._fail(errors.StagingCancelled("staging cancelled before its end"))
            try:
                message = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_deaths()
                continue
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            _, entries, files, nbytes = message
            for rel_path, etag, size in entries:
                self._manifest.record_entry(plan.ManifestEntry(rel_path, etag, size))
            self._progress.add(files=files, nbytes=nbytes)
        elif kind == "exit":
            _, pid, error, cpu_s = message
            self._exited.add(pid)
            self.helpers_cpu_s += cpu_s
            if error is not None:
                self._fail(error)

    def _check_deaths(self) -> None:
        for pid, helper in self._helpers.items():
            if pid in self._exited or helper.exitcode is None:
                continue
            # Its last report may still be in the pipe: read what is there before calling it dead.
            with contextlib.suppress(queue.Empty):
                while pid not in self._exited:
                    self._handle(self._results.get(timeout=0.5))
            if pid not in self._exited:
                self._exited.add(pid)
                self._fail(
                    errors.StorageError(
                        f"staging helper process {pid} ended without reporting (exit code {helper.exitcode}); "
                        "was it killed, or out of memory?"
                    )
                )


def _terminate(helpers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for helper in helpers:
        if helper.is_alive():
            helper.terminate()
    for helper in helpers:
        helper.join(5)


# --------------------------------------------------------------------------------------------- in a helper


def helper_main(spec: _HelperSpec, tasks: Any, results: Any, stop: Any) -> None:
    """A helper process: download batches from ``tasks`` until told to end, report to ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.log_config is not None:
        logs.configure(fmt=spec.log_config.fmt, level=spec.log_config.level)
    structlog.contextvars.bind_contextvars(**spec.log_context, staging_helper=os.getpid())
    cpu_started = time.process_time()
    reporter = _Reporter(results)
    error: BaseException | None = None
    stores: list[base.ObjectStore] = []
    try:
        stores = [spec.resolve(uri) for uri in spec.sources]
        run = staging.DownloadRun(
            stores=stores,
            dest=spec.dest,
            settings=spec.settings,
            manifest=reporter,
            progress=reporter,
            should_stop=stop.is_set,
        )
        run.execute(_queued_tasks(tasks, stop), n_units=spec.settings.max_concurrency)
    except BaseException as exc:
        error = exc
    for store in {id(store): store for store in stores}.values():
        with contextlib.suppress(Exception):
            store.close()
    reporter.close()
    results.put(("exit", os.getpid(), _portable(error), time.process_time() - cpu_started))
    results.close()
    results.join_thread()


def _queued_tasks(tasks: Any, stop: Any) -> Iterator[plan.FileTask]:
    while not stop.is_set():
        try:
            batch = tasks.get(timeout=_POLL_S * 2)
        except queue.Empty:
            continue
        if batch is None:
            return
        yield from batch


class _Reporter:
    """A helper's manifest and progress: collects finished files and counts, sends them every
    :data:`REPORT_INTERVAL_S`; ends the process if the staging process is gone."""

    def __init__(self, results: Any) -> None:
        self._results = results
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str, int]] = []
        self._files = 0
        self._bytes = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage-report", daemon=True)
        self._thread.start()

    def record(self, task: plan.FileTask) -> None:
        with self._lock:
            self._entries.append((task.rel_dest, task.obj.etag, task.size))

    def add(self, *, files: int, nbytes: int) -> None:
        with self._lock:
            self._files += files
            self._bytes += nbytes

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._flush()

    def _run(self) -> None:
        parent = multiprocessing.parent_process()
        while not self._closed.wait(REPORT_INTERVAL_S):
            if parent is not None and not parent.is_alive():
                os._exit(3)  # nobody left to report to; a later staging overwrites the .part files left behind
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            if not (self._entries or self._files or self._bytes):
                return
            message = ("done", self._entries, self._files, self._bytes)
            self._entries, self._files, self._bytes = [], 0, 0
        self._results.put(message)


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself if it survives a pickle round trip, else a ``StorageError`` that says what it was."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return errors.StorageError(f"staging helper failed: {type(error).__name__}: {error}")
    return error
