"""The staging engine: inputs from the data lake to local disk, outputs back, verified and resumable.

``stage_in`` lists the sources, asks :mod:`scalebus.transfer.plan` what to fetch, checks free disk space, then runs
a fixed pool of threads over *units* of work — a whole small file, or one ranged chunk of a large one — so
concurrency is bounded across files and within them. Each file is streamed to ``<name>.part``, its size (always)
and Content-MD5 (when the store has one) are checked, and it is renamed into place; only then is it appended to
the resume manifest, so a crashed staging restarts without fetching finished files again.

A staging bound by its own CPU (many small files: one process tops out on the GIL) adds helper processes
(``StagingSettings.processes``, by default up to one per core while enough files are left).
:mod:`scalebus.transfer.helpers` runs them; the plan, the manifest and the progress stay in this process.

Memory stays within ``StagingSettings.memory_budget_bytes``: the stores stream to the file sink and buffer at
most :data:`READ_BUFFER_BYTES` per read in flight, and the pool never has more reads in flight than the budget
covers. Transient failures are retried inside the adapters (``backends/azure/_retry.py``), so nothing here
retries or imports tenacity.

``publish`` uploads a job's outputs in parallel, then writes the ``_SUCCESS`` commit marker last; an existing
marker makes it a no-op, so outputs are committed once however often a job is delivered.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, TypeVar

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import plan

log = structlog.get_logger(__name__)

READ_BUFFER_BYTES = 1024 * 1024
"""Most a store buffers in memory for one ``read_into`` call (the Azure adapter streams every GET through one
buffer of this size, the folder store copies in pieces); the pool is sized so that reads in flight × this stays
within the memory budget."""
UNITS_PER_THREAD = 4
"""Large files are split only as far as keeping every thread busy needs: chunks grow above
``chunk_size_bytes`` until the staging has about this many units of work per thread. Fewer, larger GETs cost
less per byte, and a file fetched whole is checked against its Content-MD5 while it streams instead of being
read back."""
MARKER_NAME = "_SUCCESS"
"""The commit marker ``publish`` writes after every output file."""
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
"""Where a container's CPU quota is (cgroup v2); read to size ``staging.processes = 0``."""
PROGRESS_INTERVAL_S = 0.2
"""``on_progress`` is called at most this often (plus once at the end)."""

Resolver = Callable[[str], base.ObjectStore]
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


# --------------------------------------------------------------------------------------------- stage in


