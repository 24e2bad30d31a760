"""The resume manifest: which files a staging finished, so a staging run again fetches only the rest.

JSON lines in the stage dir (:data:`scalebus.transfer.plan.MANIFEST_NAME`), one ``{"path", "etag", "size"}`` per
file that was verified and renamed into place. Appended while staging, flushed at most every second: a lost tail
only costs refetches. Reading keeps only entries whose file is still on disk with the recorded size; whether the
etag still matches the remote file is the plan's decision.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import IO

from scalebus import errors
from scalebus.transfer import plan

FLUSH_INTERVAL_S = 1.0
"""The manifest is flushed to disk at most this often while staging (and when it is closed)."""


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
        self._fh: IO[str] | None = None
        self._flushed_at = 0.0

    def __enter__(self) -> Manifest:
        try:
            self._fh = self._path.open("a", encoding="utf-8")
        except OSError as exc:
            raise errors.StorageError(f"{self._path}: cannot write the staging manifest ({exc.strerror})") from exc
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def record(self, task: plan.FileTask) -> None:
        self.record_entry(plan.ManifestEntry(task.rel_dest, task.obj.etag, task.size))

    def record_entry(self, entry: plan.ManifestEntry) -> None:
        line = json.dumps({"path": entry.rel_path, "etag": entry.etag, "size": entry.size}) + "\n"
        with self._lock:
            assert self._fh is not None
            self._fh.write(line)
            now = time.monotonic()
            if now - self._flushed_at >= FLUSH_INTERVAL_S:
                self._fh.flush()
                self._flushed_at = now
