"""The folder store's one-level listing keeps the recursive listing's guarantees: confinement to the roots,
symlinks leading out refused, only regular files, the store's own temporary files never listed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local.folder import TEMP_DIR_NAME, FolderStore, uri_of


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """A lake root with nested data, and a secret outside it worth stealing."""
    root = tmp_path / "lake"
    (root / "in" / "d" / "e").mkdir(parents=True)
    (root / "in" / "a.txt").write_text("alpha")
    (root / "in" / "d" / "b.txt").write_text("bb")
    (root / "in" / "d" / "e" / "c.txt").write_text("ccc")
    (tmp_path / "secret.txt").write_text("the worker's secret")
    return root


def confined(lake: Path, *reserved: Path) -> FolderStore:
    return FolderStore(roots=[str(lake)], reserved=[str(p) for p in reserved])


def names(store: FolderStore, uri: str, rel_prefix: str = "") -> list[str]:
    return [
        e.rel_prefix if isinstance(e, base.SubFolder) else e.rel_path for e in store.list_level(uri, rel_prefix)
    ]


def walk(store: FolderStore, uri: str) -> list[base.RemoteObject]:
    pending, files = [(uri, "")], []
    while pending:
        folder, rel_prefix = pending.pop()
        for entry in store.list_level(folder, rel_prefix):
            if isinstance(entry, base.SubFolder):
                pending.append((entry.uri, entry.rel_prefix))
            else:
                files.append(entry)
    return sorted(files, key=lambda o: o.rel_path)


def test_outside_the_roots_and_in_reserved_folders_is_refused(lake: Path, tmp_path: Path) -> None:
    reserved = lake / "work"
    reserved.mkdir()
    store = confined(lake, reserved)
    with pytest.raises(errors.UnsafePathError, match=r"outside storage\.local_roots"):
        next(store.list_level(uri_of(tmp_path)))
    with pytest.raises(errors.UnsafePathError, match="worker's own folders"):
        next(store.list_level(uri_of(reserved)))
    with pytest.raises(errors.UnsafePathError, match="system folders"):
        next(FolderStore().list_level("file:///proc/self"))
    assert names(store, uri_of(lake / "in")) == ["a.txt", "d/"]


def test_a_symlink_leading_out_is_refused_one_staying_inside_is_a_file(lake: Path, tmp_path: Path) -> None:
    store = confined(lake)
    (lake / "in" / "d" / "inside.txt").symlink_to(lake / "in" / "a.txt")
    (lake / "in" / "d" / "dir-link").symlink_to(lake / "in" / "d" / "e")  # never followed, as in list_files
    assert names(store, uri_of(lake / "in" / "d"), "d/") == ["d/b.txt", "d/e/", "d/inside.txt"]
    (lake / "in" / "d" / "looks-harmless.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(errors.UnsafePathError, match=r"'d/looks-harmless\.txt': a symlink that"):
        list(store.list_level(uri_of(lake / "in" / "d"), "d/"))


def test_a_sub_folder_swapped_for_a_symlink_out_is_refused_when_listed(lake: Path, tmp_path: Path) -> None:
    store = confined(lake)
    (sub,) = (e for e in store.list_level(uri_of(lake / "in")) if isinstance(e, base.SubFolder))
    (tmp_path / "outside").mkdir()
    shutil.rmtree(lake / "in" / "d")
    (lake / "in" / "d").symlink_to(tmp_path / "outside")
    with pytest.raises(errors.UnsafePathError, match=r"outside storage\.local_roots"):
        next(store.list_level(sub.uri, sub.rel_prefix))


def test_a_sub_folder_that_became_a_file_is_not_found(lake: Path) -> None:
    store = confined(lake)
    (sub,) = (e for e in store.list_level(uri_of(lake / "in")) if isinstance(e, base.SubFolder))
    shutil.rmtree(lake / "in" / "d")
    (lake / "in" / "d").write_text("now a file")
    with pytest.raises(errors.ObjectNotFoundError, match="no longer a folder"):
        next(store.list_level(sub.uri, sub.rel_prefix))


def test_fifos_and_the_stores_temporary_files_are_not_listed(lake: Path) -> None:
    store = confined(lake)
    os.mkfifo(lake / "in" / "pipe")
    (lake / "in" / TEMP_DIR_NAME).mkdir()
    (lake / "in" / TEMP_DIR_NAME / "x").write_text("half a write")
    (lake / "in" / ".sb-0123456789abcdef.part").write_text("a leftover")
    assert names(store, uri_of(lake / "in")) == ["a.txt", "d/"]
    with pytest.raises(errors.UnsafePathError, match="not a regular file"):
        next(store.list_level(uri_of(lake / "in" / "pipe")))


def test_an_empty_folder_lists_empty_and_a_walk_matches_list_files(lake: Path) -> None:
    store = confined(lake)
    (lake / "in" / "hollow").mkdir()
    (lake / "in" / "d" / "inside.txt").symlink_to(lake / "in" / "a.txt")
    assert names(store, uri_of(lake / "in" / "hollow"), "hollow/") == []
    listed = sorted(store.list_files(uri_of(lake / "in")), key=lambda o: o.rel_path)
    assert walk(store, uri_of(lake / "in")) == listed
    assert [o.rel_path for o in listed] == ["a.txt", "d/b.txt", "d/e/c.txt", "d/inside.txt"]