def stage_in(
    resolve: Resolver,
    sources: Sequence[str],
    dest: Path,
    settings: StagingSettings,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> StageStats:
    """Download every file under ``sources`` into ``dest`` (layout and path rules: :mod:`scalebus.transfer.plan`).

    Setting ``cancel`` stops the staging soon after (``StagingCancelled``): no new reads start and reads in
    flight stop at their next write. What was finished stays in the manifest.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    stores = [resolve(uri) for uri in sources]
    listings = [plan.Listing(uri, list(store.list_files(uri))) for uri, store in zip(sources, stores, strict=True)]
    dest = dest.absolute()
    _make_dirs(dest, ())
    manifest_path = dest / plan.MANIFEST_NAME
    present = _read_manifest(manifest_path, dest)
    total_bytes = sum(obj.size for listing in listings for obj in listing.objects)
    download = plan.plan_download(listings, present=present, chunk_size_bytes=chunk_size(total_bytes, settings))
    _preflight(dest, download.fetch_bytes, settings.min_free_bytes)
    _make_dirs(dest, download.directories)
    batches = plan.batch_tasks(download.fetch)
    processes = _process_plan(resolve, settings, files=len(download.fetch), batches=len(batches))
    helpers_cpu_s, used = 0.0, 1
    with Manifest(manifest_path) as manifest:
        progress = ProgressTracker(len(download.fetch), download.fetch_bytes, started, on_progress)
        if processes.most > 1:
            from scalebus.transfer import helpers as staging_procs

            team = staging_procs.Team(resolve, sources, dest, settings, cancel=cancel)
            helpers_cpu_s, used = team.run(stores, batches, processes, manifest=manifest, progress=progress)
        else:
            run = DownloadRun(
                stores=stores,
                dest=dest,
                settings=settings,
                manifest=manifest,
                progress=progress,
                should_stop=cancel.is_set if cancel is not None else None,
            )
            run.execute(download.fetch, n_units=sum(max(1, len(task.chunks)) for task in download.fetch))
        progress.finish()
    stats = StageStats(
        files=len(download.fetch),
        bytes=download.fetch_bytes,
        skipped_files=len(download.skip),
        skipped_bytes=download.skip_bytes,
        seconds=time.monotonic() - started,
        cpu_s=round(time.process_time() - cpu_started + helpers_cpu_s, 3),
        processes=used,
    )
    log.info("staging.stage_in.done", dest=str(dest), sources=len(sources), **stats.as_dict())
    return stats


def _process_plan(resolve: Resolver, settings: StagingSettings, *, files: int, batches: int) -> plan.ProcessPlan:
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


def share_settings(settings: StagingSettings, processes: int) -> StagingSettings:
    """One process's share of the staging budgets: threads, memory and bandwidth are per VM, not per process."""
    cap = settings.bandwidth_cap_bytes_per_s
    return settings.model_copy(
        update={
            "max_concurrency": -(-settings.max_concurrency // processes),
            "memory_budget_bytes": max(READ_BUFFER_BYTES, settings.memory_budget_bytes // processes),
            "bandwidth_cap_bytes_per_s": max(1, cap // processes) if cap else 0,
        }
    )


def chunk_size(total_bytes: int, settings: StagingSettings) -> int:
    """The ranged-read size: ``settings.chunk_size_bytes`` at least, larger when the staging is big enough that
    files alone give every thread :data:`UNITS_PER_THREAD` units (a 1 GiB staging on 16 threads reads 16 MiB
    files whole; a 2 GiB file among them is still split)."""
    per_unit = -(-total_bytes // (settings.max_concurrency * UNITS_PER_THREAD))
    return max(settings.chunk_size_bytes, per_unit)


def _read_manifest(path: Path, dest: Path) -> dict[str, plan.ManifestEntry]:
    """Entries of a previous staging whose file is still on disk with the recorded size (last entry wins)."""
    entries: dict[str, plan.ManifestEntry] = {}
    try:
        with path.open("r", encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    raw = json.loads(line)
                    entry = plan.ManifestEntry(str(raw["path"]), str(raw["etag"]), int(raw["size"]))
                    entries[entry.rel_path] = entry
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise errors.StorageError(f"{path}: cannot read the staging manifest ({exc.strerror})") from exc
    present: dict[str, plan.ManifestEntry] = {}
    for rel_path, entry in entries.items():
        try:
            st = os.stat(dest / rel_path)
        except (OSError, ValueError):
            continue
        if st.st_size == entry.size:
            present[rel_path] = entry
    return present


def _preflight(dest: Path, needed: int, min_free: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed + min_free > free:
        raise errors.StorageError(
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
        raise errors.StorageError(f"{dest}: cannot create directories ({exc.strerror})") from exc


class Recorder(Protocol):
    """Where a download run reports each file it verified and renamed into place."""

    def record(self, task: plan.FileTask) -> None: ...


class Counter(Protocol):
    """Where a download run counts the files and bytes it transferred."""

    def add(self, *, files: int, nbytes: int) -> None: ...


class Manifest:
    """Append-only JSON lines; flushed at most every second and at the end. A lost tail only costs refetches."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self._flushed_at = 0.0

    def __enter__(self) -> Manifest:
        try:
            self._fh = self._path.open("a", encoding="utf-8")
        except OSError as exc:
            raise errors.StorageError(f"{self._path}: cannot write the staging manifest ({exc.strerror})") from exc
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def record(self, task: plan.FileTask) -> None:
        self.record_entry(plan.ManifestEntry(task.rel_dest, task.obj.etag, task.size))

    def record_entry(self, entry: plan.ManifestEntry) -> None:
        line = json.dumps({"path": entry.rel_path, "etag": entry.etag, "size": entry.size}) + "\n"
        with self._lock:
            assert self._fh is not None
            self._fh.write(line)
            now = time.monotonic()
            if now - self._flushed_at >= 1.0:
                self._fh.flush()
                self._flushed_at = now


class ProgressTracker:
    """Counts files and bytes done from many threads; calls ``callback`` at most every ``PROGRESS_INTERVAL_S``
    (and once at ``finish``). Shared by staging, publishing and ingest."""

    def __init__(
        self, files_total: int, bytes_total: int, started: float, callback: Callable[[Progress], None] | None
    ) -> None:
        self._files_total = files_total
        self._bytes_total = bytes_total
        self._started = started
        self._callback = callback
        self._lock = threading.Lock()
        self._files = 0
        self._bytes = 0
        self._reported_at = 0.0

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

    def finish(self) -> None:
        if self._callback is not None:
            with self._lock:
                snapshot = self._snapshot(time.monotonic())
            self._callback(snapshot)

    def _snapshot(self, now: float) -> Progress:
        return Progress(self._files, self._files_total, self._bytes, self._bytes_total, now - self._started)


class Throttle:
    """A shared bandwidth cap: each read reserves its bytes on a timeline advancing at ``rate`` bytes/s (0: no
    cap). Shared by staging, publishing and ingest."""

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


class _HashingSink:
    """A file sink that feeds an MD5 as bytes pass (files read whole verify without reading back).

    A store that retries after part of a body arrived rewinds the sink to where the read started (position 0):
    the hash restarts with it. ``md5`` is None if the sink was rewound anywhere else (then read the file back).
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.md5: Any = hashlib.md5(usedforsecurity=False)
        self._hashed = 0

    def write(self, data: bytes) -> int:
        if self.md5 is not None:
            self.md5.update(data)
            self._hashed += len(data)
        return self._fh.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._fh.seek(offset, whence)
        if position == 0:
            self.md5, self._hashed = hashlib.md5(usedforsecurity=False), 0
        elif position != self._hashed:
            self.md5 = None
        return position

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


class _StoppableSink:
    """A file sink whose writes raise ``StagingCancelled`` once ``should_stop()`` holds: a cancelled staging does
    not wait for a large file's read to end (the store lets errors of its sink through unretried)."""

    def __init__(self, fh: BinaryIO, should_stop: Callable[[], bool]) -> None:
        self._fh = fh
        self._should_stop = should_stop

    def write(self, data: bytes) -> int:
        if self._should_stop():
            raise errors.StagingCancelled("staging cancelled during a read")
        return self._fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@dataclass(slots=True)
class _ChunkedFile:
    """A large file fetched as several ranged reads; the last read to finish verifies and renames it."""

    task: plan.FileTask
    remaining: int
    lock: threading.Lock


@dataclass(frozen=True, slots=True)
class _Unit:
    task: plan.FileTask
    chunk: plan.Chunk | None  # None: the whole file in one read
    shared: _ChunkedFile | None


class DownloadRun:
    """One process's threads over units of work (a whole file, or a chunk of a large one); the first failure
    stops the run (reads in flight finish) and is re-raised by :meth:`execute`."""

    def __init__(
        self,
        *,
        stores: Sequence[base.ObjectStore],
        dest: Path,
        settings: StagingSettings,
        manifest: Recorder,
        progress: Counter,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self._stores = stores
        self._should_stop = should_stop
        self._dest = dest
        self._settings = settings
        self._manifest = manifest
        self._progress = progress
        self._throttle = Throttle(settings.bandwidth_cap_bytes_per_s)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._threads_allowed = settings.max_concurrency

    def reshare(self, *, threads: int, rate_bytes_per_s: int) -> None:
        """Run on fewer threads (those over the limit end after their current unit) and a lower bandwidth cap:
        helper processes have taken their share of the budgets."""
        self._threads_allowed = max(1, threads)
        self._throttle.set_rate(rate_bytes_per_s)

    def execute(self, tasks: Iterable[plan.FileTask], *, n_units: int) -> None:
        """Fetch ``tasks`` (read lazily, under a lock, as threads free up) on at most ``n_units`` threads."""
        units = self._units(tasks)
        by_memory = max(1, self._settings.memory_budget_bytes // READ_BUFFER_BYTES)
        n_threads = max(1, min(self._settings.max_concurrency, by_memory, n_units))
        if n_units == 0:
            return
        threads = [_thread_in_context(self._work, units, i, name=f"stage-{i}") for i in range(1, n_threads)]
        for thread in threads:
            thread.start()
        self._work(units, 0)
        for thread in threads:
            thread.join()
        if self._failure is not None:
            raise self._failure

    def _units(self, tasks: Iterable[plan.FileTask]) -> Iterator[_Unit]:
        for task in tasks:
            if len(task.chunks) <= 1:
                yield _Unit(task, None, None)
                continue
            part = self._part_path(task)
            with _local_io(part), part.open("wb") as fh:
                fh.truncate(task.size)
            shared = _ChunkedFile(task, len(task.chunks), threading.Lock())
            for chunk in task.chunks:
                yield _Unit(task, chunk, shared)

    def _work(self, units: Iterator[_Unit], index: int) -> None:
        while True:
            with self._lock:
                if self._failure is not None or index >= self._threads_allowed:
                    return
                if self._should_stop is not None and self._should_stop():
                    self._failure = errors.StagingCancelled("staging cancelled before its end")
                    return
                try:
                    unit = next(units)
                except StopIteration:
                    return
                except BaseException as exc:
                    self._failure = exc
                    return
            try:
                self._run_unit(unit)
            except BaseException as exc:
                with self._lock:
                    if self._failure is None:
                        self._failure = exc
                return

    def _run_unit(self, unit: _Unit) -> None:
        task = unit.task
        store = self._stores[task.source]
        part = self._part_path(task)
        if unit.chunk is None:
            self._throttle.take(task.size)
            with _local_io(part), part.open("wb") as fh:
                check_md5 = self._settings.verify_md5 and task.obj.content_md5 is not None
                guarded = self._guard(fh)
                sink: BinaryIO = _HashingSink(guarded) if check_md5 else guarded  # type: ignore[assignment]
                got = store.read_into(task.obj, sink) if task.size else 0
            _check_size(task, got, task.size, part)
            if isinstance(sink, _HashingSink):
                if sink.md5 is None:
                    self._verify_whole(task, part)
                else:
                    _check_md5(task, sink.md5.digest(), part)
            self._finish(task, part)
            self._progress.add(files=1, nbytes=task.size)
            return
        assert unit.shared is not None
        chunk = unit.chunk
        self._throttle.take(chunk.length)
        with _local_io(part), part.open("r+b") as fh:
            fh.seek(chunk.offset)
            got = store.read_into(task.obj, self._guard(fh), offset=chunk.offset, length=chunk.length)
        _check_size(task, got, chunk.length, part, chunk=chunk)
        with unit.shared.lock:
            unit.shared.remaining -= 1
            last = unit.shared.remaining == 0
        if last:
            self._verify_whole(task, part)
            self._finish(task, part)
        self._progress.add(files=1 if last else 0, nbytes=chunk.length)

    def _guard(self, fh: BinaryIO) -> BinaryIO:
        """``fh``, or a sink that stops the read at its next write once ``should_stop`` says so."""
        if self._should_stop is None:
            return fh
        return _StoppableSink(fh, self._should_stop)  # type: ignore[return-value]

    def _verify_whole(self, task: plan.FileTask, part: Path) -> None:
        with _local_io(part):
            size = os.stat(part).st_size
        _check_size(task, size, task.size, part)
        if self._settings.verify_md5 and task.obj.content_md5 is not None:
            with _local_io(part), part.open("rb") as fh:
                digest = hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).digest()
            _check_md5(task, digest, part)

    def _finish(self, task: plan.FileTask, part: Path) -> None:
        with _local_io(part):
            os.replace(part, self._dest / task.rel_dest)
        self._manifest.record(task)

    def _part_path(self, task: plan.FileTask) -> Path:
        return self._dest / (task.rel_dest + plan.PART_SUFFIX)


def _check_size(
    task: plan.FileTask, got: int, expected: int, part: Path, *, chunk: plan.Chunk | None = None
) -> None:
    if got != expected:
        where = f" (bytes {chunk.offset}-{chunk.offset + chunk.length - 1})" if chunk else ""
        part.unlink(missing_ok=True)
        raise errors.IntegrityError(f"{task.obj.uri}{where}: expected {expected:,} bytes, got {got:,}")


def _check_md5(task: plan.FileTask, digest: bytes, part: Path) -> None:
    if digest != task.obj.content_md5:
        part.unlink(missing_ok=True)
        raise errors.IntegrityError(f"{task.obj.uri}: Content-MD5 mismatch (the bytes received are corrupt)")


@contextlib.contextmanager
def _local_io(path: Path) -> Iterator[None]:
    """Local disk failures (full, read-only, permissions) become ``StorageError`` naming the file."""
    try:
        yield
    except errors.ScalebusError:
        raise
    except OSError as exc:
        raise errors.StorageError(f"{path}: local disk error ({exc.strerror or type(exc).__name__})") from exc


# --------------------------------------------------------------------------------------------- publish


def publish(
    resolve: Resolver,
    source_dir: Path,
    dest_uri: str,
    settings: StagingSettings,
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> StageStats:
    """Upload every file under ``source_dir`` to ``dest_uri``, then write ``_SUCCESS`` (JSON file list) last.

    If ``_SUCCESS`` is already there the outputs were committed by an earlier delivery: nothing is uploaded.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    store = resolve(dest_uri)
    prefix = dest_uri.rstrip("/") + "/"
    marker_uri = prefix + MARKER_NAME
    if store.exists(marker_uri):
        stats = StageStats(0, 0, 0, 0, time.monotonic() - started, already_published=True)
        log.info("staging.publish.already_committed", dest=dest_uri)
        return stats
    files = _local_files(source_dir)
    if any(rel == MARKER_NAME for rel, _size in files):
        raise errors.UnsafePathError(
            f"{source_dir / MARKER_NAME}: reserved for the commit marker; rename the output"
        )
    total = sum(size for _rel, size in files)
    progress = ProgressTracker(len(files), total, started, on_progress)
    throttle = Throttle(settings.bandwidth_cap_bytes_per_s)

    def upload(item: tuple[str, int]) -> None:
        rel, size = item
        throttle.take(size)
        store.write_file(source_dir / rel, prefix + urllib.parse.quote(rel))
        progress.add(files=1, nbytes=size)

    run_parallel(upload, files, max_workers=settings.max_concurrency)
    marker = {
        "files": [{"path": rel, "size": size} for rel, size in files],
        "bytes": total,
        "committed_at": time.time(),
    }
    store.write_bytes(json.dumps(marker, indent=1).encode(), marker_uri)
    progress.finish()
    stats = StageStats(
        len(files), total, 0, 0, time.monotonic() - started, cpu_s=round(time.process_time() - cpu_started, 3)
    )
    log.info("staging.publish.done", dest=dest_uri, **stats.as_dict())
    return stats


def _local_files(root: Path) -> list[tuple[str, int]]:
    """(rel path, size) of every regular file under ``root``, sorted; names checked like downloads."""
    found: list[tuple[str, int]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if not os.path.isfile(full):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if rel == plan.MANIFEST_NAME:
                    continue  # outputs staged in place carry the staging manifest; it is not an output
                plan.check_rel_path(rel)
                found.append((rel, os.stat(full).st_size))
    except OSError as exc:
        raise errors.StorageError(f"{root}: cannot read outputs ({exc.strerror})") from exc
    if not root.is_dir():
        raise errors.StorageError(f"{root}: output directory does not exist")
    return found


def run_parallel(fn: Callable[[T], None], items: Sequence[T], *, max_workers: int) -> None:
    """Run ``fn`` over ``items`` on at most ``max_workers`` threads; stop at and re-raise the first failure."""
    lock = threading.Lock()
    iterator = iter(items)
    failure: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if failure:
                    return
                item = next(iterator, None)
            if item is None:
                return
            try:
                fn(item)
            except BaseException as exc:
                with lock:
                    failure.append(exc)
                return

    threads = [_thread_in_context(work) for _ in range(max(0, min(max_workers, len(items)) - 1))]
    for thread in threads:
        thread.start()
    work()
    for thread in threads:
        thread.join()
    if failure:
        raise failure[0]


def _thread_in_context(target: Callable[..., None], *args: object, name: str | None = None) -> threading.Thread:
    """A daemon thread that runs with a copy of the caller's context, so its log lines carry the job's bound
    ``job_id`` / ``message_id`` / ``instance_id`` (a new thread otherwise starts with an empty context)."""
    context = contextvars.copy_context()
    return threading.Thread(target=context.run, args=(target, *args), name=name, daemon=True)
