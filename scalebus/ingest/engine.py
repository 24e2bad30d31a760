"""The ingest engine: copy what :mod:`scalebus.ingest.plan` says from an object source into an object store.

``ingest`` plans while three things overlap: the source lists on one thread (prefetched up to
:data:`PREFETCH_OBJECTS` ahead), and another indexes the local record (:mod:`scalebus.ingest.journal`) and then
marks what the destination's listing holds; the plan consumes the source listing as it streams, holding only
what it must copy. Then a fixed pool of ``max_concurrency`` threads copies. Where the source can hand out a URL
and the destination can fetch one (S3 → ADLS: a presigned GET read by Put Block From URL), the bytes go store to
store without passing through this machine; where the service cannot (Azurite, S3-compatible stores Azure cannot
reach), the run streams instead: each object from the source into a temporary file in the scratch folder (sources
buffer at most one block per read, so memory stays near ``max_concurrency`` × 1 MiB whatever the object sizes;
scratch disk holds at most ``max_concurrency`` objects), checked (size always; MD5 where the listing has one —
the S3 source checks its own ETags while streaming) and handed to ``store.write_file``. Objects up to
:data:`IN_MEMORY_BYTES` skip the disk and go through ``write_bytes``. Only then is the object recorded.

Recording an object appends one line to the local journal before the next object is taken, so a run killed
outright loses nothing that finished. One thread (:class:`_Compactor`) compacts the journal and uploads it as
the destination's manifest every ``checkpoint_interval_s`` (less often when that is slow:
:func:`checkpoint_interval`), and the run does at its end and when it fails; copy threads never rewrite it. A rerun
on the same machine resumes from the journal; elsewhere, from the destination's manifest. Nothing here retries:
S3 requests are retried by botocore (:mod:`scalebus.backends.aws.s3`), destination writes by the adapters; a
failure that survives them stops the run (the first error wins) once the manifest is saved, and the next run
resumes. The thread pool, the bandwidth cap and the progress counting are staging's (:mod:`scalebus.transfer.kit`).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from scalebus import checksums, errors
from scalebus.backends import base
from scalebus.ingest import journal, plan
from scalebus.settings import IngestSettings
from scalebus.transfer import kit

log = structlog.get_logger(__name__)

IN_MEMORY_BYTES = 1024 * 1024
"""Objects up to this size are held in memory instead of a scratch file (no file to create and delete)."""
CHECKPOINT_SHARE = 0.05
"""Most of a run's time spent compacting and uploading the manifest: with a million entries that takes seconds,
so the interval between compactions grows to keep them within this share (``checkpoint_interval_s`` is the
least)."""
JOURNAL_FOLDER = "scalebus-ingest-journal"
HEADER_BYTES = 64 * 1024
"""Most of the destination's manifest read to learn its generation (its first line)."""
PREFETCH_OBJECTS = 100_000
"""Source objects listed ahead of planning while the record is indexed and the destination listed."""
PRESIGN_EXPIRES_S = 6 * 3600
"""Lifetime of the URL a server-side copy reads the source through."""
SERVER_SIDE_VERIFIED_MAX_BYTES = 100 * 1024 * 1024
"""Largest object with a known MD5 copied server-side: one block, whose MD5 the service checks as it reads it
(Put Block From URL, ``x-ms-source-content-md5``). Larger ones are streamed, so their MD5 is still checked."""


