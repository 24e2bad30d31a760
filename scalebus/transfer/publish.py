"""Publishing a job's outputs: upload every file in parallel, then commit them with the ``_SUCCESS`` marker.

The marker is written last and lists what was uploaded, so a reader that sees it sees complete outputs. It names
the job and the delivery that wrote it (:class:`Commit`). Commits are fenced:

* a committed output is never modified again: an existing marker of this job makes :func:`publish` a no-op (the
  job was published by an earlier delivery), a marker of anyone else is an ``OutputConflictError`` and nothing is
  written;
* before every upload and right before the marker, the caller's ``check`` says whether this delivery still holds
  the job (it raises ``LockLostError`` when not), and the marker is looked for again: a publisher that lost the
  job, or whose output was committed meanwhile by another delivery, stops before touching it. What is left is a
  window of one file's upload between the last check and the write; the object store has no conditional write
  this port could use to close it.

:func:`committed` is the one check of the marker (the worker asks before it stages anything).
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import kit, paths, plan

log = structlog.get_logger(__name__)

MARKER_NAME = "_SUCCESS"
"""The commit marker ``publish`` writes after every output file."""
MARKER_MAX_BYTES = 64 * 1024 * 1024
"""Most of a marker that is read back to learn who wrote it."""

Check = Callable[[], None]
"""Raises (``LockLostError``) when the publisher no longer holds the job."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Who commits: the job and the delivery (message id, delivery count) written into the marker."""

    job_id: str
    message_id: str = ""
    delivery_count: int = 0


def marker_uri(dest_uri: str) -> str:
    """Where the commit marker of outputs published to ``dest_uri`` is."""
    return dest_uri.rstrip("/") + "/" + MARKER_NAME


def is_published(store: base.ObjectStore, dest_uri: str) -> bool:
    """Whether outputs were already committed to ``dest_uri`` by anyone (its marker exists)."""
    return store.exists(marker_uri(dest_uri))


def read_marker(store: base.ObjectStore, dest_uri: str) -> dict[str, object] | None:
    """The marker at ``dest_uri`` as written (``{}`` when it is not a JSON object), or ``None`` when absent."""
    uri = marker_uri(dest_uri)
    if not store.exists(uri):
        return None
    try:
        obj = next(iter(store.list_files(uri)))
    except (StopIteration, errors.ObjectNotFoundError):
        return None
    sink = io.BytesIO()
    store.read_into(obj, sink, length=min(obj.size, MARKER_MAX_BYTES))
    try:
        marker = json.loads(sink.getvalue())
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}


def committed(store: base.ObjectStore, dest_uri: str, commit: Commit | None) -> bool:
    """Whether ``dest_uri`` holds this job's commit. ``OutputConflictError`` when it holds a marker that does
    not name ``commit.job_id`` (another job's, or one nobody can vouch for). Without ``commit`` any marker
    counts."""
    if commit is None:
        return is_published(store, dest_uri)
    marker = read_marker(store, dest_uri)
    if marker is None:
        return False
    if marker.get("job_id") != commit.job_id:
        owner = marker.get("job_id")
        by = f"job {owner[:200]!r}" if isinstance(owner, str) else "an unknown writer (its marker names no job)"
        raise errors.OutputConflictError(
            f"{dest_uri}: already committed by {by}, not by job {commit.job_id!r}; choose another output folder"
        )
    return True


def publish(
    resolve: kit.Resolver,
    source_dir: Path,
    dest_uri: str,
    settings: StagingSettings,
    *,
    on_progress: kit.OnProgress | None = None,
    commit: Commit | None = None,
    check: Check | None = None,
) -> kit.StageStats:
    """Upload every file under ``source_dir`` to ``dest_uri``, then write ``_SUCCESS`` (JSON: who, file list)
    last; fenced by ``check`` and the marker (module docstring).

    If this job's ``_SUCCESS`` is already there an earlier delivery committed the outputs: nothing is uploaded.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    store = resolve(dest_uri)
    fence = _Fence(store, dest_uri, commit, check)
    fence.check()
    if committed(store, dest_uri, commit):
        log.info("staging.publish.already_committed", dest=dest_uri)
        return kit.StageStats(0, 0, 0, 0, time.monotonic() - started, already_published=True)
    files = local_files(source_dir)
    if any(rel == MARKER_NAME for rel, _size in files):
        raise errors.UnsafePathError(
            f"{source_dir / MARKER_NAME}: reserved for the commit marker; rename the output"
        )
    total = sum(size for _rel, size in files)
    progress = kit.ProgressTracker(len(files), total, started, on_progress)
    _upload(store, source_dir, dest_uri, files, settings=settings, progress=progress, fence=fence)
    fence.check_uncommitted()
    _write_marker(store, dest_uri, files, total=total, commit=commit)
    progress.finish()
    stats = kit.StageStats(
        len(files), total, 0, 0, time.monotonic() - started, cpu_s=round(time.process_time() - cpu_started, 3)
    )
    log.info("staging.publish.done", dest=dest_uri, **stats.as_dict())
    return stats


@dataclass(frozen=True, slots=True)
class _Fence:
    """The checks made before every write: the caller still holds the job, and nobody has committed."""

    store: base.ObjectStore
    dest_uri: str
    commit: Commit | None
    holds: Check | None

    def check(self) -> None:
        if self.holds is not None:
            self.holds()

    def check_uncommitted(self) -> None:
        self.check()
        if is_published(self.store, self.dest_uri) and committed(self.store, self.dest_uri, self.commit):
            raise errors.LockLostError(
                f"{self.dest_uri}: committed by another delivery while this one was publishing; left as it is"
            )


def _upload(
    store: base.ObjectStore,
    source_dir: Path,
    dest_uri: str,
    files: list[tuple[str, int]],
    *,
    settings: StagingSettings,
    progress: kit.ProgressTracker,
    fence: _Fence,
) -> None:
    """Every file of ``files`` (rel path, size) under ``dest_uri``, on parallel threads under the bandwidth cap."""
    prefix = dest_uri.rstrip("/") + "/"
    throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)

    def upload(item: tuple[str, int]) -> None:
        rel, size = item
        throttle.take(size)
        fence.check_uncommitted()
        store.write_file(source_dir / rel, prefix + urllib.parse.quote(rel))
        progress.add(files=1, nbytes=size)

    kit.run_parallel(upload, files, max_workers=settings.max_concurrency)


def _write_marker(
    store: base.ObjectStore,
    dest_uri: str,
    files: list[tuple[str, int]],
    *,
    total: int,
    commit: Commit | None,
) -> None:
    now = time.time()
    marker: dict[str, object] = {}
    if commit is not None:
        marker |= {"job_id": commit.job_id, "message_id": commit.message_id, "delivery": commit.delivery_count}
    marker |= {
        "written_at": now,
        "files": [{"path": rel, "size": size} for rel, size in files],
        "bytes": total,
        "committed_at": now,
    }
    store.write_bytes(json.dumps(marker, indent=1).encode(), marker_uri(dest_uri))


def local_files(root: Path) -> list[tuple[str, int]]:
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
                paths.check_rel_path(rel)
                found.append((rel, os.stat(full).st_size))
    except OSError as exc:
        raise errors.StorageError(f"{root}: cannot read outputs ({exc.strerror})") from exc
    if not root.is_dir():
        raise errors.StorageError(f"{root}: output directory does not exist")
    return found
