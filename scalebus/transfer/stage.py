"""Staging in: the entry point that lists, plans and downloads at once, in this process or with helpers.

``stage_in`` streams: the sources are listed page by page (:mod:`scalebus.transfer.listing`, many folders at
once where the store lists by folder), each page is planned as it arrives (:class:`scalebus.transfer.plan.
StreamPlanner`, against the resume manifest, :mod:`scalebus.transfer.manifest`, and the free disk space), its
directories are created and its files handed to the download threads (:mod:`scalebus.transfer.download`), so the
first byte moves with the first page whatever the number of files, and memory holds only what is queued between
the stages. A staging bound by its own CPU (many small files: one process tops out on the GIL) adds helper
processes (``StagingSettings.processes``, by default up to one per core while enough files are left):
:mod:`scalebus.transfer.helpers` runs them; the plan, the manifest and the progress stay in this process.

A rule broken by a file listed late (an unsafe name, a collision, a full disk) fails the staging when that file
is planned: files fetched before stay in place and in the manifest, for the next staging to resume from.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import download, helpers, kit, listing, manifest, plan

log = structlog.get_logger(__name__)

UNITS_PER_THREAD = 4
"""Large files are split only as far as keeping every thread busy needs: chunks grow above
``chunk_size_bytes`` until the staging has about this many units of work per thread. Fewer, larger GETs cost
less per byte, and a file fetched whole is checked against its Content-MD5 while it streams instead of being
read back. While the listing streams in, "the staging" is what has been listed so far."""
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
"""Where a container's CPU quota is (cgroup v2); read to size ``staging.processes = 0``."""
_WAIT_S = 0.1
"""How often a download thread waiting for the listing checks for a cancel."""
_NOT_YET: list[plan.FileTask] = []
"""What planning without waiting returns when no listed page is waiting (compared by identity)."""


def stage_in(
    resolve: kit.Resolver,
    sources: Sequence[str],
    dest: Path,
    settings: StagingSettings,
    *,
    on_progress: kit.OnProgress | None = None,
    cancel: threading.Event | None = None,
    cache: kit.InputCache | None = None,
) -> kit.StageStats:
    """Download every file under ``sources`` into ``dest`` (layout and path rules: :mod:`scalebus.transfer.plan`).

    Setting ``cancel`` stops the staging soon after (``StagingCancelled``): no new reads start and reads in
    flight stop at their next write. What was finished stays in the manifest.

    ``cache``: the VM's input cache, asked for each file before it is fetched (a hit is placed, not downloaded,
    and recorded in the manifest like a download) and offered each file once it is verified and in place. Only
    this process's threads use it (helper processes always fetch).
    """
    started, cpu_started = time.monotonic(), time.process_time()
    stores = [resolve(uri) for uri in sources]
    dest = dest.absolute()
    created = not dest.exists()
    _make_dirs(dest, ())
    try:
        return _stage_into(
            resolve,
            stores=stores,
            sources=sources,
            dest=dest,
            settings=settings,
            on_progress=on_progress,
            cancel=cancel,
            cache=cache,
            clocks=(started, cpu_started),
        )
    except BaseException:
        if created:
            _remove_if_empty(dest)  # a source that is not there leaves no empty folder behind
        raise


def _remove_if_empty(dest: Path) -> None:
    """Remove ``dest`` if the staging that created it left nothing but an empty manifest."""
    with contextlib.suppress(OSError):
        manifest_path = dest / plan.MANIFEST_NAME
        if manifest_path.exists() and manifest_path.stat().st_size == 0:
            manifest_path.unlink()
        dest.rmdir()


