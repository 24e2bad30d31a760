"""Listing one folder level at a time (``base.FolderLister``): the same assertions over the folder store and ADLS
Gen2 (Azurite, lean and SDK paths). A walk of levels must see exactly what the recursive listing sees."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import datalake
from scalebus.backends.local import folder

StoreFactory = Callable[[], tuple[base.ObjectStore, str]]

ODD_FILES = {
    "a.txt": b"a",
    "d/b.bin": b"bb",
    "d/e/c.bin": b"ccc",
    "d/e/f/g/h.bin": b"deep",
    "with space/\u00fc.txt": b"u",
    "empty": b"",
    "pct/b%25 &.bin": b"percent and ampersand",
    "xml/\u00e9t\u00e9 & <x>.txt": b"XML metacharacters",
    "q/what?#.txt": b"query and fragment characters",
}


@pytest.fixture
def lister(store_factory: StoreFactory) -> tuple[base.FolderLister, base.ObjectStore, str]:
    store, root = store_factory()
    assert isinstance(store, base.FolderLister)
    return store, store, root


def put(store: base.ObjectStore, root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        store.write_bytes(data, root + urllib.parse.quote(rel))


def level(store: base.FolderLister, uri: str, rel_prefix: str = "") -> dict[str, object]:
    """A level as ``{rel_path: size}`` for files and ``{rel_prefix: "folder"}`` for sub-folders."""
    shown: dict[str, object] = {}
    for entry in store.list_level(uri, rel_prefix):
        if isinstance(entry, base.SubFolder):
            shown[entry.rel_prefix] = "folder"
        else:
            shown[entry.rel_path] = entry.size
    return shown


def walk(store: base.FolderLister, uri: str) -> list[base.RemoteObject]:
    """Every file below ``uri``, one level at a time, as a staging walks it."""
    pending, files = [(uri, "")], []
    while pending:
        folder, rel_prefix = pending.pop()
        for entry in store.list_level(folder, rel_prefix):
            if isinstance(entry, base.SubFolder):
                pending.append((entry.uri, entry.rel_prefix))
            else:
                files.append(entry)
    return files


def as_compared(objects: list[base.RemoteObject]) -> list[tuple[str, str, int, str]]:
    return sorted((obj.rel_path, obj.uri, obj.size, obj.etag) for obj in objects)


def test_a_level_holds_its_files_and_sub_folders(lister: tuple[base.FolderLister, base.ObjectStore, str]) -> None:
    store, writer, root = lister
    put(writer, root + "data/", ODD_FILES)
    writer.write_bytes(b"not me", root + "data2/x")
    assert level(store, root + "data") == {
        "a.txt": 1,
        "empty": 0,
        "d/": "folder",
        "with space/": "folder",
        "pct/": "folder",
        "xml/": "folder",
        "q/": "folder",
    }
    (sub,) = (e for e in store.list_level(root + "data") if isinstance(e, base.SubFolder) and e.rel_prefix == "d/")
    assert sub.uri.rstrip("/") == root + "data/d"
    assert level(store, sub.uri, sub.rel_prefix) == {"d/b.bin": 2, "d/e/": "folder"}


def test_a_walk_of_levels_sees_what_the_recursive_listing_sees(
    lister: tuple[base.FolderLister, base.ObjectStore, str],
) -> None:
    store, writer, root = lister
    put(writer, root + "data/", ODD_FILES)
    writer.write_bytes(b"not me", root + "data2/x")
    walked = walk(store, root + "data")
    assert as_compared(walked) == as_compared(list(writer.list_files(root + "data")))
    assert {obj.rel_path for obj in walked} == set(ODD_FILES)
    for obj in walked:
        assert writer.exists(obj.uri)


def test_small_pages_change_nothing(
    lister: tuple[base.FolderLister, base.ObjectStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of two entries (files and folders mixed) split every level over several List Blobs pages; the
    folder store reads a level in one ``scandir`` and is unaffected."""
    store, writer, root = lister
    files = {f"f{i}": bytes(i) for i in range(5)} | {f"s{i}/x": b"x" for i in range(4)} | ODD_FILES
    put(writer, root + "data/", files)
    expected = as_compared(list(writer.list_files(root + "data")))
    monkeypatch.setattr(datalake, "_LIST_PAGE", 2)
    assert as_compared(walk(store, root + "data")) == expected
    assert {obj.rel_path for obj in walk(store, root + "data")} == set(files)
    assert len(level(store, root + "data")) == 5 + 4 + 7


def test_a_trailing_slash_lists_the_same(lister: tuple[base.FolderLister, base.ObjectStore, str]) -> None:
    store, writer, root = lister
    put(writer, root + "data/", {"x": b"x", "sub/y": b"yy"})
    assert level(store, root + "data/") == level(store, root + "data") == {"x": 1, "sub/": "folder"}


def test_a_file_uri_lists_itself_under_its_base_name(
    lister: tuple[base.FolderLister, base.ObjectStore, str],
) -> None:
    store, writer, root = lister
    writer.write_bytes(b"hello", root + "refs/genome.fa")
    (obj,) = store.list_level(root + "refs/genome.fa")
    assert isinstance(obj, base.RemoteObject)
    (listed,) = writer.list_files(root + "refs/genome.fa")
    assert (obj.uri, obj.rel_path, obj.size, obj.etag) == (root + "refs/genome.fa", "genome.fa", 5, listed.etag)


def test_a_file_and_folders_sharing_its_name_as_a_prefix(
    lister: tuple[base.FolderLister, base.ObjectStore, str],
) -> None:
    store, writer, root = lister
    put(writer, root + "a/", {"b": b"file b", "b.txt": b"t", "bc/c": b"cc", "b-1/d": b"d"})
    assert level(store, root + "a") == {"b": 6, "b.txt": 1, "bc/": "folder", "b-1/": "folder"}
    assert level(store, root + "a/b") == {"b": 6}
    assert level(store, root + "a/bc") == {"c": 2}
    assert level(store, root + "a/bc/", "bc/") == {"bc/c": 2}


def test_nothing_there_is_not_found_on_the_first_next(
    lister: tuple[base.FolderLister, base.ObjectStore, str],
) -> None:
    store, writer, root = lister
    writer.write_bytes(b"x", root + "present/x")
    absent = [root + "absent", root + "pres", root + "absent/"]
    if not isinstance(store, folder.FolderStore):
        # Below a blob's name there is nothing; on local disk a file inside the path is the store's folders
        # changing under it, a storage failure (FolderStore._stat_listed).
        absent.append(root + "present/x/y")
    for uri in absent:
        entries = store.list_level(uri)  # nothing is asked before the first next
        with pytest.raises(errors.ObjectNotFoundError):
            next(iter(entries))
