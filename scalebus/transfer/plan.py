"""The download plan: which remote files land where, in which ranged chunks, and which are already staged.

Pure: listings, the manifest of files already staged and the chunk size in; a :class:`DownloadPlan` out. No I/O,
so every decision (layout, path safety, collisions, resume) is tested with plain values.

Layout: a folder source's files land under ``<dest>/<folder base name>/<rel_path>``; a file source lands at
``<dest>/<file name>``. Two remote files mapping to one local path, or one path being both a file and a
directory, is an :class:`~scalebus.errors.UnsafePathError`.

Path safety (what a remote name may be) is :mod:`scalebus.transfer.paths`; on top of it the top-level manifest name
is reserved, and a file may not take the temporary name (:func:`temp_name`) of another.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import paths

MANIFEST_NAME = ".scalebus-stage.jsonl"
"""Resume manifest in the stage dir: one JSON line (path, etag, size) per finished file."""
PART_SUFFIX = ".part"
"""Files are written under a temporary name ending in this (:func:`temp_name`) and renamed into place once
verified."""
TEMP_PREFIX = ".sb-"

AUTO_MIN_FILES = 2000
"""``staging.processes = 0`` adds a helper only while at least this many files are still to be handed out: a helper
costs ~0.5 s of CPU to start, about what one process spends on 1,000 small files."""
CPU_BOUND_CORES = 0.85
"""A staging process busy this many cores' worth (CPU seconds per second) is bound by its own CPU, most likely
the GIL: one more process would fetch more. A process waiting on the network uses a small fraction."""
CPU_BOUND_SAMPLES = 2
"""Consecutive CPU samples (of ``CPU_SAMPLE_S``) over the bound before a helper is added, and between helpers."""
CPU_SAMPLE_S = 1.0
BATCH_MAX_FILES = 64
BATCH_MAX_BYTES = 64 * 1024 * 1024
"""Processes take work in batches of up to this many files or bytes: few enough messages between processes,
small enough that the last batches spread over every process."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes ``[offset, offset + length)`` of one file, fetched by one ranged read."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class FileTask:
    """One remote file and where it lands. ``source`` indexes the listings the plan was made from."""

    obj: base.RemoteObject
    rel_dest: str
    source: int
    chunks: tuple[Chunk, ...]

    @property
    def size(self) -> int:
        return self.obj.size


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """A file a previous staging finished: ``rel_path`` relative to the stage dir."""

    rel_path: str
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class Listing:
    """What listing one source URI returned."""

    uri: str
    objects: Sequence[base.RemoteObject]


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    fetch: tuple[FileTask, ...]
    """Files to download, in listing order."""
    skip: tuple[FileTask, ...]
    """Files already staged with the same etag and size."""
    directories: tuple[str, ...]
    """Every directory (relative, parents first) the fetched files need."""

    @property
    def fetch_bytes(self) -> int:
        return sum(task.size for task in self.fetch)

    @property
    def skip_bytes(self) -> int:
        return sum(task.size for task in self.skip)


def plan_download(
    listings: Sequence[Listing], *, present: Mapping[str, ManifestEntry], chunk_size_bytes: int
) -> DownloadPlan:
    """Map every listed object to its place under the stage dir; split large files into ranged chunks."""
    if chunk_size_bytes <= 0:
        raise ValueError("chunk_size_bytes must be positive")
    fetch: list[FileTask] = []
    skip: list[FileTask] = []
    owners: dict[str, str] = {}
    directories: dict[str, None] = {}
    for index, listing in enumerate(listings):
        prefix = _layout_prefix(listing)
        for obj in listing.objects:
            paths.check_rel_path(obj.rel_path)
            rel_dest = obj.rel_path if prefix is None else f"{prefix}/{obj.rel_path}"
            if len(rel_dest.encode("utf-8", "surrogatepass")) > paths.PATH_MAX_BYTES:
                raise errors.UnsafePathError(f"{rel_dest!r}: longer than {paths.PATH_MAX_BYTES} bytes")
            if rel_dest in owners:
                raise errors.UnsafePathError(f"{rel_dest!r}: both {owners[rel_dest]} and {obj.uri} map to it")
            owners[rel_dest] = obj.uri
            _add_parents(rel_dest, directories)
            task = FileTask(
                obj=obj, rel_dest=rel_dest, source=index, chunks=split_chunks(obj.size, chunk_size_bytes)
            )
            if present.get(rel_dest) == ManifestEntry(rel_dest, obj.etag, obj.size):
                skip.append(task)
            else:
                fetch.append(task)
    _check_collisions(owners, directories)
    needed: dict[str, None] = {}
    for task in fetch:
        _add_parents(task.rel_dest, needed)
    return DownloadPlan(fetch=tuple(fetch), skip=tuple(skip), directories=tuple(needed))


