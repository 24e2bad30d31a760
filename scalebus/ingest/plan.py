"""The ingest plan: which source objects to copy, skip or refuse, and the record of what was copied.

Pure: the source listing, the destination's record (the manifest) and what the destination holds go in; an
:class:`IngestPlan` comes out. No I/O, no clock (``now`` is passed in), so every decision is tested with values.

An object is **skipped** when the manifest records the same relative path with the same ETag and size, and the
destination still holds a file of that size there; otherwise it is **copied** (``new``, ``changed``: another
ETag or size, ``missing``: recorded but gone or altered at the destination). An object whose name could not
land safely is **refused** with a reason and never copied; the rules are staging's (:mod:`scalebus.transfer.paths`:
no ``..``, no absolute or empty segments, no control or format characters, NFC only), plus: the manifest's own
name is reserved, and a name that is a file at the source but also a folder of other objects is refused, since a
file system (or ADLS Gen2) cannot hold both. Objects recorded in the manifest but no longer
listed are reported as **deleted at source**; nothing is ever deleted at the destination.

The manifest (``<dest>/_scalebus_ingest.jsonl``) is JSON lines: a header (schema, source, when written), then
one line per copied object (path, etag, size, modified_at, copied_at). It is rewritten whole and atomically, so
it is always a complete record; lines that do not parse are ignored (the object is copied again).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scalebus.backends import base
from scalebus.transfer import paths

MANIFEST_NAME = "_scalebus_ingest.jsonl"
"""The record of copied objects, at the top of the destination."""
MANIFEST_SCHEMA = 1


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
    skip: tuple[base.RemoteObject, ...]
    """Objects already copied, unchanged."""
    refused: tuple[Refusal, ...]
    """Objects whose names could not land safely, with the reason."""
    deleted_at_source: tuple[str, ...]
    """Recorded paths the source no longer lists (kept at the destination and in the manifest)."""

    @property
    def copy_bytes(self) -> int:
        return sum(task.obj.size for task in self.copy)

    @property
    def skip_bytes(self) -> int:
        return sum(obj.size for obj in self.skip)


def plan_ingest(
    listing: Sequence[base.RemoteObject],
    *,
    copied: Mapping[str, CopiedEntry],
    present: Mapping[str, int] | None,
) -> IngestPlan:
    """Decide for every listed object (module docstring). ``present`` maps destination paths to sizes (``None``:
    not checked, the manifest alone decides)."""
    folders = {parent for obj in listing for parent in _parents(obj.rel_path)}
    seen: set[str] = set()
    copy: list[CopyTask] = []
    skip: list[base.RemoteObject] = []
    refused: list[Refusal] = []
    for obj in listing:
        reason = refusal_reason(obj.rel_path, folders=folders, seen=seen)
        if reason is not None:
            refused.append(Refusal(obj.rel_path, reason))
            continue
        seen.add(obj.rel_path)
        entry = copied.get(obj.rel_path)
        if entry is None:
            copy.append(CopyTask(obj, "new"))
        elif not entry.same_version(obj):
            copy.append(CopyTask(obj, "changed"))
        elif present is not None and present.get(obj.rel_path) != obj.size:
            copy.append(CopyTask(obj, "missing"))
        else:
            skip.append(obj)
    listed = {obj.rel_path for obj in listing}
    gone = tuple(sorted(path for path in copied if path not in listed))
    return IngestPlan(copy=tuple(copy), skip=tuple(skip), refused=tuple(refused), deleted_at_source=gone)


def refusal_reason(rel_path: str, *, folders: set[str], seen: set[str]) -> str | None:
    """Why ``rel_path`` cannot be copied, or ``None`` when it can."""
    unsafe = paths.unsafe_reason(rel_path)
    if unsafe is not None:
        return unsafe
    if rel_path == MANIFEST_NAME:
        return "reserved for the ingest manifest"
    if rel_path in folders:
        return "is both an object and a folder of other objects; a file system cannot hold both"
    if rel_path in seen:
        return "listed twice"
    return None


def parse_manifest(data: bytes) -> dict[str, CopiedEntry]:
    """The entries of a manifest; a line that does not parse is left out (its object is copied again)."""
    entries: dict[str, CopiedEntry] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "path" not in record:
                continue
            entry = CopiedEntry(
                rel_path=str(record["path"]),
                etag=str(record["etag"]),
                size=int(record["size"]),
                modified_at=_float_or_none(record.get("modified_at")),
                copied_at=_float_or_none(record.get("copied_at")),
            )
        except (ValueError, KeyError, TypeError):
            continue
        entries[entry.rel_path] = entry
    return entries


def render_manifest(entries: Mapping[str, CopiedEntry], *, source: str, now: float) -> bytes:
    """The manifest for ``entries`` (sorted by path), with a header naming the source."""
    lines = [json.dumps({"schema": MANIFEST_SCHEMA, "source": source, "written_at": now})]
    for path in sorted(entries):
        entry = entries[path]
        record = {"path": path, "etag": entry.etag, "size": entry.size}
        record |= {"modified_at": entry.modified_at, "copied_at": entry.copied_at}
        lines.append(json.dumps(record, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def scratch_needed(sizes: Sequence[int], *, concurrency: int, in_memory_bytes: int) -> int:
    """Scratch space the copy can need at once: the ``concurrency`` largest objects that go through a scratch file
    (those over ``in_memory_bytes``; smaller ones stay in memory)."""
    on_disk = sorted((size for size in sizes if size > in_memory_bytes), reverse=True)
    return sum(on_disk[:concurrency])


def _parents(rel_path: str) -> list[str]:
    parts = rel_path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
