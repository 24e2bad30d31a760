"""The download plan: which remote files land where, in which ranged chunks, and which are already staged.

Pure: listing pages, an index of the files already staged and the chunk size in; tasks out. No I/O (the one
question about the disk, whether a file a previous staging finished is still there, is a callable passed in), so
every decision (layout, path safety, collisions, resume, disk space) is tested with plain values.

A :class:`StreamPlanner` is fed the listing page by page while the listing continues, so downloads start with
the first page; it remembers only what its checks need (a hash per listed path and per directory, about 60 bytes
a file), never the tasks it handed out. :func:`plan_download` plans whole listings at once on top of it.

Layout: a folder source's files land under ``<dest>/<folder base name>/<rel_path>``; a file source lands at
``<dest>/<file name>``. Two remote files mapping to one local path, or one path being both a file and a
directory, is an :class:`~scalebus.errors.UnsafePathError`.

Path safety (what a remote name may be) is :mod:`scalebus.transfer.paths`; on top of it the top-level manifest name
is reserved, and a file may not take the temporary name (:func:`temp_name`) of another. Each is checked as the
file is planned, so a staging fails at the first file that breaks a rule; files fetched before it stay (a later
staging resumes from them).

Paths are remembered by their 64-bit ``hash``, not their text: two different paths whose hashes collide would be
reported as a collision (odds about n² / 2⁶⁵: one in 37 million stagings of a million files; the hash seed differs
per process, so running it again passes). A real collision is never missed.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


CLAIMED = -1
"""What :meth:`ManifestIndex.take` answers for a path taken before (``hash`` never returns -1)."""


class ManifestIndex:
    """What a previous staging finished, compactly: a fingerprint of (etag, size) under the hash of each path
    (about 110 bytes an entry against ~500 for the entries themselves). A later entry for a path replaces an
    earlier one. A hash collision between two paths can only make a file look not staged (fetched again).

    A planner *takes* each listed path from it (:meth:`take`): the index then also remembers which of its paths
    were listed, so a resume needs no second set of every path. One index serves one staging."""

    def __init__(self) -> None:
        self._fingerprints: dict[int, int] = {}

    @classmethod
    def of(cls, entries: Iterable[ManifestEntry]) -> ManifestIndex:
        index = cls()
        for entry in entries:
            index.add(entry.rel_path, entry.etag, entry.size)
        return index

    def add(self, rel_path: str, etag: str, size: int) -> None:
        self._fingerprints[hash(rel_path)] = hash((etag, size))

    def add_all(self, entries: Iterable[tuple[str, str, int]]) -> None:
        """``add`` each ``(rel_path, etag, size)``, in order."""
        fingerprints = self._fingerprints
        for rel_path, etag, size in entries:
            fingerprints[hash(rel_path)] = hash((etag, size))

    def matches(self, rel_path: str, etag: str, size: int) -> bool:
        """Whether the last entry for ``rel_path`` has this etag and size (and it was not taken)."""
        return self._fingerprints.get(hash(rel_path)) == hash((etag, size))

    def take(self, key: int) -> int | None:
        """The fingerprint (``hash((etag, size))``) of the path whose ``hash`` is ``key``: ``None`` if it has no
        entry, :data:`CLAIMED` if it was taken before; taken from now on."""
        fingerprints = self._fingerprints
        known = fingerprints.get(key)
        if known is not None:
            fingerprints[key] = CLAIMED
        return known

    def taken(self, key: int) -> bool:
        return self._fingerprints.get(key) == CLAIMED

    def __len__(self) -> int:
        return len(self._fingerprints)


StagedCheck = Callable[[str, int], bool]
"""Whether the file at ``rel_path`` under the stage dir is there with ``size`` bytes (the planner's one look at
the disk, passed in)."""


@dataclass(frozen=True, slots=True)
class DiskBudget:
    """The staging disk's free space when the staging started, and how much of it must stay free."""

    dest: str
    free: int
    min_free: int


@dataclass(slots=True)
class PlanStep:
    """What planning one listing page decided."""

    fetch: list[FileTask] = field(default_factory=list)
    """Files to download, in listing order."""
    directories: list[str] = field(default_factory=list)
    """Directories (relative, parents first) these files need that no earlier step asked for."""
    skipped: list[FileTask] = field(default_factory=list)
    """Files already staged (only when the planner keeps them; otherwise only counted)."""