def temp_name(rel_path: str) -> str:
    """Where ``rel_path`` is written before it is verified: a short hidden name in the same directory
    (``.sb-<hash>.part``, 25 bytes), so a name of any legal length still has a temporary name that fits
    ``NAME_MAX``, and the rename into place stays within one directory."""
    parent, _, name = rel_path.rpartition("/")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    temp = f"{TEMP_PREFIX}{digest}{PART_SUFFIX}"
    return f"{parent}/{temp}" if parent else temp


def is_temp_name(name: str) -> bool:
    """Whether a file name has the shape :func:`temp_name` gives (a leftover of an interrupted write)."""
    stem = name[len(TEMP_PREFIX) : -len(PART_SUFFIX)]
    return (
        name.startswith(TEMP_PREFIX)
        and name.endswith(PART_SUFFIX)
        and len(stem) == 16
        and all(c in "0123456789abcdef" for c in stem)
    )


def split_chunks(size: int, chunk_size_bytes: int) -> tuple[Chunk, ...]:
    """Ranged reads covering ``size`` bytes: none for an empty file, one for a file up to one chunk."""
    return tuple(
        Chunk(offset, min(chunk_size_bytes, size - offset)) for offset in range(0, size, chunk_size_bytes)
    )


def batch_tasks(
    tasks: Sequence[FileTask], *, max_files: int = BATCH_MAX_FILES, max_bytes: int = BATCH_MAX_BYTES
) -> tuple[tuple[FileTask, ...], ...]:
    """Cut the fetch list into batches in listing order: a file split into chunks is a batch of its own (its
    chunks must end in one process, which verifies and renames it); other files are grouped up to ``max_files``
    files or ``max_bytes`` bytes."""
    batches: list[tuple[FileTask, ...]] = []
    current: list[FileTask] = []
    current_bytes = 0
    for task in tasks:
        if len(task.chunks) > 1:
            batches.append((task,))
            continue
        current.append(task)
        current_bytes += task.size
        if len(current) >= max_files or current_bytes >= max_bytes:
            batches.append(tuple(current))
            current, current_bytes = [], 0
    if current:
        batches.append(tuple(current))
    return tuple(batches)


@dataclass(frozen=True, slots=True)
class ProcessPlan:
    """How many processes download: ``start`` at once, up to ``most`` as the staging turns out CPU-bound."""

    start: int
    most: int


def process_plan(requested: int, *, cores: int, files: int, batches: int) -> ProcessPlan:
    """``requested`` (> 0) processes from the start; for 0 (auto) one, growing up to one per core when it is
    CPU-bound (:func:`should_add_helper`) and there are at least :data:`AUTO_MIN_FILES` files; never more
    processes than batches to share, never fewer than one."""
    if requested > 0:
        fixed = max(1, min(requested, batches))
        return ProcessPlan(fixed, fixed)
    most = min(cores, batches) if files >= AUTO_MIN_FILES else 1
    return ProcessPlan(1, max(1, most))


def should_add_helper(cpu_cores: Sequence[float], *, processes: int, most: int, files_left: int) -> bool:
    """Add a helper process when the last :data:`CPU_BOUND_SAMPLES` samples of the staging process's CPU use
    (cores' worth) all reach :data:`CPU_BOUND_CORES`, there is room for one, and at least
    :data:`AUTO_MIN_FILES` files are still to be handed out."""
    recent = cpu_cores[-CPU_BOUND_SAMPLES:]
    return (
        processes < most
        and files_left >= AUTO_MIN_FILES
        and len(recent) == CPU_BOUND_SAMPLES
        and all(sample >= CPU_BOUND_CORES for sample in recent)
    )


def _layout_prefix(listing: Listing) -> str | None:
    """``None`` for a file source (it lands at the top), else the folder's base name."""
    objects = listing.objects
    if len(objects) == 1 and objects[0].uri.rstrip("/") == listing.uri.rstrip("/"):
        if objects[0].rel_path == MANIFEST_NAME:
            raise errors.UnsafePathError(f"{MANIFEST_NAME!r}: reserved for the staging manifest")
        return None
    return paths.source_base_name(listing.uri)


def _add_parents(rel_path: str, directories: dict[str, None]) -> None:
    parent = posixpath.dirname(rel_path)
    missing: list[str] = []
    while parent and parent not in directories:
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for directory in reversed(missing):
        directories[directory] = None


def _check_collisions(owners: Mapping[str, str], directories: Mapping[str, None]) -> None:
    for rel_dest, uri in owners.items():
        if rel_dest in directories:
            raise errors.UnsafePathError(f"{rel_dest!r}: {uri} is a file but other files need it as a directory")
        if is_temp_name(posixpath.basename(rel_dest)):
            raise errors.UnsafePathError(f"{rel_dest!r}: {uri} has the shape of a temporary download name")
        if rel_dest == MANIFEST_NAME:
            raise errors.UnsafePathError(f"{rel_dest!r}: reserved for the staging manifest")
