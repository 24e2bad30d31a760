"""One process's download of planned files: bounded threads over units of work, each file verified on disk.

A *unit* is a whole small file or one ranged chunk of a large one, so concurrency is bounded across files and
within them. Each file is streamed to a short temporary name beside it (:func:`scalebus.transfer.plan.temp_name`),
its size (always) and Content-MD5 (when the store has one)
are checked, and it is renamed into place; only then is it reported to the :class:`Recorder` (the resume
manifest, or a helper's report to the staging process). A file fetched whole is hashed while it streams; one
fetched in chunks is read back once its last chunk is in.

With an input cache (:class:`scalebus.transfer.kit.InputCache`, only in the staging process: helpers run without
one) each file is first offered a cached copy, placed instead of fetched, and each fetched file is offered to it
once in place. The per-file path is plain strings and ``os`` calls: a staging of a million small files spends
most of its time here.

Memory stays within ``StagingSettings.memory_budget_bytes``: stores stream into the file sink and buffer at most
:data:`READ_BUFFER_BYTES` per read in flight, and the run never has more reads in flight than the budget covers.
Transient failures are retried inside the store adapters, so nothing here retries. A failure of this machine's
own disk (full, read-only, I/O error) is a :class:`~scalebus.errors.LocalDiskError` wherever it happens, even
inside a store's read (the sink is wrapped): never taken for a failure of the source.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from scalebus import checksums, errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import kit, plan

READ_BUFFER_BYTES = 1024 * 1024
"""Most a store buffers in memory for one ``read_into`` call (the Azure adapter streams every GET through one
buffer of this size, the folder store copies in pieces); the pool is sized so that reads in flight × this stays
within the memory budget."""


class Recorder(Protocol):
    """Where a download run reports each file it verified and renamed into place."""

    def record(self, task: plan.FileTask) -> None: ...


class Counter(Protocol):
    """Where a download run counts the files and bytes it transferred."""

    def add(self, *, files: int, nbytes: int) -> None: ...


@dataclass(slots=True)
class _ChunkedFile:
    """A large file fetched as several ranged reads; the last read to finish verifies and renames it."""

    task: plan.FileTask
    remaining: int
    lock: threading.Lock


@dataclass(frozen=True, slots=True)
class _Window:
    """Where the current window of :meth:`DownloadRun._adapt_threads` started."""

    started: float
    cpu: float
    units: int
    nbytes: int


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
        cache: kit.InputCache | None = None,
    ) -> None:
        self._stores = stores
        self._should_stop = should_stop
        self._root = os.path.join(os.fspath(dest), "")
        self._cache = cache
        self._lock = threading.Lock()
        self.cached_files = 0
        self.cached_bytes = 0
        self.first_byte_at: float | None = None
        """``time.monotonic()`` when this run first wrote a byte (``None``: not yet)."""
        self._settings = settings
        self._manifest = manifest
        self._progress = progress
        self._throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)
        self._threads_allowed = settings.max_concurrency
        # How many threads fetch, adapted to the source (plan.next_threads).
        self._fetching = plan.ThreadCount(min(plan.THREADS_START, settings.max_concurrency))
        self._adapting = threading.Lock()
        self._window = _Window(time.monotonic(), time.process_time(), 0, 0)
        self._units_done = 0  # approximate: counted without a lock, read only to adapt the thread count
        self._bytes_done = 0

    def reshare(self, *, threads: int, rate_bytes_per_s: int) -> None:
        """Run on fewer threads (those over the limit end after their current unit) and a lower bandwidth cap:
        helper processes have taken their share of the budgets."""
        self._threads_allowed = max(1, threads)
        self._throttle.set_rate(rate_bytes_per_s)

    def execute(self, tasks: Iterable[plan.FileTask], *, n_units: int) -> None:
        """Fetch ``tasks`` (read lazily, under a lock, as threads free up) on at most ``n_units`` threads."""
        if n_units == 0:
            return
        by_memory = max(1, self._settings.memory_budget_bytes // READ_BUFFER_BYTES)
        kit.run_parallel(
            self._run_unit,
            self._units(tasks),
            max_workers=max(1, min(self._settings.max_concurrency, by_memory, n_units)),
            threads_allowed=lambda: min(self._threads_allowed, self._fetching.threads),
            check=self._check_cancelled,
            name="stage",
            park_s=plan.THREADS_WINDOW_S,
        )

    def _adapt_threads(self, nbytes: int) -> None:
        """Count a finished unit; once a window is over, let :func:`plan.next_threads` decide how many threads
        fetch (those over the count wait, and resume if it grows)."""
        self._units_done += 1
        self._bytes_done += nbytes
        now = time.monotonic()
        window = self._window
        if now - window.started < plan.THREADS_WINDOW_S or not self._adapting.acquire(blocking=False):
            return
        try:
            cpu = time.process_time()
            units, nbytes = self._units_done - window.units, self._bytes_done - window.nbytes
            seconds = max(now - window.started, 1e-6)
            self._fetching = plan.next_threads(
                self._fetching,
                most=self._settings.max_concurrency,
                cpu_cores=(cpu - window.cpu) / seconds,
                units=units,
                nbytes=nbytes,
                seconds=seconds,
            )
            self._window = _Window(now, cpu, self._units_done, self._bytes_done)
        finally:
            self._adapting.release()

    def _check_cancelled(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise errors.StagingCancelled("staging cancelled before its end")

    def _units(self, tasks: Iterable[plan.FileTask]) -> Iterator[_Unit]:
        most = self._settings.max_concurrency
        for task in tasks:
            if task.size >= plan.SMALL_UNIT_BYTES and self._fetching.threads < most:
                self._fetching = plan.ThreadCount(most)  # large reads: every thread, from the start
            if len(task.chunks) <= 1:
                yield _Unit(task, None, None)
                continue
            # A file read in chunks asks the cache here, under the hand-out lock: a link is cheap, and a file
            # this large is rare enough that a copy holding up other threads' next unit costs little.
            if self._place_cached(task):
                continue
            part = self._part_path(task)
            try:
                with open_part(part, truncate=True) as fh:
                    fh.truncate(task.size)
            except OSError as exc:
                raise local_disk_error(part, exc) from exc
            shared = _ChunkedFile(task, len(task.chunks), threading.Lock())
            for chunk in task.chunks:
                yield _Unit(task, chunk, shared)

    def _run_unit(self, unit: _Unit) -> None:
        if unit.chunk is None:
            if not self._place_cached(unit.task):
                self._run_whole(unit.task)
            self._adapt_threads(unit.task.size)
        else:
            assert unit.shared is not None
            self._run_chunk(unit.task, unit.chunk, unit.shared)
            self._adapt_threads(unit.chunk.length)

    def _place_cached(self, task: plan.FileTask) -> bool:
        """Whether the cache placed a verified copy of ``task``'s file (then it is recorded like a download)."""
        if self._cache is None or not self._cache.place(task.obj, Path(self._root + task.rel_dest)):
            return False
        with self._lock:
            self.cached_files += 1
            self.cached_bytes += task.size
        self._manifest.record(task)
        self._progress.add(files=1, nbytes=task.size)
        return True

    def _run_whole(self, task: plan.FileTask) -> None:
        store = self._stores[task.source]
        part = self._part_path(task)
        self._throttle.take(task.size)
        check_md5 = self._settings.verify_md5 and task.obj.content_md5 is not None
        try:
            with open_part(part, truncate=True) as fh:
                guarded = self._guard(_DiskSink(fh, part, self))  # type: ignore[arg-type]
                sink: BinaryIO = _HashingSink(guarded) if check_md5 else guarded  # type: ignore[assignment]
                got = store.read_into(task.obj, sink) if task.size else 0
        except errors.ScalebusError:
            raise
        except OSError as exc:
            raise local_disk_error(part, exc) from exc
        _check_size(task, got, task.size, part)
        if isinstance(sink, _HashingSink):
            if sink.md5 is None:
                self._verify_whole(task, part)
            else:
                _check_md5(task, sink.md5.digest(), part)
        self._finish(task, part)
        self._progress.add(files=1, nbytes=task.size)

    def _run_chunk(self, task: plan.FileTask, chunk: plan.Chunk, shared: _ChunkedFile) -> None:
        store = self._stores[task.source]
        part = self._part_path(task)
        self._throttle.take(chunk.length)
        with local_io(part), open_part(part, truncate=False) as fh:
            fh.seek(chunk.offset)
            sink = self._guard(_DiskSink(fh, part, self))  # type: ignore[arg-type]
            got = store.read_into(task.obj, sink, offset=chunk.offset, length=chunk.length)
        _check_size(task, got, chunk.length, part, chunk=chunk)
        with shared.lock:
            shared.remaining -= 1
            last = shared.remaining == 0
        if last:
            self._verify_whole(task, part)
            self._finish(task, part)
        self._progress.add(files=1 if last else 0, nbytes=chunk.length)

    def _guard(self, fh: BinaryIO) -> BinaryIO:
        """``fh``, or a sink that stops the read at its next write once ``should_stop`` says so."""
        if self._should_stop is None:
            return fh
        return _StoppableSink(fh, self._should_stop)  # type: ignore[return-value]

    def _verify_whole(self, task: plan.FileTask, part: str) -> None:
        with local_io(part):
            size = os.stat(part).st_size
        _check_size(task, size, task.size, part)
        if self._settings.verify_md5 and task.obj.content_md5 is not None:
            with local_io(part):
                digest = checksums.file_md5(Path(part))
            _check_md5(task, digest, part)

    def _finish(self, task: plan.FileTask, part: str) -> None:
        final = self._root + task.rel_dest
        try:
            os.replace(part, final)
        except OSError as exc:
            raise local_disk_error(part, exc) from exc
        self._manifest.record(task)
        if self._cache is not None:
            self._cache.keep(task.obj, Path(final))

    def _part_path(self, task: plan.FileTask) -> str:
        return self._root + plan.temp_name(task.rel_dest)

    def wrote_first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()