def _stage_into(
    resolve: kit.Resolver,
    *,
    stores: Sequence[base.ObjectStore],
    sources: Sequence[str],
    dest: Path,
    settings: StagingSettings,
    on_progress: kit.OnProgress | None,
    cancel: threading.Event | None,
    cache: kit.InputCache | None,
    clocks: tuple[float, float],
) -> kit.StageStats:
    """:func:`stage_in` once ``dest`` exists; ``clocks``: the wall and CPU clocks when it started."""
    started, cpu_started = clocks
    planner = _planner(sources, dest, settings)
    progress = kit.ProgressTracker(0, 0, started, on_progress)
    should_stop = cancel.is_set if cancel is not None else _never
    with (
        listing.SourceListing(stores, sources, concurrency=settings.list_concurrency) as listed,
        manifest.Manifest(dest / plan.MANIFEST_NAME) as record,
    ):
        feed = _Feed(listed, planner, dest, progress=progress, record=record, should_stop=should_stop)
        try:
            helpers_cpu_s, used, own = _download(
                resolve, stores, sources, dest, settings, feed, progress=progress, cancel=cancel, cache=cache
            )
            progress.finish()
        except BaseException:
            feed.remove_temp_files()  # finished files stay, for the next staging to resume from
            raise
    first_byte = None if own is None or own.first_byte_at is None else own.first_byte_at - started
    stats = kit.StageStats(
        files=planner.fetch_files,
        bytes=planner.fetch_bytes,
        skipped_files=planner.skip_files,
        skipped_bytes=planner.skip_bytes,
        seconds=time.monotonic() - started,
        cpu_s=round(time.process_time() - cpu_started + helpers_cpu_s, 3),
        processes=used,
        cached_files=own.cached_files if own is not None else 0,
        cached_bytes=own.cached_bytes if own is not None else 0,
        first_byte_s=None if first_byte is None else round(first_byte, 3),
    )
    log.info("staging.stage_in.done", dest=str(dest), sources=len(sources), **stats.as_dict())
    return stats


def _never() -> bool:
    return False


def _download(
    resolve: kit.Resolver,
    stores: Sequence[base.ObjectStore],
    sources: Sequence[str],
    dest: Path,
    settings: StagingSettings,
    feed: _Feed,
    *,
    progress: kit.ProgressTracker,
    cancel: threading.Event | None,
    cache: kit.InputCache | None,
) -> tuple[float, int, download.DownloadRun | None]:
    """Everything ``feed`` plans, here or with helpers: the helpers' CPU seconds, the most processes that
    downloaded at once, and this process's own run."""
    processes = _process_plan(resolve, settings, feed)
    if processes.most <= 1:
        own = _download_here(stores, feed, dest, settings, progress=progress, cancel=cancel, cache=cache)
        return 0.0, 1, own
    team = helpers.Team(resolve, sources, dest, settings, cancel=cancel)
    helpers_cpu_s, used = team.run(
        stores,
        feed.batches(),
        processes,
        manifest=feed,
        progress=progress,
        files_left=feed.files_left,
        cache=cache,
    )
    return helpers_cpu_s, used, team.own_run


def _planner(sources: Sequence[str], dest: Path, settings: StagingSettings) -> plan.StreamPlanner:
    """The planner for this staging: what a previous one left (the manifest), the disk's free space now."""
    try:
        free = shutil.disk_usage(dest).free
    except OSError as exc:
        raise download.local_disk_error(dest, exc) from exc
    return plan.StreamPlanner(
        sources,
        chunk_size_bytes=settings.chunk_size_bytes,
        spread_units=settings.max_concurrency * UNITS_PER_THREAD,
        present=manifest.read_index(dest / plan.MANIFEST_NAME),
        is_staged=manifest.staged_size_matches(dest),
        disk=plan.DiskBudget(str(dest), free, settings.min_free_bytes),
    )


