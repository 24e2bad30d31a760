"""The local record of one ingest (source, destination): an append-only log, compacted now and then, safely.

Each copied object appends one line to ``log.jsonl`` with a single ``write(2)`` on an unbuffered descriptor, so a
process killed outright (SIGKILL) loses nothing that finished; a checkpoint costs one line. ``base.jsonl`` is
the compacted record: a manifest (:mod:`scalebus.ingest.plan` format) that is replaced whole, never edited, and is
what goes to the destination as ``_scalebus_ingest.jsonl``. Compaction, run by one thread at a time:

1. under the append lock, ``log.jsonl`` is renamed to ``log.old.jsonl`` and a fresh log opened (appends go on);
2. ``base.new`` = the base's lines whose paths ``log.old`` does not name, then ``log.old``'s last line per path,
   written, fsynced, renamed over ``base.jsonl``, and the folder fsynced;
3. ``log.old.jsonl`` is removed.

A crash at any point leaves a readable record: the reader takes ``base``, then ``log.old``, then ``log``, the last
line per path winning, so an entry is in at least one of them whenever the crash strikes (between 2 and 3 it is
in two: harmless). A compaction that finds ``log.old`` left over by a crash folds it in first.

Compaction streams the base and holds only ``log.old``'s entries in memory. The base's header names its
generation and the generations it supersedes (its lineage), so a run can tell whether the destination's manifest
is one of its own (the local record is then a superset of it) or was written by a run elsewhere (adopted: the
local record is rebuilt from it). One ingest of a (source, destination) pair at a time per machine: the folder
is locked (``flock``) while open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from scalebus import errors
from scalebus.ingest import plan

BASE = "base.jsonl"
LOG = "log.jsonl"
OLD_LOG = "log.old.jsonl"
_NEW_BASE = "base.new"
LINEAGE_KEPT = 16
"""Generations a base remembers superseding: a destination manifest older than that is treated as foreign."""


def folder_for(root: Path, *, source: str, dest: str) -> Path:
    """The journal folder of one (source, destination) pair under ``root``."""
    digest = hashlib.sha256(f"{source}\n{dest}".encode()).hexdigest()[:24]
    return root / digest


class Journal:
    """One pair's record, open and locked; :meth:`close` releases it. Thread-safe: any thread may
    :meth:`append`; :meth:`compact` runs on one thread at a time."""

    def __init__(self, folder: Path, *, source: str) -> None:
        self._folder = folder
        self._source = source
        self._lock = threading.Lock()
        self._compact_lock = threading.Lock()
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise errors.LocalDiskError(f"ingest journal {folder}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise errors.UserInputError(
                f"another ingest of the same source and destination is running on this machine ({folder})"
            ) from None
        self._log_fd = self._open_log()
        self.appended = 0
        """Lines appended since this journal was opened."""

    def close(self) -> None:
        with self._lock:
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def base_path(self) -> Path:
        return self._folder / BASE

    # ------------------------------------------------------------------------------------------ reading

    def header(self) -> dict[str, object]:
        """The base's header (empty when there is no base yet)."""
        try:
            with self.base_path.open(encoding="utf-8", errors="replace") as fh:
                return plan.parse_header(fh.readline())
        except FileNotFoundError:
            return {}

    def lines(self) -> Iterator[str]:
        """Every line of the record, oldest first: base, then the old log, then the log."""
        for name in (BASE, OLD_LOG, LOG):
            with (
                contextlib.suppress(FileNotFoundError),
                (self._folder / name).open(encoding="utf-8", errors="replace") as fh,
            ):
                yield from fh

    def owns(self, generation: str) -> bool:
        """Whether a manifest of ``generation`` was written from this record (so the record contains it)."""
        header = self.header()
        lineage = header.get("lineage")
        return generation == header.get("generation") or (isinstance(lineage, list) and generation in lineage)

    # ------------------------------------------------------------------------------------------ writing

    def append(self, entry: plan.CopiedEntry) -> None:
        """Record one copied object: one line, one ``write(2)``, before this returns."""
        data = (entry.line() + "\n").encode()
        with self._lock:
            written = os.write(self._log_fd, data)
            if written != len(data):  # a full disk: the line is torn, the reader skips it
                raise errors.LocalDiskError(f"ingest journal {self._folder}: short write ({written} bytes)")
            self.appended += 1

    def adopt(self, write: Callable[[BinaryIO], object]) -> None:
        """Replace the whole record with a manifest ``write`` produces (the destination's, written elsewhere)."""
        with self._compact_lock:
            self._replace_base(write)
            with self._lock:
                os.close(self._log_fd)
                for name in (OLD_LOG, LOG):
                    (self._folder / name).unlink(missing_ok=True)
                self._log_fd = self._open_log()

    def pending(self) -> bool:
        """Whether the logs hold lines the base does not."""
        return any(_size_of(self._folder / name) for name in (OLD_LOG, LOG))

    def compact(self) -> str:
        """Fold the logs into a new base (module docstring); its generation."""
        with self._compact_lock:
            if (self._folder / OLD_LOG).exists():  # left by a compaction that crashed
                self._fold_old_log()
            with self._lock:
                os.close(self._log_fd)
                os.replace(self._folder / LOG, self._folder / OLD_LOG)
                self._log_fd = self._open_log()
            return self._fold_old_log()

    def _fold_old_log(self) -> str:
        old = self._folder / OLD_LOG
        changed = {entry.rel_path: entry for entry in plan.parse_lines(_read_lines(old))}
        header = self.header()
        previous = header.get("lineage")
        lineage = [str(header["generation"])] if header.get("generation") else []
        lineage += [str(g) for g in previous] if isinstance(previous, list) else []
        generation = uuid.uuid4().hex
        first = plan.header_line(
            source=self._source, generation=generation, lineage=lineage[:LINEAGE_KEPT], now=time.time()
        )
        self._replace_base(lambda fh: self._write_merged(fh, first, changed))
        old.unlink(missing_ok=True)
        return generation

    def _write_merged(self, fh: BinaryIO, first: str, changed: dict[str, plan.CopiedEntry]) -> None:
        fh.write((first + "\n").encode())
        with (
            contextlib.suppress(FileNotFoundError),
            self.base_path.open(encoding="utf-8", errors="replace") as base,
        ):
            for line in base:
                entry = plan.entry_of(line)
                if entry is not None and entry.rel_path not in changed:
                    fh.write(line.encode() if line.endswith("\n") else (line + "\n").encode())
        for entry in changed.values():
            fh.write((entry.line() + "\n").encode())

    def _replace_base(self, write: Callable[[BinaryIO], object]) -> None:
        """Write a new base beside the old one, fsync it, rename it over, fsync the folder."""
        new = self._folder / _NEW_BASE
        try:
            with new.open("wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            replace_file(new, self.base_path)
            dir_fd = os.open(self._folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise errors.LocalDiskError(f"ingest journal {self._folder}: {exc.strerror}") from exc

    def _open_log(self) -> int:
        return os.open(self._folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def replace_file(src: Path, dst: Path) -> None:
    """The atomic rename that publishes a compaction (a seam: tests fail it to crash between write and rename)."""
    os.replace(src, dst)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
