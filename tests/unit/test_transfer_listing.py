"""Listing a staging's sources as pages: folder by folder on a bounded pool, or one recursive listing streamed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import listing

ROOT = "mem://lake/run"


class TreeStore:
    """An in-memory ``base.FolderLister``: ``files`` maps '/'-separated paths to sizes. ``list_level`` yields a
    folder's files and sub-folders as Blob's List Blobs with ``delimiter=/`` does (``Blob`` and ``BlobPrefix``
    entries, https://learn.microsoft.com/rest/api/storageservices/enumerating-blob-resources); ``on_level`` runs
    at the start of each folder's listing (a seam for timing and failures)."""

    def __init__(self, files: dict[str, int], on_level: Callable[[str], None] | None = None) -> None:
        self._files = files
        self._on_level = on_level or (lambda _prefix: None)

    def list_level(self, uri: str, rel_prefix: str = "") -> Iterator[base.RemoteObject | base.SubFolder]:
        self._on_level(rel_prefix)
        below = [rel for rel in self._files if rel.startswith(rel_prefix)]
        if not below:
            raise errors.ObjectNotFoundError(f"{uri}: not found")
        folders: dict[str, None] = {}
        for rel in below:
            head, sep, _rest = rel[len(rel_prefix) :].partition("/")
            if sep:
                folders[head] = None
            else:
                yield self._obj(rel)
        for name in folders:
            yield base.SubFolder(uri=f"{ROOT}/{rel_prefix}{name}/", rel_prefix=f"{rel_prefix}{name}/")

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        raise AssertionError("a FolderLister is listed by level")

    def _obj(self, rel: str) -> base.RemoteObject:
        return base.RemoteObject(uri=f"{ROOT}/{rel}", rel_path=rel, size=self._files[rel], etag="e")

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


class FlatStore:
    """An ``ObjectStore`` without level listing: ``list_files`` yields ``before`` files, calls ``pause`` (a
    seam), then ``after`` more, as a paged recursive listing (List Blobs without a delimiter) would."""

    def __init__(self, before: int, after: int, pause: Callable[[], None]) -> None:
        self._before, self._after, self._pause = before, after, pause

    def list_files(self, uri: str) -> Iterator[base.RemoteObject]:
        for i in range(self._before + self._after):
            if i == self._before:
                self._pause()
            yield base.RemoteObject(uri=f"{uri}/f{i}", rel_path=f"f{i}", size=1, etag="e")

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


def read_all(listed: listing.SourceListing) -> list[listing.Page]:
    pages: list[listing.Page] = []
    while (page := listed.next_page(5.0)) is not None:
        assert page is not listing.WAITING, "the listing stalled"
        pages.append(page)
    return pages


def tree(folders: int, per_folder: int) -> dict[str, int]:
    files = {f"top{i}": 1 for i in range(3)}
    for f in range(folders):
        for i in range(per_folder):
            files[f"d{f}/sub/x{i}"] = i
    return files


def test_every_file_of_every_folder_is_listed_once() -> None:
    files = tree(folders=5, per_folder=30)
    with listing.SourceListing([TreeStore(files)], [ROOT], concurrency=3) as listed:
        pages = read_all(listed)
    listed_rels = [obj.rel_path for page in pages for obj in page.objects]
    assert sorted(listed_rels) == sorted(files)
    assert all(page.source == 0 and 0 < len(page.objects) <= listing.PAGE_FILES for page in pages)
    assert listed.finished and listed.listed_files == len(files)


def test_folders_are_listed_at_once_up_to_the_limit() -> None:
    files = tree(folders=6, per_folder=2)
    together = threading.Barrier(3, timeout=5)
    active, most = [0], [0]
    lock = threading.Lock()

    def on_level(prefix: str) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        if prefix.count("/") == 1:  # the six d<n>/ folders: three must be in flight together
            together.wait()
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    with listing.SourceListing([TreeStore(files, on_level)], [ROOT], concurrency=3) as listed:
        pages = read_all(listed)
    assert sum(len(page.objects) for page in pages) == len(files)
    assert most[0] == 3


def test_a_store_without_level_listing_is_streamed_page_by_page() -> None:
    first_page_read = threading.Event()

    def pause() -> None:
        if not first_page_read.wait(5):
            raise errors.StorageError("the first page was not handed on before the listing ended")

    store = FlatStore(before=listing.PAGE_FILES, after=10, pause=pause)
    with listing.SourceListing([store], ["mem://flat"], concurrency=8) as listed:
        first = listed.next_page(5.0)
        assert isinstance(first, listing.Page) and len(first.objects) == listing.PAGE_FILES
        first_page_read.set()
        rest = read_all(listed)
    assert sum(len(page.objects) for page in rest) == 10


def test_a_failure_in_any_folder_reaches_the_reader() -> None:
    def on_level(prefix: str) -> None:
        if prefix == "d3/":
            raise errors.TransientStorageError("503 ServerBusy")

    store = TreeStore(tree(folders=6, per_folder=2), on_level)
    with (
        listing.SourceListing([store], [ROOT], concurrency=2) as listed,
        pytest.raises(errors.TransientStorageError, match="ServerBusy"),
    ):
        read_all(listed)


def test_a_missing_source_is_not_found_but_a_vanished_folder_is_skipped() -> None:
    with (
        listing.SourceListing([TreeStore({})], [ROOT], concurrency=2) as listed,
        pytest.raises(errors.ObjectNotFoundError),
    ):
        read_all(listed)
    files = tree(folders=2, per_folder=2)

    def vanish(prefix: str) -> None:
        if prefix == "d1/":
            for rel in [rel for rel in files if rel.startswith("d1/")]:
                del files[rel]

    with listing.SourceListing([TreeStore(files, vanish)], [ROOT], concurrency=1) as listed:
        pages = read_all(listed)
    assert sorted(obj.rel_path for page in pages for obj in page.objects) == sorted(files)


def test_leaving_early_stops_the_listing_threads() -> None:
    files = {f"d{f}/x{i}": 1 for f in range(40) for i in range(listing.PAGE_FILES)}  # more pages than the queue
    with listing.SourceListing([TreeStore(files)], [ROOT], concurrency=4) as listed:
        assert isinstance(listed.next_page(5.0), listing.Page)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("stage-list") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("stage-list")]


def test_all_listed_is_known_before_the_pages_are_taken() -> None:
    """A small listing is complete long before a busy download takes its last page: whoever decides whether
    more files are coming (a helper process for the rest?) must see that, not wait for the last page."""
    files = tree(folders=2, per_folder=3)
    with listing.SourceListing([TreeStore(files)], [ROOT], concurrency=2) as listed:
        deadline = time.monotonic() + 5
        while not listed.all_listed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listed.all_listed and listed.listed_files == len(files)
        assert not listed.finished, "no page has been taken yet"
        read_all(listed)
    assert listed.finished