class StreamPlanner:
    """Plans a staging page by page as its listing arrives (:meth:`feed`), checking every rule on the way.

    ``present``: what a previous staging finished (the planner takes each listed path from it); a listed file
    matching its entry is skipped if ``is_staged(rel_dest, size)`` (the caller's look at the disk; omitted:
    trusted). ``spread_units``: large
    files are read in chunks of at least ``chunk_size_bytes``, larger once the bytes listed so far would give
    more than ``spread_units`` chunks (0: always ``chunk_size_bytes``). ``disk``: refuse (``LocalDiskError``)
    as soon as the files to fetch would leave less than ``min_free`` bytes free.
    """

    def __init__(
        self,
        sources: Sequence[str],
        *,
        chunk_size_bytes: int,
        present: ManifestIndex | None = None,
        is_staged: StagedCheck | None = None,
        spread_units: int = 0,
        disk: DiskBudget | None = None,
        keep_skipped: bool = False,
    ) -> None:
        if chunk_size_bytes <= 0:
            raise ValueError("chunk_size_bytes must be positive")
        self._sources = tuple(sources)
        self._bare = tuple(uri.rstrip("/") for uri in self._sources)
        self._heads: list[str | None] = [None] * len(self._sources)  # where each source lands, once known
        self._index = present if present is not None else ManifestIndex()
        self._fingerprints = self._index._fingerprints
        self._is_staged = is_staged
        self._chunk_size = chunk_size_bytes
        self._spread_units = spread_units
        self._disk = disk
        self._keep_skipped = keep_skipped
        self._owners: set[int] = set()  # every listed file's rel_dest
        self._dirs: set[int] = set()  # every directory a listed file needs
        self._made: set[int] = set()  # every directory a fetched file needs (handed out in a step)
        self.listed_files = 0
        self.listed_bytes = 0
        self.fetch_files = 0
        self.fetch_bytes = 0
        self.skip_files = 0
        self.skip_bytes = 0

    def feed(self, source: int, objects: Sequence[base.RemoteObject]) -> PlanStep:
        """Plan one page of source ``source``'s listing; raises at the first file that breaks a rule."""
        self.listed_files += len(objects)
        self.listed_bytes += sum(obj.size for obj in objects)
        chunk_size = self._chunk_size
        if self._spread_units > 0:
            chunk_size = max(chunk_size, -(-self.listed_bytes // self._spread_units))
        step = PlanStep()
        is_staged, plainly_safe = self._is_staged, paths.plainly_safe_ascii
        for obj in objects:
            head = self._heads[source]
            if head is not None and plainly_safe(obj.rel_path):  # _place, inline for the common case
                rel_dest = f"{head}/{obj.rel_path}"
                if len(rel_dest) > _SHORT_ENOUGH:
                    _check_length(rel_dest)
            else:
                rel_dest = self._place(source, obj)
            known = self._claim_quickly(rel_dest)
            if known is _Unusual.PATH:
                known = self._claim(rel_dest, obj)
            if (
                known is not None
                and known == hash((obj.etag, obj.size))
                and (is_staged is None or is_staged(rel_dest, obj.size))
            ):
                self.skip_files += 1
                self.skip_bytes += obj.size
                if self._keep_skipped:
                    step.skipped.append(FileTask(obj, rel_dest, source, split_chunks(obj.size, chunk_size)))
                continue
            self._reserve_disk(obj.size)
            self._add_parents(rel_dest, step.directories)
            step.fetch.append(FileTask(obj, rel_dest, source, split_chunks(obj.size, chunk_size)))
        return step

    def _claim_quickly(self, rel_dest: str) -> int | _Unusual | None:
        """:meth:`_claim` for the common case (a new path, not temporary-looking, in a directory already seen),
        which runs for every listed file; ``_Unusual.PATH`` for anything else, left to :meth:`_claim`."""
        key = hash(rel_dest)
        known = self._fingerprints.get(key)
        parent, _, name = rel_dest.rpartition("/")
        if (
            known != CLAIMED
            and (known is not None or key not in self._owners)
            and key not in self._dirs
            and not name.startswith(TEMP_PREFIX)
            and hash(parent) in self._dirs
        ):
            if known is None:
                self._owners.add(key)
            else:
                self._fingerprints[key] = CLAIMED
            return known
        return _Unusual.PATH

    def _place(self, source: int, obj: base.RemoteObject) -> str:
        """Where ``obj`` lands, relative to the stage dir (module docstring: layout)."""
        head = self._heads[source]
        if head is None:
            return self._place_first(source, obj)
        rel = obj.rel_path
        if not paths.plainly_safe_ascii(rel):
            paths.check_rel_path(rel)
        rel_dest = f"{head}/{rel}"
        if len(rel_dest) > _SHORT_ENOUGH:
            _check_length(rel_dest)
        return rel_dest

    def _place_first(self, source: int, obj: base.RemoteObject) -> str:
        """The first file of a source decides its layout: a file source (the file itself) lands at the top,
        anything else under the source's base name."""
        rel = obj.rel_path
        if len(obj.uri) <= len(self._bare[source]) + 1 and obj.uri.rstrip("/") == self._bare[source]:
            if rel == MANIFEST_NAME:
                raise errors.UnsafePathError(f"{MANIFEST_NAME!r}: reserved for the staging manifest")
            paths.check_rel_path(rel)
            self._heads[source] = rel.partition("/")[0]
            return _check_length(rel)
        self._heads[source] = paths.source_base_name(self._sources[source])
        return self._place(source, obj)

    def _claim(self, rel_dest: str, obj: base.RemoteObject) -> int | None:
        """Take ``rel_dest`` for ``obj``: no other file, directory, temporary name or the manifest there. Returns
        its manifest entry's fingerprint, if it has one. Paths with an entry are remembered by the index, the
        others in a set of their own."""
        key = hash(rel_dest)
        known = self._fingerprints.get(key)  # ManifestIndex.take, inline: this runs for every listed file
        if known is not None:
            self._fingerprints[key] = CLAIMED
        if known == CLAIMED or (known is None and key in self._owners):
            raise errors.UnsafePathError(
                f"{rel_dest!r}: both {obj.uri} and a file listed before it from {self._sources_of(rel_dest)} map "
                "to it"
            )
        if key in self._dirs:
            raise errors.UnsafePathError(
                f"{rel_dest!r}: {obj.uri} is a file but other files need it as a directory"
            )
        parent, _, name = rel_dest.rpartition("/")
        if name.startswith(TEMP_PREFIX) and is_temp_name(name):
            raise errors.UnsafePathError(f"{rel_dest!r}: {obj.uri} has the shape of a temporary download name")
        if rel_dest == MANIFEST_NAME:
            raise errors.UnsafePathError(f"{rel_dest!r}: reserved for the staging manifest")
        if known is None:
            self._owners.add(key)
        while parent and (key := hash(parent)) not in self._dirs:
            if key in self._owners or self._index.taken(key):
                raise errors.UnsafePathError(
                    f"{parent!r}: a file listed before has this path, but {obj.uri} needs it as a directory"
                )
            self._dirs.add(key)
            parent = parent.rpartition("/")[0]
        return known

    def _sources_of(self, rel_dest: str) -> str:
        """The sources whose files land where ``rel_dest`` is (for an error message)."""
        head = rel_dest.partition("/")[0]
        return " or ".join(uri for uri, h in zip(self._sources, self._heads, strict=True) if h == head)

    def _reserve_disk(self, size: int) -> None:
        self.fetch_files += 1
        self.fetch_bytes += size
        disk = self._disk
        if disk is not None and self.fetch_bytes + disk.min_free > disk.free:
            raise errors.LocalDiskError(
                f"not enough disk space in {disk.dest}: staging needs {self.fetch_bytes:,} bytes plus "
                f"{disk.min_free:,} bytes kept free (staging.min_free_bytes), but only {disk.free:,} bytes are "
                "free (counting the files listed so far)"
            )

    def _add_parents(self, rel_dest: str, out: list[str]) -> None:
        """Append the directories ``rel_dest`` needs that no earlier fetched file needed, parents first."""
        parent = rel_dest.rpartition("/")[0]
        missing: list[str] = []
        while parent and (key := hash(parent)) not in self._made:
            self._made.add(key)
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        out.extend(reversed(missing))


class _Unusual(enum.Enum):
    """What :meth:`StreamPlanner._claim_quickly` answers when the full checks must decide."""

    PATH = 0


_SHORT_ENOUGH = paths.PATH_MAX_BYTES // 4
"""A path of at most this many characters is within ``PATH_MAX`` whatever they are (≤ 4 UTF-8 bytes each)."""


def _check_length(rel_dest: str) -> str:
    if len(rel_dest.encode("utf-8", "surrogatepass")) > paths.PATH_MAX_BYTES:
        raise errors.UnsafePathError(f"{rel_dest!r}: longer than {paths.PATH_MAX_BYTES} bytes")
    return rel_dest


def plan_download(
    listings: Sequence[Listing], *, present: Mapping[str, ManifestEntry], chunk_size_bytes: int
) -> DownloadPlan:
    """Map every listed object to its place under the stage dir; split large files into ranged chunks (whole
    listings at once: :class:`StreamPlanner` fed each in turn)."""
    planner = StreamPlanner(
        [listing.uri for listing in listings],
        chunk_size_bytes=chunk_size_bytes,
        present=ManifestIndex.of(present.values()),
        keep_skipped=True,
    )
    fetch: list[FileTask] = []
    skip: list[FileTask] = []
    directories: list[str] = []
    for index, listing in enumerate(listings):
        step = planner.feed(index, listing.objects)
        fetch += step.fetch
        skip += step.skipped
        directories += step.directories
    return DownloadPlan(fetch=tuple(fetch), skip=tuple(skip), directories=tuple(directories))


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


THREADS_WINDOW_S = 0.2
"""How often a download run reconsiders how many of its threads fetch (:func:`next_threads`)."""
THREADS_START = 2
"""Threads that fetch small files at first: a waiting process doubles them every window, up to
``max_concurrency`` within a second, while a fast source gains nothing from more (:func:`next_threads`). A large
file handed out raises the count to ``max_concurrency`` at once."""
SMALL_UNIT_BYTES = 256 * 1024
"""Units of work smaller than this on average are "small files": their cost is per file, not per byte."""
THREADS_IDLE_CORES = 0.5
"""A process using less CPU than this (cores' worth) is waiting on its source: more threads fetch more."""
THREADS_KEEP_RATE = 0.8
"""Fewer threads are kept only if they finish at least this share of the units per second that more did."""
THREADS_HOLD_WINDOWS = 150
"""After fewer threads turned out slower, windows before fewer are tried again (the source may change)."""


@dataclass(frozen=True, slots=True)
class ThreadCount:
    """How many threads fetch, and the change being tried: ``tried_from`` threads (0: none) did
    ``rate_before`` units/s in the window before it."""

    threads: int
    tried_from: int = 0
    rate_before: float = 0.0
    hold: int = 0


def next_threads(
    count: ThreadCount, *, most: int, cpu_cores: float, units: int, nbytes: int, seconds: float
) -> ThreadCount:
    """How many threads fetch after a window of ``seconds`` in which ``units`` units (``nbytes`` bytes)
    finished while the process used ``cpu_cores`` cores' worth of CPU.

    On small files a process busy :data:`CPU_BOUND_CORES` or more may be bound by its own CPU (a fast source):
    then more threads only hand the GIL back and forth at each of a file's 4-5 system calls, which costs more CPU
    than the file, so the count halves, down to one, as long as the units per second keep up
    (:data:`THREADS_KEEP_RATE`); if they drop, the source needed the threads: back to the count before, and no
    new try for :data:`THREADS_HOLD_WINDOWS` windows. A process mostly waiting (under :data:`THREADS_IDLE_CORES`)
    doubles the count, up to ``most``. Large units (over :data:`SMALL_UNIT_BYTES` on average) always get
    ``most``: their reads release the GIL for long stretches. A window without a finished unit changes nothing.
    """
    if units <= 0 or seconds <= 0:
        return count
    if nbytes / units >= SMALL_UNIT_BYTES:
        return ThreadCount(most)
    rate, threads = units / seconds, count.threads
    if count.tried_from > threads and rate < THREADS_KEEP_RATE * count.rate_before:
        return ThreadCount(count.tried_from, hold=THREADS_HOLD_WINDOWS)
    if count.hold > 0:
        return ThreadCount(threads, hold=count.hold - 1)
    if cpu_cores >= CPU_BOUND_CORES and threads > 1:
        return ThreadCount(max(1, threads // 2), tried_from=threads, rate_before=rate)
    if cpu_cores < THREADS_IDLE_CORES and threads < most:
        return ThreadCount(min(most, threads * 2))
    return ThreadCount(threads)


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
