"""Staging while the listing streams in: the first byte before the last page, late failures, the input cache."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import plan, stage

SETTINGS = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=4, min_free_bytes=0, processes=1)


class MemoryLake:
    """An in-memory ``base.ObjectStore`` + ``base.FolderLister``: ``files`` maps URIs under ``mem://<lake>/`` to
    bytes. ``list_level`` yields a folder's files then its sub-folders, as Blob's List Blobs with ``delimiter=/``
    (``Blob`` and ``BlobPrefix`` entries, https://learn.microsoft.com/rest/api/storageservices/enumerating-blob-
    resources); ``before_level(uri)`` runs as each folder's listing starts (a seam for timing and failures).
    Counts reads, and wakes ``read_happened`` at the first."""

    def __init__(self, files: dict[str, bytes], before_level: Callable[[str], None] | None = None) -> None:
        self.files = files
        self._before_level = before_level or (lambda _uri: None)
        self.reads: list[str] = []
        self.read_happened = threading.Event()

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[base.RemoteObject | base.SubFolder]:
        self._before_level(uri)
        folder = uri.rstrip("/") + "/"
        below = [u for u in self.files if u.startswith(folder)]
        if not below:
            raise errors.ObjectNotFoundError(f"{uri}: not found")
        subs: dict[str, None] = {}
        for u in below:
            name, sep, _ = u[len(folder) :].partition("/")
            if sep:
                subs[name] = None
            else:
                yield base.RemoteObject(uri=u, rel_path=rel_prefix + name, size=len(self.files[u]), etag="e1")
        for name in subs:
            yield base.SubFolder(uri=f"{folder}{name}/", rel_prefix=f"{rel_prefix}{name}/")

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        raise AssertionError("a FolderLister is listed by level")

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        self.reads.append(obj.uri)
        self.read_happened.set()
        data = self.files[obj.uri][offset : None if length is None else offset + length]
        sink.write(data)
        return len(data)

    def write_file(self, source: Path, uri: str) -> None:
        raise NotImplementedError

    def write_bytes(self, data: bytes, uri: str) -> None:
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        return uri in self.files

    def close(self) -> None:
        """Nothing to release."""


def manifest_paths(dest: Path) -> set[str]:
    return {json.loads(line)["path"] for line in (dest / plan.MANIFEST_NAME).read_text().splitlines()}


@pytest.mark.parametrize("processes", [1, 0], ids=["one-process", "auto"])
def test_downloads_start_while_the_listing_continues(tmp_path: Path, processes: int) -> None:
    def before_level(uri: str) -> None:
        if uri.endswith("/late/") and not lake.read_happened.wait(5):
            raise errors.StorageError("nothing was downloaded before the listing's end")

    files = {f"mem://lake/run/early{i}": b"e" * i for i in range(5)} | {"mem://lake/run/late/x": b"late"}
    lake = MemoryLake(files, before_level)
    settings = SETTINGS.model_copy(update={"processes": processes})
    stats = stage.stage_in(lambda _u: lake, ["mem://lake/run"], tmp_path / "stage", settings)
    assert (tmp_path / "stage" / "run" / "late" / "x").read_bytes() == b"late"
    assert stats.files == 6 and stats.first_byte_s is not None and stats.first_byte_s >= 0


def test_a_collision_on_a_later_page_fails_the_staging_and_keeps_what_was_fetched(tmp_path: Path) -> None:
    def before_level(uri: str) -> None:
        if uri.startswith("mem://lake2") and not lake.read_happened.wait(5):
            raise errors.StorageError("the first source was not fetched first")

    files = {f"mem://lake1/reads/f{i}": b"1" for i in range(3)} | {"mem://lake2/reads/f1": b"2"}
    lake = MemoryLake(files, before_level)
    dest = tmp_path / "stage"
    with pytest.raises(errors.UnsafePathError, match="both") as caught:
        stage.stage_in(lambda _u: lake, ["mem://lake1/reads", "mem://lake2/reads"], dest, SETTINGS)
    assert "lake1" in str(caught.value)
    fetched = {f"reads/{p.name}" for p in (dest / "reads").iterdir()}
    assert fetched and fetched <= {"reads/f0", "reads/f1", "reads/f2"}
    assert manifest_paths(dest) == fetched
    assert all((dest / rel).read_bytes() == b"1" for rel in fetched)
    assert not list(dest.rglob(f"*{plan.PART_SUFFIX}"))


class MemoryCache:
    """An in-test ``kit.InputCache`` (our own port): serves the URIs in ``hits`` by writing their bytes at the
    target, records every file offered to it."""

    def __init__(self, hits: dict[str, bytes]) -> None:
        self.hits = hits
        self.asked: list[str] = []
        self.kept: dict[str, bytes] = {}

    def place(self, obj: base.RemoteObject, target: Path) -> bool:
        self.asked.append(obj.uri)
        if obj.uri not in self.hits:
            return False
        target.write_bytes(self.hits[obj.uri])
        return True

    def keep(self, obj: base.RemoteObject, path: Path) -> None:
        self.kept[obj.uri] = path.read_bytes()


def test_the_cache_is_asked_before_each_fetch_and_offered_each_fetched_file(tmp_path: Path) -> None:
    large = bytes(range(256)) * 1000  # several chunks
    files = {"mem://lake/run/a": b"alpha", "mem://lake/run/big": large, "mem://lake/run/sub/c": b"c" * 10}
    lake = MemoryLake(files)
    cache = MemoryCache({"mem://lake/run/a": b"alpha", "mem://lake/run/big": large})
    dest = tmp_path / "stage"
    stats = stage.stage_in(lambda _u: lake, ["mem://lake/run"], dest, SETTINGS, cache=cache)
    assert sorted(cache.asked) == sorted(files)
    assert lake.reads == ["mem://lake/run/sub/c"]
    assert cache.kept == {"mem://lake/run/sub/c": b"c" * 10}
    assert (stats.files, stats.cached_files, stats.cached_bytes) == (3, 2, 5 + len(large))
    assert (dest / "run" / "big").read_bytes() == large
    assert manifest_paths(dest) == {"run/a", "run/big", "run/sub/c"}
    again = stage.stage_in(lambda _u: lake, ["mem://lake/run"], dest, SETTINGS, cache=cache)
    assert (again.files, again.skipped_files, again.first_byte_s) == (0, 3, None)


def test_a_listing_failure_after_some_downloads_fails_the_staging(tmp_path: Path) -> None:
    def before_level(uri: str) -> None:
        if uri.endswith("/late/"):
            lake.read_happened.wait(5)
            raise errors.TransientStorageError("503 ServerBusy")

    files = {"mem://lake/run/a": b"a", "mem://lake/run/late/x": b"x"}
    lake = MemoryLake(files, before_level)
    with pytest.raises(errors.TransientStorageError, match="ServerBusy"):
        stage.stage_in(lambda _u: lake, ["mem://lake/run"], tmp_path / "stage", SETTINGS)
    assert manifest_paths(tmp_path / "stage") == {"run/a"}


class ConcurrencyLake(MemoryLake):
    """A ``MemoryLake`` whose reads take ``delay_s`` (a link with latency) or wait for ``together`` reads to be
    in flight at once; it records the most reads in flight."""

    def __init__(self, files: dict[str, bytes], *, delay_s: float = 0.0, together: int = 0) -> None:
        super().__init__(files)
        self._delay_s = delay_s
        self._barrier = threading.Barrier(together, timeout=5) if together else None
        self._lock = threading.Lock()
        self._in_flight = 0
        self.most_in_flight = 0

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        with self._lock:
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            if self._barrier is not None:
                self._barrier.wait()
            threading.Event().wait(self._delay_s)
            return super().read_into(obj, sink, offset=offset, length=length)
        finally:
            with self._lock:
                self._in_flight -= 1


def test_large_files_are_fetched_on_every_thread_from_the_start(tmp_path: Path) -> None:
    size = plan.SMALL_UNIT_BYTES + 1
    lake = ConcurrencyLake({f"mem://lake/run/f{i}": b"x" * size for i in range(4)}, together=4)
    settings = SETTINGS.model_copy(update={"chunk_size_bytes": 4 * size})
    stats = stage.stage_in(lambda _u: lake, ["mem://lake/run"], tmp_path / "stage", settings)
    assert stats.files == 4 and lake.most_in_flight == 4


def test_a_slow_source_gets_more_threads_than_at_the_start(tmp_path: Path) -> None:
    lake = ConcurrencyLake({f"mem://lake/run/f{i:03d}": b"x" for i in range(150)}, delay_s=0.02)
    settings = SETTINGS.model_copy(update={"max_concurrency": 8})
    stage.stage_in(lambda _u: lake, ["mem://lake/run"], tmp_path / "stage", settings)
    assert lake.most_in_flight > plan.THREADS_START