def part_path(dest: Path, task: plan.FileTask) -> Path:
    """Where ``task`` is written under ``dest`` until it is verified and renamed into place."""
    return dest / plan.temp_name(task.rel_dest)


def open_part(part: str | Path, *, truncate: bool) -> BinaryIO:
    """The temporary file, opened without following a symlink planted in its place; created with mode 0666
    less the umask (never a source's mode)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    fd = os.open(part, flags, 0o666)
    return os.fdopen(fd, "r+b", buffering=0)


class _DiskSink:
    """A local file sink whose write failures are :class:`~scalebus.errors.LocalDiskError` (or another of our
    errors): a store reading into it then cannot report them as a failed read of its source."""

    def __init__(self, fh: BinaryIO, path: str, run: DownloadRun) -> None:
        self._fh = fh
        self._path = path
        self._run: DownloadRun | None = run

    def write(self, data: bytes) -> int:
        if self._run is not None:
            self._run.wrote_first_byte()
            self._run = None
        try:
            return _write_all(self._fh, data)
        except OSError as exc:
            raise local_disk_error(self._path, exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _write_all(fh: BinaryIO, data: bytes) -> int:
    view = memoryview(data)
    while view:
        written = fh.write(view)
        if not written:
            raise OSError(errno.EIO, "short write")
        view = view[written:]
    return len(data)


class _HashingSink:
    """A file sink that feeds an MD5 as bytes pass (files read whole verify without reading back).

    A store that retries after part of a body arrived rewinds the sink to where the read started (position 0):
    the hash restarts with it. ``md5`` is None if the sink was rewound anywhere else (then read the file back).
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.md5: Any = checksums.new_md5()
        self._hashed = 0

    def write(self, data: bytes) -> int:
        if self.md5 is not None:
            self.md5.update(data)
            self._hashed += len(data)
        return self._fh.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._fh.seek(offset, whence)
        if position == 0:
            self.md5, self._hashed = checksums.new_md5(), 0
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


