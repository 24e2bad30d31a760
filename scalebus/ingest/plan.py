"""The ingest plan: which source objects to copy, skip or refuse, and the record of what was copied.

Pure: the source listing (any iterable: it is consumed once, as it streams), an index of the destination's record
(the manifest) and of what the destination holds go in; an :class:`IngestPlan` comes out. No I/O, no clock, so
every decision is tested with values.

An object is **skipped** when the manifest records the same relative path with the same ETag and size, and the
destination still holds a file of that size there; otherwise it is **copied** (``new``, ``changed``: another
ETag or size, ``missing``: recorded but gone or altered at the destination). An object whose name could not
land safely is **refused** with a reason and never copied; the rules are staging's (:mod:`scalebus.transfer.paths`:
no ``..``, no absolute or empty segments, no control or format characters, NFC only), plus: the manifest's own
name is reserved, and a name that is a file at the source but also a folder of other objects is refused, since a
file system (or ADLS Gen2) cannot hold both. Objects recorded in the manifest but no longer listed are counted
as **deleted at source**; nothing is ever deleted at the destination.

Memory: a run over millions of recorded objects must not hold the listing, the destination's listing and the
manifest as Python objects. The :class:`ManifestIndex` keeps one small integer pair per recorded object, keyed by
a 64-bit fingerprint of its path (Python's SipHash of the string, stable within one process); skipped objects are
counted, not kept; only objects to copy are held. Two paths of one run share a fingerprint with probability
below n²/2⁶⁵ (3·10⁻⁸ at a million objects), and even then an object is wrongly skipped only if its ETag
fingerprint (60 bits) and size equal the other's too.

The manifest (``<dest>/_scalebus_ingest.jsonl``) is JSON lines: a header (schema, source, generation), then one
line per copied object (path, etag, size, modified_at, copied_at). A path may appear on several lines (an
append-only log, :mod:`scalebus.ingest.journal`): the last line wins. Lines that do not parse are ignored (the
object is copied again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from scalebus.backends import base
from scalebus.transfer import paths

MANIFEST_NAME = "_scalebus_ingest.jsonl"
"""The record of copied objects, at the top of the destination."""
MANIFEST_SCHEMA = 2
"""2: a log (the last line per path wins) whose header names its generation; 1 (a line per path) reads the same."""

_LISTED = 1
_PRESENT = 2
_FLAGS = 2
_SIZE_BITS = 64
_ETAG_MASK = (1 << 60) - 1
_LOAD_BATCH = 2000


@dataclass(frozen=True, slots=True)
class CopiedEntry:
    """One object a run copied: where it landed (``rel_path``) and which version of it."""

    rel_path: str
    etag: str
    size: int
    modified_at: float | None = None
    copied_at: float | None = None

    def same_version(self, obj: base.RemoteObject) -> bool:
        return (self.rel_path, self.etag, self.size) == (obj.rel_path, obj.etag, obj.size)

    def line(self) -> str:
        """The manifest line for this entry (no newline)."""
        record = {"path": self.rel_path, "etag": self.etag, "size": self.size}
        record |= {"modified_at": self.modified_at, "copied_at": self.copied_at}
        return json.dumps(record, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class CopyTask:
    obj: base.RemoteObject
    reason: str
    """``new``, ``changed`` or ``missing`` (recorded, but not at the destination as recorded)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    rel_path: str
    reason: str


@dataclass(frozen=True, slots=True)
class IngestPlan:
    copy: tuple[CopyTask, ...]
    """Objects to copy, in listing order."""
    skip_files: int
    """Objects already copied, unchanged."""
    skip_bytes: int
    refused: tuple[Refusal, ...]
    """Objects whose names could not land safely, with the reason."""
    deleted_at_source: int
    """Recorded objects the source no longer lists (kept at the destination and in the manifest)."""

    @property
    def copy_bytes(self) -> int:
        return sum(task.obj.size for task in self.copy)


