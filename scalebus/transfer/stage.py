"""Staging in: the entry point that lists, plans, prepares the disk and downloads in this process or with helpers.

``stage_in`` lists the sources, asks :mod:`scalebus.transfer.plan` what to fetch (given the resume manifest,
:mod:`scalebus.transfer.manifest`), checks free disk space and creates the directories, then downloads
(:mod:`scalebus.transfer.download`). A staging bound by its own CPU (many small files: one process tops out on the
GIL) adds helper processes (``StagingSettings.processes``, by default up to one per core while enough files are
left): :mod:`scalebus.transfer.helpers` runs them; the plan, the manifest and the progress stay in this process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import download, helpers, kit, manifest, plan

log = structlog.get_logger(__name__)

UNITS_PER_THREAD = 4
"""Large files are split only as far as keeping every thread busy needs: chunks grow above
``chunk_size_bytes`` until the staging has about this many units of work per thread. Fewer, larger GETs cost
less per byte, and a file fetched whole is checked against its Content-MD5 while it streams instead of being
read back."""
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
"""Where a container's CPU quota is (cgroup v2); read to size ``staging.processes = 0``."""


def stage_in(
    resolve: kit.Resolver,
    sources: Sequence[str],
    dest: Path,
    settings: StagingSettings,
    *,
    on_progress: kit.OnProgress | None = None,
    cancel: threading.Event | None = None,
) -> kit.StageStats:
    """Download every file under ``sources`` into ``dest`` (layout and path rules: :mod:`scalebus.transfer.plan`).

    Setting ``cancel`` stops the staging soon after (``StagingCancelled``): no new reads start and reads in
    flight stop at their next write. What was finished stays in the manifest.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    stores = [resolve(uri) for uri in sources]
    dest = dest.absolute()
    todo = _plan(stores, sources, dest, settings)
    batches = plan.batch_tasks(todo.fetch)
    processes = _process_plan(resolve, settings, files=len(todo.fetch), batches=len(batches))
    helpers_cpu_s, used = 0.0, 1
    try:
        with manifest.Manifest(dest / plan.MANIFEST_NAME) as record:
            progress = kit.ProgressTracker(len(todo.fetch), todo.fetch_bytes, started, on_progress)
            if processes.most > 1:
                team = helpers.Team(resolve, sources, dest, settings, cancel=cancel)
                helpers_cpu_s, used = team.run(stores, batches, processes, manifest=record, progress=progress)
            else:
                _download_here(stores, todo, dest, settings, record=record, progress=progress, cancel=cancel)
            progress.finish()
    except BaseException:
        remove_temp_files(dest, todo.fetch)  # finished files stay, for the next staging to resume from
        raise
    stats = kit.StageStats(
        files=len(todo.fetch),
        bytes=todo.fetch_bytes,
        skipped_files=len(todo.skip),
        skipped_bytes=todo.skip_bytes,
        seconds=time.monotonic() - started,
        cpu_s=round(time.process_time() - cpu_started + helpers_cpu_s, 3),
        processes=used,
    )
    log.info("staging.stage_in.done", dest=str(dest), sources=len(sources), **stats.as_dict())
    return stats


def _plan(
    stores: Sequence[base.ObjectStore], sources: Sequence[str], dest: Path, settings: StagingSettings
) -> plan.DownloadPlan:
    """List the sources, plan against what a previous staging left, check the disk and create the directories."""
    listings = [plan.Listing(uri, list(store.list_files(uri))) for uri, store in zip(sources, stores, strict=True)]
    _make_dirs(dest, ())
    present = manifest.read_manifest(dest / plan.MANIFEST_NAME, dest)
    total_bytes = sum(obj.size for listing in listings for obj in listing.objects)
    todo = plan.plan_download(listings, present=present, chunk_size_bytes=chunk_size(total_bytes, settings))
    _preflight(dest, todo.fetch_bytes, settings.min_free_bytes)
    _make_dirs(dest, todo.directories)
    return todo


def remove_temp_files(dest: Path, tasks: Sequence[plan.FileTask]) -> None:
    """Delete the temporary files ``tasks`` may have left under ``dest`` (a failed or cancelled staging): every
    process that wrote them has stopped by now."""
    for task in tasks:
        with contextlib.suppress(OSError):
            os.unlink(download.part_path(dest, task))


def _download_here(
    stores: Sequence[base.ObjectStore],
    todo: plan.DownloadPlan,
    dest: Path,
    settings: StagingSettings,
    *,
    record: manifest.Manifest,
    progress: kit.ProgressTracker,
    cancel: threading.Event | None,
) -> None:
    """The whole plan on this process's threads."""
    run = download.DownloadRun(
        stores=stores,
        dest=dest,
        settings=settings,
        manifest=record,
        progress=progress,
        should_stop=cancel.is_set if cancel is not None else None,
    )
    run.execute(todo.fetch, n_units=sum(max(1, len(task.chunks)) for task in todo.fetch))


def _process_plan(
    resolve: kit.Resolver, settings: StagingSettings, *, files: int, batches: int
) -> plan.ProcessPlan:
    """``plan.process_plan`` on this machine's usable cores; one process if the resolver cannot be sent to a
    helper (the CLI's can; a caller's closure cannot)."""
    processes = plan.process_plan(settings.processes, cores=machine_cores(), files=files, batches=batches)
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
    files whole; a 2 GiB file among them is still split)."""
    per_unit = -(-total_bytes // (settings.max_concurrency * UNITS_PER_THREAD))
    return max(settings.chunk_size_bytes, per_unit)


def _preflight(dest: Path, needed: int, min_free: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed + min_free > free:
        raise errors.LocalDiskError(
            f"not enough disk space in {dest}: staging needs {needed:,} bytes plus {min_free:,} bytes kept free "
            f"(staging.min_free_bytes), but only {free:,} bytes are free"
        )


def _make_dirs(dest: Path, directories: Sequence[str]) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for rel in directories:
            with contextlib.suppress(FileExistsError):
                os.mkdir(dest / rel)
    except OSError as exc:
        raise download.local_disk_error(dest, exc) from exc
