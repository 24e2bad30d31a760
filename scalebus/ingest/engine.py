"""The ingest engine: copy what :mod:`scalebus.ingest.plan` says from an object source into an object store.

``ingest`` lists the source, reads the destination's manifest and listing, plans, then copies on a fixed pool of
``max_concurrency`` threads. Each object streams from the source into a temporary file in the scratch folder
(sources buffer at most one block per read, so memory stays near ``max_concurrency`` × 1 MiB whatever the object
sizes; scratch disk holds at most ``max_concurrency`` objects), is checked (size always; MD5 where the listing
has one — the S3 source checks its own ETags while streaming) and handed to ``store.write_file``. Objects up to
:data:`IN_MEMORY_BYTES` skip the disk and go through ``write_bytes``. Only then is the object recorded.

The manifest is rewritten at the destination every ``checkpoint_interval_s`` while copying (less often when a
rewrite is slow: :func:`checkpoint_interval`), at the end, and when the run fails, so a rerun copies only what
the last run did not record. Nothing here retries: S3 requests are retried by botocore
(:mod:`scalebus.backends.aws.s3`), destination writes by the adapters; a failure that survives them stops the run
(the first error wins) once the manifest is saved, and the next run resumes. The thread pool, the bandwidth cap
and the progress counting are staging's (:mod:`scalebus.transfer.kit`).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from scalebus import checksums, errors
from scalebus.backends import base
from scalebus.ingest import plan
from scalebus.settings import IngestSettings
from scalebus.transfer import kit

log = structlog.get_logger(__name__)

IN_MEMORY_BYTES = 1024 * 1024
"""Objects up to this size are held in memory instead of a scratch file (no file to create and delete)."""
CHECKPOINT_SHARE = 0.05
"""Most of a run's time spent rewriting the manifest: with a million entries a rewrite takes seconds, so the
interval between checkpoints grows to keep them within this share (``checkpoint_interval_s`` is the least)."""


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
    listing = list(source.list_files(src_uri))
    dest_prefix = dest_uri.rstrip("/") + "/"
    manifest_uri = dest_prefix + plan.MANIFEST_NAME
    copied = _read_manifest(store, manifest_uri)
    todo = plan.plan_ingest(listing, copied=copied, present=_present(store, dest_uri))
    for refusal in todo.refused:
        log.warning("ingest.refused", path=refusal.rel_path, reason=refusal.reason)
    stats = IngestStats(
        copied_files=0 if dry_run else len(todo.copy),
        copied_bytes=0 if dry_run else todo.copy_bytes,
        skipped_files=len(todo.skip),
        skipped_bytes=todo.skip_bytes,
        seconds=0.0,
        dry_run=dry_run,
        refused=[{"path": r.rel_path, "reason": r.reason} for r in todo.refused],
        deleted_at_source=len(todo.deleted_at_source),
        would_copy=[{"path": t.obj.rel_path, "size": t.obj.size, "reason": t.reason} for t in todo.copy]
        if dry_run
        else [],
    )
    if todo.copy and not dry_run:
        checkpoint = _Checkpoint(store, manifest_uri, src_uri, copied, interval_s=settings.checkpoint_interval_s)
        progress = kit.ProgressTracker(len(todo.copy), todo.copy_bytes, started, on_progress)
        copier = _Copier(source, store, dest_prefix, settings, checkpoint, progress)
        try:
            copier.run(todo.copy)
        except BaseException:
            checkpoint.save_after_failure()
            raise
        checkpoint.save()
        progress.finish()
    stats = replace(stats, seconds=round(time.monotonic() - started, 3))
    summary = {k: v for k, v in stats.as_dict().items() if k not in ("refused", "would_copy")}
    log.info("ingest.done", source=src_uri, dest=dest_uri, refused_count=len(todo.refused), **summary)
    return stats


def _read_manifest(store: base.ObjectStore, manifest_uri: str) -> dict[str, plan.CopiedEntry]:
    try:
        found = list(store.list_files(manifest_uri))
    except errors.ObjectNotFoundError:
        return {}
    sink = io.BytesIO()
    for obj in found[:1]:
        store.read_into(obj, sink)
    return plan.parse_manifest(sink.getvalue())


def _present(store: base.ObjectStore, dest_uri: str) -> dict[str, int]:
    """What the destination holds (path → size), so a recorded object deleted there is copied again."""
    try:
        return {obj.rel_path: obj.size for obj in store.list_files(dest_uri)}
    except errors.ObjectNotFoundError:
        return {}


class _Copier:
    """Copies tasks on at most ``max_concurrency`` threads, each object through one scratch file."""

    def __init__(
        self,
        source: base.ObjectSource,
        store: base.ObjectStore,
        dest_prefix: str,
        settings: IngestSettings,
        checkpoint: _Checkpoint,
        progress: kit.ProgressTracker,
    ) -> None:
        self._source = source
        self._store = store
        self._dest_prefix = dest_prefix
        self._settings = settings
        self._checkpoint = checkpoint
        self._progress = progress
        self._throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)

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
        self._throttle.take(obj.size)
        if obj.size <= IN_MEMORY_BYTES:
            buffer = io.BytesIO()
            got = self._source.read_into(obj, buffer)
            self._verify(obj, got, lambda: checksums.bytes_md5(buffer.getvalue()))
            self._store.write_bytes(buffer.getvalue(), dest)
        else:
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
        self._checkpoint.record(
            plan.CopiedEntry(obj.rel_path, obj.etag, obj.size, modified_at=obj.modified_at, copied_at=time.time())
        )
        self._progress.add(files=1, nbytes=obj.size)
        log.debug("ingest.copied", path=obj.rel_path, size=obj.size, reason=task.reason)

    def _verify(self, obj: base.RemoteObject, got: int, md5: Callable[[], bytes]) -> None:
        if got != obj.size:
            raise errors.IntegrityError(f"{obj.uri}: read {got} bytes, the listing says {obj.size}")
        if self._settings.verify_md5 and obj.content_md5 is not None and md5() != obj.content_md5:
            raise errors.IntegrityError(f"{obj.uri}: MD5 does not match the listed Content-MD5")


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
    """Seconds until the next checkpoint: ``interval_s``, or longer when the last rewrite took so long that
    rewriting every ``interval_s`` would spend more than :data:`CHECKPOINT_SHARE` of the run on it. 0 asks for a
    checkpoint after every object, whatever it costs, and gets it."""
    return max(interval_s, last_save_s / CHECKPOINT_SHARE) if interval_s > 0 else 0.0


class _Checkpoint:
    """The manifest being built: entries recorded by the copy threads, rewritten whole at the destination at
    most every ``interval_s`` (by the thread whose record crosses the interval), and on :meth:`save`."""

    def __init__(
        self,
        store: base.ObjectStore,
        uri: str,
        source: str,
        copied: dict[str, plan.CopiedEntry],
        *,
        interval_s: float,
    ) -> None:
        self._store = store
        self._uri = uri
        self._source = source
        self._entries = dict(copied)
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._version = 0
        self._saved_version = 0
        self._saved_at = time.monotonic()
        self._wait_s = interval_s

    def record(self, entry: plan.CopiedEntry) -> None:
        with self._lock:
            self._entries[entry.rel_path] = entry
            self._version += 1
            due = time.monotonic() - self._saved_at >= self._wait_s
        if due:
            self.save()

    def save(self) -> None:
        with self._save_lock:
            with self._lock:
                if self._version == self._saved_version:
                    return
                version, entries = self._version, dict(self._entries)
                self._saved_at = started = time.monotonic()
            self._store.write_bytes(plan.render_manifest(entries, source=self._source, now=time.time()), self._uri)
            took = time.monotonic() - started
            with self._lock:
                self._saved_version = max(self._saved_version, version)
                self._wait_s = checkpoint_interval(self._interval_s, took)

    def save_after_failure(self) -> None:
        """Keep what finished before the failure; the failure itself is what the caller reports."""
        try:
            self.save()
        except errors.ScalebusError as exc:
            log.warning("ingest.manifest_not_saved", uri=self._uri, error=str(exc))