class ManifestIndex:
    """What the manifest records, compactly: path fingerprint → (ETag fingerprint, size, flags) in one int.

    Filled from the manifest (:meth:`record`, the last call per path wins), then marked with what the destination
    holds (:meth:`mark_present`), then consumed by :func:`plan_ingest`, which marks what the source lists.
    """

    def __init__(self) -> None:
        self._values: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._values)

    def record(self, rel_path: str, etag: str, size: int) -> None:
        self._values[hash(rel_path)] = ((hash(etag) & _ETAG_MASK) << _SIZE_BITS | size) << _FLAGS

    def load(self, lines: Iterable[str]) -> None:
        """Record every entry of manifest lines (the last per path wins), as :func:`parse_lines` reads them but
        parsed a batch at a time."""
        batch: list[str] = []
        for line in lines:
            if line.startswith('{"path"'):
                batch.append(line)
                if len(batch) == _LOAD_BATCH:
                    self._load_batch(batch)
                    batch = []
        self._load_batch(batch)

    def _load_batch(self, batch: list[str]) -> None:
        try:
            records = json.loads("[" + ",".join(batch) + "]")
            for record in records:
                self.record(str(record["path"]), str(record["etag"]), int(record["size"]))
        except (ValueError, KeyError, TypeError, AttributeError):  # some line is damaged: one at a time
            for entry in parse_lines(batch):
                self.record(entry.rel_path, entry.etag, entry.size)

    def mark_present(self, rel_path: str, size: int) -> None:
        """The destination holds ``rel_path`` with ``size`` bytes (ignored unless recorded with that size)."""
        key = hash(rel_path)
        value = self._values.get(key)
        if value is not None and _size(value) == size:
            self._values[key] = value | _PRESENT

    def _lookup(self, rel_path: str) -> tuple[int, int | None]:
        key = hash(rel_path)
        return key, self._values.get(key)

    def _mark_listed(self, key: int, value: int) -> None:
        self._values[key] = value | _LISTED

    def _unlisted(self) -> int:
        return sum(1 for value in self._values.values() if not value & _LISTED)


def index_of(entries: Iterable[CopiedEntry], *, present: Iterable[tuple[str, int]] | None = ()) -> ManifestIndex:
    """An index of ``entries`` with ``present`` (path, size) marked; ``present=None``: the destination is not
    checked, the manifest alone decides."""
    index = ManifestIndex()
    listed = list(entries)
    for entry in listed:
        index.record(entry.rel_path, entry.etag, entry.size)
    for rel_path, size in ((e.rel_path, e.size) for e in listed) if present is None else present:
        index.mark_present(rel_path, size)
    return index


def plan_ingest(listing: Iterable[base.RemoteObject], *, index: ManifestIndex) -> IngestPlan:
    """Decide for every listed object (module docstring); ``listing`` is consumed once."""
    planner = _Planner(index)
    for obj in listing:
        planner.decide(obj)
    return planner.finish()


class _Planner:
    """The state of one streamed plan: decisions so far, folders seen, new paths seen."""

    def __init__(self, index: ManifestIndex) -> None:
        self._index = index
        self._copy: list[CopyTask] = []
        self._refused: list[Refusal] = []
        self._skip_files = 0
        self._skip_bytes = 0
        self._folders: dict[int, str] = {}
        self._new_seen: set[int] = set()

    def decide(self, obj: base.RemoteObject) -> None:
        rel_path = obj.rel_path
        reason = name_refusal(rel_path)
        if reason is not None:
            self._refused.append(Refusal(rel_path, reason))
            return
        key, value = self._index._lookup(rel_path)
        if (value is not None and value & _LISTED) or key in self._new_seen:
            self._refused.append(Refusal(rel_path, "listed twice"))
            return
        self._add_folders(rel_path)
        if value is None:
            self._new_seen.add(key)
            self._copy.append(CopyTask(obj, "new"))
            return
        self._index._mark_listed(key, value)
        if value >> _FLAGS != ((hash(obj.etag) & _ETAG_MASK) << _SIZE_BITS | obj.size):
            self._copy.append(CopyTask(obj, "changed"))
        elif not value & _PRESENT:
            self._copy.append(CopyTask(obj, "missing"))
        else:
            self._skip_files += 1
            self._skip_bytes += obj.size

    def _add_folders(self, rel_path: str) -> None:
        folder = rel_path.rpartition("/")[0]
        while folder and (key := hash(folder)) not in self._folders:
            self._folders[key] = folder
            folder = folder.rpartition("/")[0]

    def finish(self) -> IngestPlan:
        """Refuse the files that turned out to be folders of other objects too, and total up."""
        conflicts = set()
        for key, folder in self._folders.items():
            value = self._index._values.get(key)
            if key in self._new_seen or (value is not None and value & _LISTED):
                conflicts.add(folder)
                self._refused.append(Refusal(folder, FOLDER_CONFLICT))
        copy = [task for task in self._copy if task.obj.rel_path not in conflicts]
        for folder in conflicts - {task.obj.rel_path for task in self._copy}:
            self._skip_files -= 1
            self._skip_bytes -= _size(self._index._values[hash(folder)])
        return IngestPlan(
            copy=tuple(copy),
            skip_files=self._skip_files,
            skip_bytes=self._skip_bytes,
            refused=tuple(self._refused),
            deleted_at_source=self._index._unlisted(),
        )


