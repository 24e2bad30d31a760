"""Staging on more than one core: the staging process and helper processes share one download plan.

Why: per small file the client spends about a millisecond of CPU, most of it Python holding the GIL (the HTTP
exchange, headers, bookkeeping) and handing it between threads at every system call, so one process tops out at
a few thousand small files/s however many threads it runs. Large files rarely need this: socket reads, MD5 and
disk writes release the GIL, and the threads of one process already use more than a core.

How: :func:`scalebus.transfer.stage.stage_in` plans as the listing streams in and cuts each planned page into
batches (:func:`scalebus.transfer.plan.batch_tasks`). The staging process's threads take batches from one
:class:`_Dispenser` (which draws them from the plan as they are needed); with ``staging.processes = 0`` a
:class:`_Monitor` samples its CPU and adds a helper when it is CPU-bound
(:func:`scalebus.transfer.plan.should_add_helper`), a staging waiting on the network never does; with N it starts
N - 1 helpers at once. Helpers take batches through a short queue that a feeder thread keeps topped
up, so whoever is faster takes more; the staging process gives up threads and bandwidth as they join. Helpers
are *spawned* (no locks or threads inherited mid-state), rebuild their stores from the pickled resolver, and
stream and verify each file exactly as the staging process does. They only *report* finished files: the staging
process alone appends them to the resume manifest and counts progress, so a crash anywhere loses at most the
unreported tail (fetched again on resume) and never records a file that is not in place; it also checks that
every file handed out was reported.

Only the staging process asks the VM's input cache (:class:`scalebus.transfer.kit.InputCache`) for a file or
offers it one; helpers always fetch, and what they fetch is not offered to the cache.

Failure: the first error anywhere (or ``cancel``) stops the dispenser and every process: reads in flight stop at
their next write, and the staging raises that error, with its type (transient or permanent) intact: errors
pickle with their type. A helper that dies without reporting (killed, out of memory) is a ``StorageError``.
Helpers ignore SIGINT (the staging process stops them) and exit if the staging process dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from scalebus import errors, logs
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import download, kit, plan

log = structlog.get_logger(__name__)

BATCHES_QUEUED_PER_HELPER = 2
"""Batches waiting for each helper that can start: enough that a helper never waits for the feeder, few enough
that the last batches stay with whoever is free."""
REPORT_INTERVAL_S = 0.2
"""Helpers send their finished files at most this often (and once at the end)."""
STOP_GRACE_S = 60.0
"""After a failure or a cancel, how long helpers get to wind down (their reads stop at the next write) before
they are terminated."""
_POLL_S = 0.05

Batch = tuple[plan.FileTask, ...]


class Manifest(Protocol):
    """Where the staging process records finished files: its own (``record``), its helpers'
    (``record_entry``)."""

    def record(self, task: plan.FileTask) -> None: ...

    def record_entry(self, entry: plan.ManifestEntry) -> None: ...


@dataclass(frozen=True, slots=True)
class _HelperSpec:
    """Everything a helper needs, sent once when it is spawned."""

    resolve: kit.Resolver
    sources: tuple[str, ...]
    dest: Path
    settings: StagingSettings
    log_config: logs.LogConfig | None
    log_context: dict[str, Any]
    """What the staging process bound (job_id, message_id, instance_id): helpers log with the same."""


def share_settings(settings: StagingSettings, processes: int) -> StagingSettings:
    """One process's share of the staging budgets: threads, memory and bandwidth are per VM, not per process."""
    cap = settings.bandwidth_cap_bytes_per_s
    return settings.model_copy(
        update={
            "max_concurrency": -(-settings.max_concurrency // processes),
            "memory_budget_bytes": max(download.READ_BUFFER_BYTES, settings.memory_budget_bytes // processes),
            "bandwidth_cap_bytes_per_s": max(1, cap // processes) if cap else 0,
        }
    )


class Team:
    """The staging process's side: download its share, add helpers (at once, or as the staging turns out
    CPU-bound), feed them, collect their reports."""

    def __init__(
        self,
        resolve: kit.Resolver,
        sources: Sequence[str],
        dest: Path,
        settings: StagingSettings,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self._resolve = resolve
        self._sources = tuple(sources)
        self._dest = dest
        self._settings = settings
        self._cancel = cancel
        self._lock = threading.Lock()  # the failure and the count of files done
        self._membership = threading.Lock()  # the helpers, and whether more may start
        self._stop = threading.Event()  # this process's view of the link's stop event (cheap to read)
        self._failure: BaseException | None = None
        self._dispenser = _Dispenser(())
        self._most = 1
        self._helpers: list[multiprocessing.process.BaseProcess] = []
        self._share = settings
        self._feeding_done = False
        self._link: _Link | None = None
        self._own: download.DownloadRun | None = None
        self._files_done = 0
        self._log_context = structlog.contextvars.get_contextvars()  # helpers started from any thread log with it

    def run(
        self,
        stores: Sequence[base.ObjectStore],
        batches: Iterable[Batch],
        processes: plan.ProcessPlan,
        *,
        manifest: Manifest,
        progress: kit.ProgressTracker,
        files_left: Callable[[], int] | None = None,
        cache: kit.InputCache | None = None,
    ) -> tuple[float, int]:
        """Download ``batches`` (drawn as they are needed) here and in helpers; return the helpers' CPU seconds
        and the most processes that downloaded at once. ``files_left``: how many files are still to come (for
        the decision to add a helper; default: what is left of ``batches``, which must then be a sequence).
        ``cache`` serves this process's own threads only."""
        self._dispenser = _Dispenser(batches, files_left)
        self._most = processes.most
        self._share = share_settings(self._settings, processes.most)
        self._own = download.DownloadRun(
            stores=stores,
            dest=self._dest,
            settings=self._settings,
            manifest=_Counting(manifest, self._count),
            progress=progress,
            should_stop=self._stopped,
            cache=cache,
        )
        for _ in range(processes.start - 1):
            self.add_helper_if(manifest, progress)
        monitor = _Monitor(self, manifest, progress, processes) if processes.most > processes.start else None
        try:
            self._own.execute(self._dispenser.tasks(), n_units=self._settings.max_concurrency)
        except Exception as exc:
            self._fail(exc)
        except BaseException:
            self._fail(errors.StorageError("staging interrupted"))
            _terminate(self._helpers)
            raise
        finally:
            if monitor is not None:
                monitor.stop()
            self._finish_feeding()
            if self._link is not None:
                self._link.expect(len(self._helpers))
                self._wait(self._link.collecting)
                self._link.close()
        if self._failure is not None:
            raise self._failure
        self._check_complete(self._dispenser.handed_out)
        return (self._link.helpers_cpu_s if self._link else 0.0), 1 + len(self._helpers)

    def add_helper_if(self, manifest: Manifest, progress: kit.ProgressTracker) -> int:
        """Start one more helper unless the work is all handed out or stopped; the processes downloading now."""
        with self._membership:
            if not (self._feeding_done or self._stopped()):
                self._add_helper(manifest, progress)
            return 1 + len(self._helpers)

    def files_left(self) -> int:
        return self._dispenser.files_left()

    @property
    def own_run(self) -> download.DownloadRun | None:
        """This process's own download run (its cache hits, its first byte), once :meth:`run` started it."""
        return self._own

    def _add_helper(self, manifest: Manifest, progress: kit.ProgressTracker) -> None:
        if self._link is None:
            queued = BATCHES_QUEUED_PER_HELPER * (self._most - 1)
            self._link = _Link(self._dispenser, manifest, progress, self, queued)
        spec = _HelperSpec(
            self._resolve,
            self._sources,
            self._dest,
            self._share,
            logs.current(),
            self._log_context,
        )
        try:
            helper = self._link.spawn(spec, name=f"scalebus-stage-{len(self._helpers) + 1}")
        except Exception as exc:
            self._fail(errors.StorageError(f"cannot start a staging helper process ({exc})"))
            return
        self._helpers.append(helper)
        helpers = len(self._helpers)
        assert self._own is not None
        rate = self._settings.bandwidth_cap_bytes_per_s - helpers * self._share.bandwidth_cap_bytes_per_s
        self._own.reshare(
            threads=self._settings.max_concurrency - helpers * self._share.max_concurrency,
            rate_bytes_per_s=max(1, rate) if self._settings.bandwidth_cap_bytes_per_s else 0,
        )
        log.info("staging.helper.started", pid=helper.pid, processes=1 + helpers, files_left=self.files_left())

    def _finish_feeding(self) -> int:
        """No more helpers from now on; how many there are (the feeder ends each one's queue)."""
        with self._membership:
            self._feeding_done = True
            return len(self._helpers)

    def _count(self, files: int) -> None:
        with self._lock:
            self._files_done += files

    def _check_complete(self, expected: int) -> None:
        """A safety net: every file handed out was reported staged, or the staging fails (a rerun resumes)."""
        if self._files_done != expected:
            missing = expected - self._files_done
            raise errors.StorageError(f"staging lost track of {missing} of {expected} files; run it again")

    def _stopped(self) -> bool:
        return self._stop.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _fail(self, exc: BaseException) -> None:
        """Remember the first failure and stop handing out work everywhere."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._dispenser.stop()
        self._stop.set()
        link = self._link
        if link is not None:
            link.stop.set()

    def _wait(self, collecting: threading.Thread) -> None:
        """Until every helper has reported its end. Helpers still working on their last batches (a large file can
        take long) are waited for; once stopped by a failure they get :data:`STOP_GRACE_S` to wind down, then
        are terminated."""
        stopped_at: float | None = None
        while collecting.is_alive():
            collecting.join(_POLL_S * 4)
            if stopped_at is None and self._stopped():
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE_S:
                self._fail(errors.StorageError(f"staging helpers did not stop within {STOP_GRACE_S:.0f} s"))
                _terminate(self._helpers)
                collecting.join(STOP_GRACE_S)
                return


class _Monitor:
    """Samples the staging process's CPU use every ``plan.CPU_SAMPLE_S``; adds a helper when
    :func:`plan.should_add_helper` says the process is bound by its own CPU."""

    def __init__(
        self,
        team: Team,
        manifest: Manifest,
        progress: kit.ProgressTracker,
        processes: plan.ProcessPlan,
    ) -> None:
        self._team = team
        self._manifest = manifest
        self._progress = progress
        self._processes = processes
        self._done = threading.Event()
        self._thread = kit.thread_in_context(self._run, name="stage-monitor")
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        samples: list[float] = []
        running = self._processes.start
        wall, cpu = time.monotonic(), time.process_time()
        while not self._done.wait(plan.CPU_SAMPLE_S):
            now_wall, now_cpu = time.monotonic(), time.process_time()
            samples.append((now_cpu - cpu) / max(now_wall - wall, 1e-6))
            wall, cpu = now_wall, now_cpu
            left = self._team.files_left()
            if plan.should_add_helper(samples, processes=running, most=self._processes.most, files_left=left):
                log.info("staging.cpu_bound", cpu_cores=round(samples[-1], 2), files_left=left)
                running = self._team.add_helper_if(self._manifest, self._progress)
                samples.clear()


class _Counting:
    """The staging process's manifest, counting the files its own threads finish."""

    def __init__(self, manifest: Manifest, count: Callable[[int], None]) -> None:
        self._manifest = manifest
        self._count = count

    def record(self, task: plan.FileTask) -> None:
        self._manifest.record(task)
        self._count(1)


class _Link:
    """What the staging process shares with its helpers, made when the first helper starts: the batch queue and
    its feeder, the report queue and its collector, the stop event."""

    def __init__(
        self,
        dispenser: _Dispenser,
        manifest: Manifest,
        progress: kit.ProgressTracker,
        team: Team,
        queued: int,
    ) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self.tasks: Any = self._ctx.Queue(maxsize=max(1, queued))
        self.results: Any = self._ctx.Queue()
        self.stop: Any = self._ctx.Event()
        self._collector = _Collector(
            self.results,
            manifest=manifest,
            progress=progress,
            fail=team._fail,
            count=team._count,
            cancel=team._cancel,
        )
        self.collecting = threading.Thread(target=self._collector.run, name="stage-collect", daemon=True)
        feed_args = (dispenser, self.tasks, team._finish_feeding, self.stop, team._fail)
        self._feeder = threading.Thread(target=_feed, args=feed_args, name="stage-feed", daemon=True)
        self._feeder.start()
        self.collecting.start()

    @property
    def helpers_cpu_s(self) -> float:
        return self._collector.helpers_cpu_s

    def spawn(self, spec: _HelperSpec, *, name: str) -> multiprocessing.process.BaseProcess:
        helper = self._ctx.Process(
            target=helper_main, args=(spec, self.tasks, self.results, self.stop), name=name, daemon=True
        )
        helper.start()
        self._collector.watch(helper)
        return helper

    def expect(self, helpers: int) -> None:
        """No more helpers will start: the collector ends once these have exited."""
        self._collector.expect(helpers)

    def close(self) -> None:
        """After the collector ended: stop the feeder, release the queues."""
        self._feeder.join(STOP_GRACE_S)
        for q in (self.tasks, self.results):
            q.close()
            q.cancel_join_thread()


class _Dispenser:
    """Hands out batches in plan order to whoever asks first; ``stop`` makes it hand out no more. ``batches``
    may be a generator that plans as it goes (read under the lock; its errors fail the staging)."""

    def __init__(self, batches: Iterable[Batch], files_left: Callable[[], int] | None = None) -> None:
        self._batches = iter(batches)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._files_left = files_left
        self._total = sum(len(batch) for batch in batches) if isinstance(batches, Sequence) else 0
        self.handed_out = 0

    def files_left(self) -> int:
        return self._files_left() if self._files_left is not None else self._total - self.handed_out

    def take(self) -> Batch | None:
        with self._lock:
            if self._stopped.is_set():
                return None
            batch = next(self._batches, None)
            if batch is not None:
                self.handed_out += len(batch)
            return batch

    def tasks(self) -> Iterator[plan.FileTask]:
        while (batch := self.take()) is not None:
            yield from batch

    def stop(self) -> None:
        self._stopped.set()


def _feed(
    dispenser: _Dispenser,
    tasks: Any,
    finish: Callable[[], int],
    stop: Any,
    fail: Callable[[BaseException], None],
) -> None:
    """Keep the helpers' queue topped up from the dispenser; then one end-of-work marker per helper (``finish``
    closes the team to new helpers and says how many there are). A failure to plan the next batch fails the
    staging (``fail``)."""
    try:
        while (batch := dispenser.take()) is not None:
            if not _put(tasks, batch, stop):
                finish()
                return
    except BaseException as exc:
        fail(exc)
        finish()
        return
    for _ in range(finish()):
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
    ``fail``; returns once every helper has exited and no more can start."""

    def __init__(
        self,
        results: Any,
        *,
        manifest: Manifest,
        progress: kit.ProgressTracker,
        fail: Callable[[BaseException], None],
        count: Callable[[int], None],
        cancel: threading.Event | None,
    ) -> None:
        self._results = results
        self._manifest = manifest
        self._progress = progress
        self._fail = fail
        self._count = count
        self._cancel = cancel
        self._lock = threading.Lock()
        self._helpers: dict[int | None, multiprocessing.process.BaseProcess] = {}
        self._expected: int | None = None  # set once no more helpers can start
        self._exited: set[int | None] = set()
        self.helpers_cpu_s = 0.0

    def watch(self, helper: multiprocessing.process.BaseProcess) -> None:
        with self._lock:
            self._helpers[helper.pid] = helper

    def expect(self, helpers: int) -> None:
        with self._lock:
            self._expected = helpers

    def run(self) -> None:
        while not self._all_exited():
            if self._cancel is not None and self._cancel.is_set():
                self._fail(errors.StagingCancelled("staging cancelled before its end"))
            try:
                message = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_deaths()
                continue
            self._handle(message)

    def _all_exited(self) -> bool:
        with self._lock:
            return self._expected is not None and len(self._exited) >= self._expected

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            _, entries, files, nbytes = message
            for rel_path, etag, size in entries:
                self._manifest.record_entry(plan.ManifestEntry(rel_path, etag, size))
            self._count(len(entries))
            self._progress.add(files=files, nbytes=nbytes)
        elif kind == "exit":
            _, pid, error, cpu_s = message
            with self._lock:
                self._exited.add(pid)
            self.helpers_cpu_s += cpu_s
            if error is not None:
                self._fail(error)

    def _check_deaths(self) -> None:
        with self._lock:
            watched = [(pid, h) for pid, h in self._helpers.items() if pid not in self._exited]
        for pid, helper in watched:
            if helper.exitcode is None:
                continue
            # Its last report may still be in the pipe: read what is there before calling it dead.
            with contextlib.suppress(queue.Empty):
                while pid not in self._exited:
                    self._handle(self._results.get(timeout=0.5))
            if pid not in self._exited:
                with self._lock:
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
        run = download.DownloadRun(
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