@dataclass(frozen=True, slots=True)
class IngestStats:
    """What one run did. A dry run copies nothing: what it would copy is ``would_copy``."""

    copied_files: int
    copied_bytes: int
    skipped_files: int
    skipped_bytes: int
    seconds: float
    dry_run: bool = False
    refused: list[dict[str, str]] = field(default_factory=list)
    """``{"path", "reason"}`` for each object whose name could not land safely (not copied)."""
    deleted_at_source: int = 0
    """Recorded objects the source no longer lists (left in place at the destination)."""
    would_copy: list[dict[str, Any]] = field(default_factory=list)
    """With ``dry_run``: ``{"path", "size", "reason"}`` for each object a run would copy."""

    @property
    def mb_per_s(self) -> float:
        return self.copied_bytes / 1e6 / self.seconds if self.seconds > 0 and not self.dry_run else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``-o json`` and log events."""
        data = asdict(self) | {"mb_per_s": round(self.mb_per_s, 3)}
        if not self.dry_run:
            del data["would_copy"]
        return data


def ingest(
    source: base.ObjectSource,
    src_uri: str,
    store: base.ObjectStore,
    dest_uri: str,
    settings: IngestSettings,
    *,
    dry_run: bool = False,
    on_progress: kit.OnProgress | None = None,
) -> IngestStats:
    """Copy every object under ``src_uri`` that is new or changed since the last run into ``dest_uri``."""
    started = time.monotonic()
    dest_prefix = dest_uri.rstrip("/") + "/"
    manifest_uri = dest_prefix + plan.MANIFEST_NAME
    folder = journal.folder_for(journal_root(settings), source=src_uri, dest=dest_prefix)
    with journal.Journal(folder, source=src_uri) as record:
        dest_generation = _sync_with_destination(record, store, manifest_uri)
        todo = _plan(source, src_uri, store, dest_uri, record)
        for refusal in todo.refused:
            log.warning("ingest.refused", path=refusal.rel_path, reason=refusal.reason)
        stats = _stats(todo, dry_run=dry_run)
        if not dry_run:
            _copy_all(todo, source, store, dest_prefix, settings, record, started, on_progress)
            if record.pending() or record.header().get("generation") != dest_generation:
                _publish(record, store, manifest_uri)
    stats = replace(stats, seconds=round(time.monotonic() - started, 3))
    summary = {k: v for k, v in stats.as_dict().items() if k not in ("refused", "would_copy")}
    log.info("ingest.done", source=src_uri, dest=dest_uri, refused_count=len(todo.refused), **summary)
    return stats


def journal_root(settings: IngestSettings) -> Path:
    """Where the local records of ingests live: ``ingest.state_dir``, else beside the scratch folder (the system
    temporary directory by default, so a reboot may lose them; the destination's manifest then serves)."""
    if settings.state_dir:
        return Path(settings.state_dir)
    return Path(settings.scratch_dir or tempfile.gettempdir()) / JOURNAL_FOLDER


def _stats(todo: plan.IngestPlan, *, dry_run: bool) -> IngestStats:
    return IngestStats(
        copied_files=0 if dry_run else len(todo.copy),
        copied_bytes=0 if dry_run else todo.copy_bytes,
        skipped_files=todo.skip_files,
        skipped_bytes=todo.skip_bytes,
        seconds=0.0,
        dry_run=dry_run,
        refused=[{"path": r.rel_path, "reason": r.reason} for r in todo.refused],
        deleted_at_source=todo.deleted_at_source,
        would_copy=[{"path": t.obj.rel_path, "size": t.obj.size, "reason": t.reason} for t in todo.copy]
        if dry_run
        else [],
    )


def _copy_all(
    todo: plan.IngestPlan,
    source: base.ObjectSource,
    store: base.ObjectStore,
    dest_prefix: str,
    settings: IngestSettings,
    record: journal.Journal,
    started: float,
    on_progress: kit.OnProgress | None,
) -> None:
    """Copy the plan's objects, appending each to the journal as it lands; compactions run on their own thread."""
    if not todo.copy:
        return
    manifest_uri = dest_prefix + plan.MANIFEST_NAME
    progress = kit.ProgressTracker(len(todo.copy), todo.copy_bytes, started, on_progress)
    compactor = _Compactor(record, store, manifest_uri, interval_s=settings.checkpoint_interval_s)
    copier = _Copier(source, store, dest_prefix, settings, record, progress)
    compactor.start()
    try:
        copier.run(todo.copy)
    except BaseException:
        compactor.stop()
        if record.pending():
            _publish_after_failure(record, store, manifest_uri)
        raise
    compactor.stop()
    progress.finish()


def _sync_with_destination(record: journal.Journal, store: base.ObjectStore, manifest_uri: str) -> str | None:
    """The generation of the destination's manifest (``None``: there is none). One written elsewhere, or by a
    version without a journal, replaces the local record, which is otherwise a superset of it."""
    try:
        found = list(store.list_files(manifest_uri))
    except errors.ObjectNotFoundError:
        return None
    if not found:
        return None
    head = io.BytesIO()
    store.read_into(found[0], head, length=min(found[0].size, HEADER_BYTES))
    first = head.getvalue().split(b"\n", 1)[0].decode("utf-8", "replace")
    generation = str(plan.parse_header(first).get("generation") or "")
    if generation and record.owns(generation):
        return generation
    log.debug("ingest.manifest_adopted", uri=manifest_uri, generation=generation or None)
    record.adopt(lambda fh: store.read_into(found[0], fh))
    return generation or None


def _plan(
    source: base.ObjectSource, src_uri: str, store: base.ObjectStore, dest_uri: str, record: journal.Journal
) -> plan.IngestPlan:
    """Index the record and mark what the destination holds on one thread while the source lists on another,
    then plan as the source listing streams in."""
    index = plan.ManifestIndex()

    def index_record_and_destination() -> None:
        index.load(record.lines())
        with contextlib.suppress(errors.ObjectNotFoundError):
            for obj in store.list_files(dest_uri):
                index.mark_present(obj.rel_path, obj.size)

    failures: list[BaseException] = []

    def indexer() -> None:
        try:
            index_record_and_destination()
        except BaseException as exc:
            failures.append(exc)

    thread = kit.thread_in_context(indexer, name="ingest-index")
    thread.start()
    listing = _Prefetch(lambda: source.list_files(src_uri), max_items=PREFETCH_OBJECTS)
    try:
        thread.join()
        if failures:
            raise failures[0]
        return plan.plan_ingest(listing, index=index)
    finally:
        listing.close()


class _Prefetch:
    """Iterates what ``produce()`` yields, produced on a thread of its own up to ``max_items`` ahead (in batches);
    the producer's error is raised where the consumer reaches it. :meth:`close` stops the producer."""

    _BATCH = 1000

    def __init__(self, produce: Callable[[], Iterable[Any]], *, max_items: int) -> None:
        self._queue: queue.Queue[list[Any] | BaseException | None] = queue.Queue(
            maxsize=max(1, max_items // self._BATCH)
        )
        self._stopped = threading.Event()
        self._thread = kit.thread_in_context(self._run, produce, name="ingest-list")
        self._thread.start()

    def _run(self, produce: Callable[[], Iterable[Any]]) -> None:
        try:
            batch: list[Any] = []
            for item in produce():
                batch.append(item)
                if len(batch) == self._BATCH:
                    if not self._put(batch):
                        return
                    batch = []
            if self._put(batch):
                self._put(None)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: list[Any] | BaseException | None) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()


def _publish(record: journal.Journal, store: base.ObjectStore, manifest_uri: str) -> None:
    """Compact the journal and upload the result as the destination's manifest."""
    if record.pending() or not record.base_path.exists():
        record.compact()
    store.write_file(record.base_path, manifest_uri)


def _publish_after_failure(record: journal.Journal, store: base.ObjectStore, manifest_uri: str) -> None:
    """Keep what finished before the failure at the destination too; the failure itself is what the caller
    reports (the local journal has every finished object either way)."""
    try:
        _publish(record, store, manifest_uri)
    except errors.ScalebusError as exc:
        log.warning("ingest.manifest_not_saved", uri=manifest_uri, error=str(exc))


class _Copier:
    """Copies tasks on at most ``max_concurrency`` threads, each object through one scratch file."""

    def __init__(
        self,
        source: base.ObjectSource,
        store: base.ObjectStore,
        dest_prefix: str,
        settings: IngestSettings,
        record: journal.Journal,
        progress: kit.ProgressTracker,
    ) -> None:
        self._source = source
        self._store = store
        self._dest_prefix = dest_prefix
        self._settings = settings
        self._record = record
        self._progress = progress
        self._throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)
        self._server_side = (
            _ServerSide.between(source, store, verify_md5=settings.verify_md5)
            if settings.server_side_copy
            else None
        )

    def run(self, tasks: Sequence[plan.CopyTask]) -> None:
        scratch_root = Path(self._settings.scratch_dir) if self._settings.scratch_dir else None
        try:
            if scratch_root is not None:
                scratch_root.mkdir(parents=True, exist_ok=True)
            scratch = tempfile.TemporaryDirectory(prefix="scalebus-ingest-", dir=scratch_root)
        except OSError as exc:
            raise errors.ConfigError(
                "ingest.scratch_dir",
                f"cannot create a folder in {scratch_root} ({exc.strerror})",
                "name a writable folder",
            ) from None
        with scratch:
            _check_scratch(Path(scratch.name), tasks, self._settings)
            kit.run_parallel(
                lambda task: self._copy(task, Path(scratch.name)),
                tasks,
                max_workers=self._settings.max_concurrency,
            )

    def _copy(self, task: plan.CopyTask, scratch: Path) -> None:
        obj = task.obj
        dest = self._dest_prefix + urllib.parse.quote(obj.rel_path)
        if self._server_side is not None and self._server_side.copy(obj, dest):
            pass  # the bytes went store to store; the bandwidth cap is for this machine's link
        elif obj.size <= IN_MEMORY_BYTES:
            self._throttle.take(obj.size)
            buffer = io.BytesIO()
            got = self._source.read_into(obj, buffer)
            self._verify(obj, got, lambda: checksums.bytes_md5(buffer.getvalue()))
            self._store.write_bytes(buffer.getvalue(), dest)
        else:
            self._throttle.take(obj.size)
            fd, name = tempfile.mkstemp(dir=scratch, suffix=".part")
            path = Path(name)
            try:
                try:
                    with os.fdopen(fd, "wb") as fh:
                        got = self._source.read_into(obj, fh)
                except OSError as exc:
                    raise errors.StorageError(f"scratch file for {obj.rel_path!r}: {exc.strerror}") from exc
                self._verify(obj, got, lambda: checksums.file_md5(path))
                self._store.write_file(path, dest)
            finally:
                path.unlink(missing_ok=True)
        self._record.append(
            plan.CopiedEntry(obj.rel_path, obj.etag, obj.size, modified_at=obj.modified_at, copied_at=time.time())
        )
        self._progress.add(files=1, nbytes=obj.size)
        log.debug("ingest.copied", path=obj.rel_path, size=obj.size, reason=task.reason)

    def _verify(self, obj: base.RemoteObject, got: int, md5: Callable[[], bytes]) -> None:
        if got != obj.size:
            raise errors.IntegrityError(f"{obj.uri}: read {got} bytes, the listing says {obj.size}")
        if self._settings.verify_md5 and obj.content_md5 is not None and md5() != obj.content_md5:
            raise errors.IntegrityError(f"{obj.uri}: MD5 does not match the listed Content-MD5")


