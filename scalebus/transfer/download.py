"""One process's download of planned files: bounded threads over units of work, each file verified on disk.

A *unit* is a whole small file or one ranged chunk of a large one, so concurrency is bounded across files and
within them. Each file is streamed to a short temporary name beside it (:func:`scalebus.transfer.plan.temp_name`),
its size (always) and Content-MD5 (when the store has one)
are checked, and it is renamed into place; only then is it reported to the :class:`Recorder` (the resume
manifest, or a helper's report to the staging process). A file fetched whole is hashed while it streams; one
fetched in chunks is read back once its last chunk is in.

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
        self._throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)
        self._threads_allowed = settings.max_concurrency

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
            threads_allowed=lambda: self._threads_allowed,
            check=self._check_cancelled,
            name="stage",
        )

    def _check_cancelled(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise errors.StagingCancelled("staging cancelled before its end")

    def _units(self, tasks: Iterable[plan.FileTask]) -> Iterator[_Unit]:
        for task in tasks:
            if len(task.chunks) <= 1:
                yield _Unit(task, None, None)
                continue
            part = self._part_path(task)
            with local_io(part), open_part(part, truncate=True) as fh:
                fh.truncate(task.size)
            shared = _ChunkedFile(task, len(task.chunks), threading.Lock())
            for chunk in task.chunks:
                yield _Unit(task, chunk, shared)

    def _run_unit(self, unit: _Unit) -> None:
        if unit.chunk is None:
            self._run_whole(unit.task)
        else:
            assert unit.shared is not None
            self._run_chunk(unit.task, unit.chunk, unit.shared)

    def _run_whole(self, task: plan.FileTask) -> None:
        store = self._stores[task.source]
        part = self._part_path(task)
        self._throttle.take(task.size)
        with local_io(part), open_part(part, truncate=True) as fh:
            check_md5 = self._settings.verify_md5 and task.obj.content_md5 is not None
            guarded = self._guard(_DiskSink(fh, part))  # type: ignore[arg-type]
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

    def _run_chunk(self, task: plan.FileTask, chunk: plan.Chunk, shared: _ChunkedFile) -> None:
        store = self._stores[task.source]
        part = self._part_path(task)
        self._throttle.take(chunk.length)
        with local_io(part), open_part(part, truncate=False) as fh:
            fh.seek(chunk.offset)
            sink = self._guard(_DiskSink(fh, part))  # type: ignore[arg-type]
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

    def _verify_whole(self, task: plan.FileTask, part: Path) -> None:
        with local_io(part):
            size = os.stat(part).st_size
        _check_size(task, size, task.size, part)
        if self._settings.verify_md5 and task.obj.content_md5 is not None:
            with local_io(part):
                digest = checksums.file_md5(part)
            _check_md5(task, digest, part)

    def _finish(self, task: plan.FileTask, part: Path) -> None:
        with local_io(part):
            os.replace(part, self._dest / task.rel_dest)
        self._manifest.record(task)

    def _part_path(self, task: plan.FileTask) -> Path:
        return part_path(self._dest, task)


def part_path(dest: Path, task: plan.FileTask) -> Path:
    """Where ``task`` is written under ``dest`` until it is verified and renamed into place."""
    return dest / plan.temp_name(task.rel_dest)


def open_part(part: Path, *, truncate: bool) -> BinaryIO:
    """The temporary file, opened without following a symlink planted in its place; created with mode 0666
    less the umask (never a source's mode)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    fd = os.open(part, flags, 0o666)
    return os.fdopen(fd, "r+b", buffering=0)


class _DiskSink:
    """A local file sink whose write failures are :class:`~scalebus.errors.LocalDiskError` (or another of our
    errors): a store reading into it then cannot report them as a failed read of its source."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self._fh = fh
        self._path = path

    def write(self, data: bytes) -> int:
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


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
"""Errors of the local disk itself: full, over quota, failing, read-only."""


def local_disk_error(path: Path, exc: OSError) -> errors.ScalebusError:
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
def local_io(path: Path) -> Iterator[None]:
    """Local file failures become our errors naming the file (:func:`local_disk_error`)."""
    try:
        yield
    except errors.ScalebusError:
        raise
    except OSError as exc:
        raise local_disk_error(path, exc) from exc