FOLDER_CONFLICT = "is both an object and a folder of other objects; a file system cannot hold both"


def name_refusal(rel_path: str) -> str | None:
    """Why ``rel_path`` cannot land (staging's path rules, the reserved manifest name), or ``None``."""
    if not _plainly_safe(rel_path):
        unsafe = paths.unsafe_reason(rel_path)
        if unsafe is not None:
            return unsafe
    if rel_path == MANIFEST_NAME:
        return "reserved for the ingest manifest"
    return None


def _plainly_safe(rel_path: str) -> bool:
    """A fast sufficient test for :func:`paths.unsafe_reason` passing: printable ASCII (no control or format
    characters, trivially NFC), relative, no backslash, no empty, ``.`` or ``..`` segment, none over 255 bytes.
    ``False`` only means "ask the full check"."""
    if not (rel_path.isascii() and rel_path.isprintable()) or "\\" in rel_path or "//" in rel_path:
        return False
    if not rel_path or rel_path[0] == "/" or rel_path[-1] == "/":
        return False
    if "." in rel_path and ("/./" in (wrapped := f"/{rel_path}/") or "/../" in wrapped):
        return False
    return len(rel_path) <= paths.NAME_MAX_BYTES or all(
        len(segment) <= paths.NAME_MAX_BYTES for segment in rel_path.split("/")
    )


def parse_lines(lines: Iterable[str]) -> Iterator[CopiedEntry]:
    """The entries of manifest lines, in order (a path may repeat: the last wins); the header and lines that do
    not parse are left out (their objects are copied again)."""
    for line in lines:
        entry = entry_of(line)
        if entry is not None:
            yield entry


def entry_of(line: str) -> CopiedEntry | None:
    """The entry one manifest line records, or ``None`` (a header, or a line that does not parse)."""
    if not line.startswith('{"path"'):
        return None
    try:
        record = json.loads(line)
        return CopiedEntry(
            rel_path=str(record["path"]),
            etag=str(record["etag"]),
            size=int(record["size"]),
            modified_at=_float_or_none(record.get("modified_at")),
            copied_at=_float_or_none(record.get("copied_at")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_manifest(data: bytes) -> dict[str, CopiedEntry]:
    """The entries of a whole manifest, the last line per path winning."""
    return {entry.rel_path: entry for entry in parse_lines(data.decode("utf-8", "replace").splitlines())}


def header_line(*, source: str, generation: str, lineage: Sequence[str], now: float) -> str:
    """The first line of a manifest: what it records and which generation it is (``lineage``: the generations
    it supersedes, newest first)."""
    record = {"schema": MANIFEST_SCHEMA, "source": source, "generation": generation, "lineage": list(lineage)}
    return json.dumps(record | {"written_at": now})


def parse_header(line: str) -> dict[str, object]:
    """The header's fields (empty when the line is not a header)."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) and "schema" in record else {}


def render_manifest(entries: Iterable[CopiedEntry], *, source: str, now: float, generation: str = "") -> bytes:
    """A whole manifest for ``entries``, sorted by path."""
    lines = [header_line(source=source, generation=generation, lineage=(), now=now)]
    lines += [entry.line() for entry in sorted(entries, key=lambda e: e.rel_path)]
    return ("\n".join(lines) + "\n").encode()


def scratch_needed(sizes: Sequence[int], *, concurrency: int, in_memory_bytes: int) -> int:
    """Scratch space the copy can need at once: the ``concurrency`` largest objects that go through a scratch file
    (those over ``in_memory_bytes``; smaller ones stay in memory)."""
    on_disk = sorted((size for size in sizes if size > in_memory_bytes), reverse=True)
    return sum(on_disk[:concurrency])


def _size(value: int) -> int:
    return (value >> _FLAGS) & ((1 << _SIZE_BITS) - 1)


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