@runtime_checkable
class UrlSource(Protocol):
    """A source that can hand out a URL another service may read an object from (S3: a presigned GET)."""

    def copy_source(self, obj: base.RemoteObject, *, expires_s: int) -> tuple[str, bytes | None]:
        """The URL, and the MD5 of the object's bytes when the source knows it (``None`` otherwise)."""


@runtime_checkable
class UrlDestination(Protocol):
    """A store that can have the service itself fetch an object from a URL (Azure: Put Block From URL)."""

    def copy_from_url(self, url: str, uri: str, *, size: int, content_md5: bytes | None) -> bool:
        """Copy ``size`` bytes from ``url`` to ``uri`` server-side; ``False`` when the service cannot (nothing
        was written). ``IntegrityError`` when the bytes did not match ``content_md5``."""


class _ServerSide:
    """Store-to-store copies where both ends allow them: after the first refusal the run streams instead."""

    def __init__(self, source: UrlSource, store: UrlDestination, *, verify_md5: bool) -> None:
        self._source = source
        self._store = store
        self._verify_md5 = verify_md5
        self._available = True
        self._lock = threading.Lock()

    @classmethod
    def between(
        cls, source: base.ObjectSource, store: base.ObjectStore, *, verify_md5: bool
    ) -> _ServerSide | None:
        if isinstance(source, UrlSource) and isinstance(store, UrlDestination):
            return cls(source, store, verify_md5=verify_md5)
        return None

    def copy(self, obj: base.RemoteObject, dest: str) -> bool:
        """Whether ``obj`` was copied server-side (``False``: stream it)."""
        if not self._available or obj.size == 0:
            return False
        url, md5 = self._source.copy_source(obj, expires_s=PRESIGN_EXPIRES_S)
        if not self._verify_md5:
            md5 = None
        elif md5 is not None and obj.size > SERVER_SIDE_VERIFIED_MAX_BYTES:
            return False  # streamed, so that its MD5 is still checked
        try:
            copied = self._store.copy_from_url(url, dest, size=obj.size, content_md5=md5)
        except errors.IntegrityError as exc:  # e.g. a KMS-encrypted object whose ETag is not its MD5
            log.info("ingest.server_side_mismatch", path=obj.rel_path, error=str(exc))
            return False
        if not copied:
            with self._lock:
                first, self._available = self._available, False
            if first:
                log.info("ingest.server_side_unavailable", dest=dest)
        return copied


