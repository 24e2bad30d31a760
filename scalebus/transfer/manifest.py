"""The resume manifest: which files a staging finished, so a staging run again fetches only the rest.

JSON lines in the stage dir (:data:`scalebus.transfer.plan.MANIFEST_NAME`), one ``{"path", "etag", "size"}`` per
file that was verified and renamed into place. Each line is one ``os.write`` on an ``O_APPEND`` descriptor, made
right after the rename: nothing is buffered in this process, so a SIGKILL loses no finished file (a crash of the
machine itself may still lose what the kernel had not written out; that only costs refetches). Reading keeps
only entries whose file is still on disk with the recorded size; whether the etag still matches the remote file
is the plan's decision.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from scalebus import errors
from scalebus.transfer import plan


def read_manifest(path: Path, dest: Path) -> dict[str, plan.ManifestEntry]:
    """Entries of a previous staging whose file is still on disk with the recorded size (last entry wins)."""
    entries: dict[str, plan.ManifestEntry] = {}
    try:
        with path.open("r", encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    raw = json.loads(line)
                    entry = plan.ManifestEntry(str(raw["path"]), str(raw["etag"]), int(raw["size"]))
                    entries[entry.rel_path] = entry
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise errors.StorageError(f"{path}: cannot read the staging manifest ({exc.strerror})") from exc
    present: dict[str, plan.ManifestEntry] = {}
    for rel_path, entry in entries.items():
        try:
            st = os.stat(dest / rel_path)
        except (OSError, ValueError):
            continue
        if st.st_size == entry.size:
            present[rel_path] = entry
    return present


class Manifest:
    """Append-only JSON lines, written from many threads; use as a context manager around the staging."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> Manifest:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self._path, flags, 0o666)
            _end_torn_line(self._fd)
        except OSError as exc:
            raise errors.StorageError(f"{self._path}: cannot write the staging manifest ({exc.strerror})") from exc
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def record(self, task: plan.FileTask) -> None:
        self.record_entry(plan.ManifestEntry(task.rel_dest, task.obj.etag, task.size))

    def record_entry(self, entry: plan.ManifestEntry) -> None:
        line = (json.dumps({"path": entry.rel_path, "etag": entry.etag, "size": entry.size}) + "\n").encode()
        with self._lock:
            assert self._fd is not None
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                raise errors.LocalDiskError(
                    f"{self._path}: cannot append to the staging manifest ({exc.strerror})"
                ) from exc
            if written != len(line):  # a full disk mid-line: the reader skips the torn line
                raise errors.LocalDiskError(f"{self._path}: short write to the staging manifest (disk full?)")


def _end_torn_line(fd: int) -> None:
    """End a last line a crash left without its newline, so the next entry starts a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")
