"""The resume manifest: which files a staging finished, so a staging run again fetches only the rest.

JSON lines in the stage dir (:data:`scalebus.transfer.plan.MANIFEST_NAME`), one ``{"path", "etag", "size"}`` per
file that was verified and renamed into place. A line is added only after its file's rename, and lines are
written in batches (one ``os.write`` on an ``O_APPEND`` descriptor per :data:`RECORD_BATCH` files, or for the
first file finished :data:`RECORD_INTERVAL_S` after the last write, and at the end). So the file never names a
file that is not in place, and a SIGKILL loses at most the entries not yet written (fewer than
:data:`RECORD_BATCH`): those files are fetched again by the next staging, nothing worse. A crash of the machine
itself may also lose what the kernel had not written out, with the same cost.

Reading builds a compact index (:class:`scalebus.transfer.plan.ManifestIndex`) without touching the files it
names: the plan asks whether a file is still on disk with the recorded size only for a listed file whose etag and
size match its entry, so a resume stats only what the listing names.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from scalebus import errors
from scalebus.transfer import plan

RECORD_BATCH = 256
"""Most finished files whose entries wait in memory for one write."""
RECORD_INTERVAL_S = 0.05
"""Entries older than this are written with the next file that finishes."""
_READ_HINT_BYTES = 4 * 1024 * 1024
"""Lines are parsed a few MiB at a time."""
_PLAIN_LINE = re.compile(rb'^\{"path": "([^"\\\n]*)", "etag": "([^"\\\n]*)", "size": (\d+)\}$', re.MULTILINE)
"""A line exactly as :class:`Manifest` writes it, with nothing escaped in its strings (plain ASCII): the common
case, read without a JSON parser. Any other line (escaped characters, a torn line) goes through ``json``."""


def read_index(path: Path) -> plan.ManifestIndex:
    """The entries of a previous staging (the last entry for a path wins); an empty index if there is none.
    Lines that do not parse (a torn last line) are skipped."""
    index = plan.ManifestIndex()
    try:
        with path.open("rb") as fh:
            while lines := fh.readlines(_READ_HINT_BYTES):
                _add_block(index, lines)
    except FileNotFoundError:
        return index
    except OSError as exc:
        raise errors.StorageError(f"{path}: cannot read the staging manifest ({exc.strerror})") from exc
    return index


def _add_block(index: plan.ManifestIndex, lines: list[bytes]) -> None:
    """Add a block of lines in order; if any is not a plain line, the block goes line by line."""
    plain = _PLAIN_LINE.findall(b"".join(lines))
    if len(plain) == len(lines):
        index.add_all((rel_path.decode(), etag.decode(), int(size)) for rel_path, etag, size in plain)
        return
    for line in lines:
        match = _PLAIN_LINE.match(line.rstrip(b"\n"))
        if match is not None:
            index.add(match[1].decode(), match[2].decode(), int(match[3]))
        else:
            _add_json_line(index, line)


def _add_json_line(index: plan.ManifestIndex, line: bytes) -> None:
    try:
        raw: Any = json.loads(line)
        index.add(str(raw["path"]), str(raw["etag"]), int(raw["size"]))
    except (KeyError, TypeError, ValueError):
        return  # a torn or foreign line: that file is fetched again


def staged_size_matches(dest: Path) -> plan.StagedCheck:
    """``is_staged`` for the plan: whether ``dest/<rel_path>`` is there with ``size`` bytes."""
    root = os.path.join(os.fspath(dest), "")

    def is_staged(rel_path: str, size: int) -> bool:
        try:
            return os.stat(root + rel_path).st_size == size
        except (OSError, ValueError):
            return False

    return is_staged


class Manifest:
    """Append-only JSON lines, written from many threads in batches; use as a context manager around the
    staging (leaving it writes what is pending)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: list[str] = []
        self._written_at = 0.0

    def __enter__(self) -> Manifest:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self._path, flags, 0o666)
            _end_torn_line(self._fd)
        except OSError as exc:
            raise errors.StorageError(f"{self._path}: cannot write the staging manifest ({exc.strerror})") from exc
        self._written_at = time.monotonic()
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        if self._fd is None:
            return
        try:
            with self._lock:
                self._write_pending()
        except errors.LocalDiskError:
            if exc_type is None:
                raise  # else the staging's own failure is what the caller needs to see
        finally:
            os.close(self._fd)
            self._fd = None

    def record(self, task: plan.FileTask) -> None:
        self._add(task.rel_dest, task.obj.etag, task.size)

    def record_entry(self, entry: plan.ManifestEntry) -> None:
        self._add(entry.rel_path, entry.etag, entry.size)

    def flush(self) -> None:
        """Write the pending entries now."""
        with self._lock:
            self._write_pending()

    def _add(self, rel_path: str, etag: str, size: int) -> None:
        # The same text json.dumps gives for {"path", "etag", "size"}, at a fraction of its cost.
        line = f'{{"path": {encode_basestring_ascii(rel_path)}, "etag": {encode_basestring_ascii(etag)}, '
        line += f'"size": {int(size)}}}\n'
        with self._lock:
            self._pending.append(line)
            if len(self._pending) >= RECORD_BATCH or time.monotonic() - self._written_at >= RECORD_INTERVAL_S:
                self._write_pending()

    def _write_pending(self) -> None:
        """Under the lock: one write of every pending line."""
        if not self._pending:
            return
        assert self._fd is not None
        data = "".join(self._pending).encode()
        self._pending.clear()
        self._written_at = time.monotonic()
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise errors.LocalDiskError(
                f"{self._path}: cannot append to the staging manifest ({exc.strerror})"
            ) from exc
        if written != len(data):  # a full disk mid-line: the reader skips the torn line
            raise errors.LocalDiskError(f"{self._path}: short write to the staging manifest (disk full?)")


def _end_torn_line(fd: int) -> None:
    """End a last line a crash left without its newline, so the next entry starts a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")