def _check_scratch(scratch: Path, tasks: Sequence[plan.CopyTask], settings: IngestSettings) -> None:
    """Refuse a run whose objects in transit could not fit in the scratch folder (checked once, up front)."""
    in_transit = plan.scratch_needed(
        [task.obj.size for task in tasks], concurrency=settings.max_concurrency, in_memory_bytes=IN_MEMORY_BYTES
    )
    free = shutil.disk_usage(scratch).free
    if in_transit + settings.scratch_min_free_bytes > free:
        raise errors.ConfigError(
            "ingest.scratch_dir",
            f"{scratch.parent} has {free:,} bytes free, but the largest {settings.max_concurrency} objects in "
            f"transit need {in_transit:,} bytes plus {settings.scratch_min_free_bytes:,} kept free "
            "(ingest.scratch_min_free_bytes)",
            "point ingest.scratch_dir at a larger disk, or lower ingest.max_concurrency",
        )


def checkpoint_interval(interval_s: float, last_save_s: float) -> float:
    """Seconds until the next compaction: ``interval_s``, or longer when the last one took so long that
    compacting every ``interval_s`` would spend more than :data:`CHECKPOINT_SHARE` of the run on it. 0 asks for
    one as soon as anything new is recorded, whatever it costs, and gets it."""
    return max(interval_s, last_save_s / CHECKPOINT_SHARE) if interval_s > 0 else 0.0


class _Compactor:
    """The one thread that rewrites the record: every :func:`checkpoint_interval` while anything new was
    appended, it compacts the journal and uploads it as the destination's manifest. Copy threads only append."""

    _IDLE_S = 0.05

    def __init__(self, record: journal.Journal, store: base.ObjectStore, uri: str, *, interval_s: float) -> None:
        self._record = record
        self._store = store
        self._uri = uri
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = kit.thread_in_context(self._loop, name="ingest-compact")
        self.compactions = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        wait_s = self._interval_s
        seen = self._record.appended
        while not self._stop.wait(max(wait_s, self._IDLE_S)):
            if self._record.appended == seen:
                continue
            seen = self._record.appended
            began = time.monotonic()
            try:
                _publish(self._record, self._store, self._uri)
            except errors.ScalebusError as exc:  # the next compaction, or the run's end, tries again
                log.warning("ingest.compaction_failed", uri=self._uri, error=str(exc))
            self.compactions += 1
            wait_s = checkpoint_interval(self._interval_s, time.monotonic() - began)