class _Feed:
    """Between the listing and the downloads: plans each page as it arrives, creates its directories, grows
    the progress totals, and remembers the files handed out until they are recorded (a failure removes their
    temporary files). It is also the manifest the downloads record to. Read from one thread at a time (the
    download pool's hand-out lock); ``record`` may come from any thread."""

    def __init__(
        self,
        listed: listing.SourceListing,
        planner: plan.StreamPlanner,
        dest: Path,
        *,
        progress: kit.ProgressTracker,
        record: manifest.Manifest,
        should_stop: Callable[[], bool],
    ) -> None:
        self._listed = listed
        self._planner = planner
        self._dest = dest
        self._root = os.path.join(os.fspath(dest), "")
        self._progress = progress
        self._manifest = record
        self._should_stop = should_stop
        self._ready: deque[list[plan.FileTask]] = deque()  # planned pages not handed out yet
        self._ready_files = 0
        self._outstanding: dict[str, plan.FileTask] = {}  # handed out, not recorded yet

    def prime(self, files: int, *, wait: bool) -> bool:
        """Plan ahead until ``files`` files are ready to fetch or the listing is complete (without ``wait``: or
        no listed page is waiting); whether the listing is complete."""
        while self._ready_files < files:
            step = self._next_step(wait=wait)
            if step is None or step is _NOT_YET:
                break
            self._ready.append(step)
            self._ready_files += len(step)
        return self._listed.finished

    def ready_batches(self) -> int:
        return sum(len(plan.batch_tasks(step)) for step in self._ready)

    def units_if_complete(self) -> int | None:
        """Units of work (files, or chunks of split files) left, if the whole staging is planned."""
        if not self._listed.finished:
            return None
        return sum(max(1, len(task.chunks)) for step in self._ready for task in step)

    @property
    def ready_files(self) -> int:
        return self._ready_files

    def files_left(self) -> int:
        """Files still to hand out, as far as can be told: those planned and waiting, plus those listed and not
        planned yet in the proportion fetched so far (a resume fetches few); while listing threads still run and
        files are being fetched, at least :data:`scalebus.transfer.plan.AUTO_MIN_FILES` (more are coming)."""
        planner = self._planner
        unplanned = max(0, self._listed.listed_files - planner.listed_files)
        left = self._ready_files + unplanned * planner.fetch_files // max(1, planner.listed_files)
        if self._listed.all_listed or not planner.fetch_files:
            return left
        return max(left, plan.AUTO_MIN_FILES)

    def tasks(self) -> Iterator[plan.FileTask]:
        """The files to fetch, planned as they are needed."""
        outstanding = self._outstanding
        while (step := self._take()) is not None:
            for task in step:
                outstanding[task.rel_dest] = task
                yield task

    def batches(self) -> Iterator[helpers.Batch]:
        """The files to fetch in batches for the processes (:func:`scalebus.transfer.plan.batch_tasks`, within
        one planned page: a batch never waits for the listing)."""
        outstanding = self._outstanding
        while (step := self._take()) is not None:
            for batch in plan.batch_tasks(step):
                for task in batch:
                    outstanding[task.rel_dest] = task
                yield batch

    def record(self, task: plan.FileTask) -> None:
        self._outstanding.pop(task.rel_dest, None)
        self._manifest.record(task)

    def record_entry(self, entry: plan.ManifestEntry) -> None:
        self._outstanding.pop(entry.rel_path, None)
        self._manifest.record_entry(entry)

    def remove_temp_files(self) -> None:
        """Delete the temporary files the files handed out and not finished may have left (a failed or
        cancelled staging): every process that wrote them has stopped by now."""
        remove_temp_files(self._dest, list(self._outstanding.values()))

    def _take(self) -> list[plan.FileTask] | None:
        if self._ready:
            step = self._ready.popleft()
            self._ready_files -= len(step)
            return step
        return self._next_step()

    def _next_step(self, *, wait: bool = True) -> list[plan.FileTask] | None:
        """Plan listing pages until one has files to fetch; ``None`` once the listing is complete; without
        ``wait``, :data:`_NOT_YET` when no listed page is waiting."""
        while True:
            if self._should_stop():
                raise errors.StagingCancelled("staging cancelled before its end")
            page = self._listed.next_page(_WAIT_S if wait else 0.0)
            if page is None:
                self._progress.totals_complete()
                return None
            if page is listing.WAITING:
                if not wait:
                    return _NOT_YET
                continue
            step = self._planner.feed(page.source, page.objects)
            if step.directories:
                _make_subdirs(self._root, step.directories)
            if step.fetch:
                self._progress.add_total(files=len(step.fetch), nbytes=sum(task.size for task in step.fetch))
                return step.fetch


