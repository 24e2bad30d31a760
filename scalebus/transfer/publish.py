"""Publishing a job's outputs: upload every file in parallel, then commit them with the ``_SUCCESS`` marker.

The marker is written last and lists what was uploaded, so a reader that sees it sees complete outputs. An
existing marker makes :func:`publish` a no-op, so outputs are committed once however often a job is delivered;
:func:`is_published` is the one check of it (the worker asks before it stages anything).
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from pathlib import Path

import structlog

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import kit, paths, plan

log = structlog.get_logger(__name__)

MARKER_NAME = "_SUCCESS"
"""The commit marker ``publish`` writes after every output file."""


def marker_uri(dest_uri: str) -> str:
    """Where the commit marker of outputs published to ``dest_uri`` is."""
    return dest_uri.rstrip("/") + "/" + MARKER_NAME


def is_published(store: base.ObjectStore, dest_uri: str) -> bool:
    """Whether outputs were already committed to ``dest_uri`` (its marker exists)."""
    return store.exists(marker_uri(dest_uri))


def publish(
    resolve: kit.Resolver,
    source_dir: Path,
    dest_uri: str,
    settings: StagingSettings,
    *,
    on_progress: kit.OnProgress | None = None,
) -> kit.StageStats:
    """Upload every file under ``source_dir`` to ``dest_uri``, then write ``_SUCCESS`` (JSON file list) last.

    If ``_SUCCESS`` is already there the outputs were committed by an earlier delivery: nothing is uploaded.
    """
    started, cpu_started = time.monotonic(), time.process_time()
    store = resolve(dest_uri)
    if is_published(store, dest_uri):
        log.info("staging.publish.already_committed", dest=dest_uri)
        return kit.StageStats(0, 0, 0, 0, time.monotonic() - started, already_published=True)
    files = local_files(source_dir)
    if any(rel == MARKER_NAME for rel, _size in files):
        raise errors.UnsafePathError(
            f"{source_dir / MARKER_NAME}: reserved for the commit marker; rename the output"
        )
    total = sum(size for _rel, size in files)
    progress = kit.ProgressTracker(len(files), total, started, on_progress)
    _upload(store, source_dir, dest_uri, files, settings=settings, progress=progress)
    _write_marker(store, dest_uri, files, total=total)
    progress.finish()
    stats = kit.StageStats(
        len(files), total, 0, 0, time.monotonic() - started, cpu_s=round(time.process_time() - cpu_started, 3)
    )
    log.info("staging.publish.done", dest=dest_uri, **stats.as_dict())
    return stats


def _upload(
    store: base.ObjectStore,
    source_dir: Path,
    dest_uri: str,
    files: list[tuple[str, int]],
    *,
    settings: StagingSettings,
    progress: kit.ProgressTracker,
) -> None:
    """Every file of ``files`` (rel path, size) under ``dest_uri``, on parallel threads under the bandwidth cap."""
    prefix = dest_uri.rstrip("/") + "/"
    throttle = kit.Throttle(settings.bandwidth_cap_bytes_per_s)

    def upload(item: tuple[str, int]) -> None:
        rel, size = item
        throttle.take(size)
        store.write_file(source_dir / rel, prefix + urllib.parse.quote(rel))
        progress.add(files=1, nbytes=size)

    kit.run_parallel(upload, files, max_workers=settings.max_concurrency)


def _write_marker(store: base.ObjectStore, dest_uri: str, files: list[tuple[str, int]], *, total: int) -> None:
    marker = {
        "files": [{"path": rel, "size": size} for rel, size in files],
        "bytes": total,
        "committed_at": time.time(),
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