def _check_size(
    task: plan.FileTask, got: int, expected: int, part: str, *, chunk: plan.Chunk | None = None
) -> None:
    if got != expected:
        where = f" (bytes {chunk.offset}-{chunk.offset + chunk.length - 1})" if chunk else ""
        _unlink(part)
        raise errors.IntegrityError(f"{task.obj.uri}{where}: expected {expected:,} bytes, got {got:,}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_md5(task: plan.FileTask, digest: bytes, part: str) -> None:
    if digest != task.obj.content_md5:
        _unlink(part)
        raise errors.IntegrityError(f"{task.obj.uri}: Content-MD5 mismatch (the bytes received are corrupt)")


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
"""Errors of the local disk itself: full, over quota, failing, read-only."""


def local_disk_error(path: str | Path, exc: OSError) -> errors.ScalebusError:
    """Our error for a local file operation on ``path`` that failed: the disk's own failures are
    ``LocalDiskError``; a symlink met where none may be is ``UnsafePathError``; anything else (permissions, a
    missing directory) is ``StorageError``."""
    what = exc.strerror or type(exc).__name__
    if exc.errno in DISK_ERRNOS:
        return errors.LocalDiskError(f"{path}: local disk error ({what})")
    if exc.errno == errno.ELOOP:
        return errors.UnsafePathError(f"{path}: is a symlink; refusing to write through it")
    return errors.StorageError(f"{path}: local file error ({what})")


@contextlib.contextmanager
def local_io(path: str | Path) -> Iterator[None]:
    """Local file failures become our errors naming the file (:func:`local_disk_error`)."""
    try:
        yield
    except errors.ScalebusError:
        raise
    except OSError as exc:
        raise local_disk_error(path, exc) from exc