def remove_temp_files(dest: Path, tasks: Sequence[plan.FileTask]) -> None:
    """Delete the temporary files ``tasks`` may have left under ``dest`` (a failed or cancelled staging): every
    process that wrote them has stopped by now."""
    for task in tasks:
        with contextlib.suppress(OSError):
            os.unlink(download.part_path(dest, task))


def _download_here(
    stores: Sequence[base.ObjectStore],
    feed: _Feed,
    dest: Path,
    settings: StagingSettings,
    *,
    progress: kit.ProgressTracker,
    cancel: threading.Event | None,
    cache: kit.InputCache | None,
) -> download.DownloadRun:
    """The whole staging on this process's threads."""
    run = download.DownloadRun(
        stores=stores,
        dest=dest,
        settings=settings,
        manifest=feed,
        progress=progress,
        should_stop=cancel.is_set if cancel is not None else None,
        cache=cache,
    )
    units = feed.units_if_complete()  # a small staging, planned whole: no more threads than units of work
    run.execute(feed.tasks(), n_units=settings.max_concurrency if units is None else max(1, units))
    return run


def _process_plan(resolve: kit.Resolver, settings: StagingSettings, feed: _Feed) -> plan.ProcessPlan:
    """``plan.process_plan`` on this machine's usable cores, on what is planned so far: without waiting for
    the listing (auto; its monitor adds helpers only while enough files are left), or, for a fixed number,
    once there are batches for all of them or the listing is complete. One process if the resolver cannot be
    sent to a helper (the CLI's can; a caller's closure cannot)."""
    fixed = settings.processes > 1
    complete = feed.prime(settings.processes * plan.BATCH_MAX_FILES if fixed else plan.AUTO_MIN_FILES, wait=fixed)
    if settings.processes == 1:
        return plan.ProcessPlan(1, 1)
    cores = machine_cores()
    files, batches = feed.ready_files, feed.ready_batches()
    if not complete:  # more are coming: enough files for any number of processes
        files, batches = max(files, plan.AUTO_MIN_FILES), max(batches, cores, settings.processes)
    processes = plan.process_plan(settings.processes, cores=cores, files=files, batches=batches)
    if processes.most > 1:
        try:
            pickle.dumps(resolve)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("staging.single_process", reason=f"the store resolver cannot be pickled ({exc})")
            return plan.ProcessPlan(1, 1)
    return processes


def machine_cores() -> int:
    """CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota (``docker run --cpus``)."""
    try:
        cpu_max = Path(CGROUP_CPU_MAX).read_text()
    except OSError:
        cpu_max = None
    return usable_cores(len(os.sched_getaffinity(0)), cpu_max)


def usable_cores(affinity: int, cpu_max: str | None) -> int:
    """``affinity`` CPUs, fewer if ``cpu_max`` (cgroup v2 ``"<quota> <period>"`` or ``"max <period>"``) allows
    less: a quota of 1.5 CPUs counts as 2."""
    fields = (cpu_max or "").split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields) or int(fields[1]) == 0:
        return max(1, affinity)
    quota_cores = -(-int(fields[0]) // int(fields[1]))
    return max(1, min(affinity, quota_cores))


def chunk_size(total_bytes: int, settings: StagingSettings) -> int:
    """The ranged-read size: ``settings.chunk_size_bytes`` at least, larger when the staging is big enough that
    files alone give every thread :data:`UNITS_PER_THREAD` units (a 1 GiB staging on 16 threads reads 16 MiB
    files whole; a 2 GiB file among them is still split). The planner applies the same rule to the bytes listed
    so far."""
    per_unit = -(-total_bytes // (settings.max_concurrency * UNITS_PER_THREAD))
    return max(settings.chunk_size_bytes, per_unit)


def _make_dirs(dest: Path, directories: Sequence[str]) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise download.local_disk_error(dest, exc) from exc
    _make_subdirs(os.path.join(os.fspath(dest), ""), directories)


def _make_subdirs(root: str, directories: Sequence[str]) -> None:
    """Create ``directories`` (parents first) under ``root`` (ending in ``/``)."""
    for rel in directories:
        try:
            os.mkdir(root + rel)
        except FileExistsError:
            continue
        except OSError as exc:
            raise download.local_disk_error(root + rel, exc) from exc
