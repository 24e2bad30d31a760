"""The object-store port: the same assertions over the folder store and ADLS Gen2 (Azurite)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.settings import StagingSettings
from scalebus.transfer import publish, stage

StoreFactory = Callable[[], tuple[base.ObjectStore, str]]


@pytest.fixture
def store_and_root(store_factory: StoreFactory) -> tuple[base.ObjectStore, str]:
    return store_factory()


def listing(store: base.ObjectStore, uri: str) -> dict[str, int]:
    return {obj.rel_path: obj.size for obj in store.list_files(uri)}


def read(store: base.ObjectStore, obj: base.RemoteObject, **kwargs: int) -> bytes:
    sink = io.BytesIO()
    count = store.read_into(obj, sink, **kwargs)
    assert count == len(sink.getvalue())
    return sink.getvalue()


def test_lists_every_file_recursively(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    files = {"a.txt": b"a", "d/b.bin": b"bb", "d/e/c.bin": b"ccc", "with space/ü.txt": b"u", "empty": b""}
    for rel, data in files.items():
        store.write_bytes(data, root + "data/" + rel)
    store.write_bytes(b"not me", root + "data2/x")
    objects = list(store.list_files(root + "data"))
    assert {obj.rel_path: obj.size for obj in objects} == {rel: len(data) for rel, data in files.items()}
    assert all(obj.etag for obj in objects)
    for obj in objects:
        assert read(store, obj) == files[obj.rel_path]


def test_a_trailing_slash_lists_the_same(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"x", root + "data/x")
    assert listing(store, root + "data/") == listing(store, root + "data") == {"x": 1}


def test_a_file_uri_lists_itself_under_its_base_name(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"hello", root + "refs/genome.fa")
    (obj,) = store.list_files(root + "refs/genome.fa")
    assert (obj.uri, obj.rel_path, obj.size) == (root + "refs/genome.fa", "genome.fa", 5)


def test_nothing_there_is_not_found(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"x", root + "present")
    with pytest.raises(errors.ObjectNotFoundError):
        list(store.list_files(root + "absent"))
    with pytest.raises(errors.ObjectNotFoundError):
        list(store.list_files(root + "pres"))


def test_ranged_reads(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    data = os.urandom(300_000)
    store.write_bytes(data, root + "blob.bin")
    (obj,) = store.list_files(root + "blob.bin")
    assert read(store, obj) == data
    assert read(store, obj, offset=0, length=10) == data[:10]
    assert read(store, obj, offset=123_456, length=100_000) == data[123_456:223_456]
    assert read(store, obj, offset=299_990) == data[299_990:]


def test_reads_append_at_the_sinks_position(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"0123456789", root + "digits")
    (obj,) = store.list_files(root + "digits")
    sink = io.BytesIO(b"..........")
    sink.seek(5)
    assert store.read_into(obj, sink, offset=2, length=3) == 3
    assert sink.getvalue() == b".....234.."


def test_write_file_uploads_and_overwrites(store_and_root: tuple[base.ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_and_root
    local = tmp_path / "out.bin"
    local.write_bytes(b"first")
    store.write_file(local, root + "out/out.bin")
    (before,) = store.list_files(root + "out/out.bin")
    local.write_bytes(b"second version")
    store.write_file(local, root + "out/out.bin")
    (after,) = store.list_files(root + "out/out.bin")
    assert read(store, after) == b"second version"
    assert after.etag != before.etag


def test_exists_is_about_files(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"x", root + "dir/file")
    assert store.exists(root + "dir/file")
    assert not store.exists(root + "dir/other")
    assert not store.exists(root + "dir")


def test_reading_a_deleted_object_is_not_found(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"x", root + "f")
    (obj,) = store.list_files(root + "f")
    ghost = base.RemoteObject(obj.uri[:-1] + "g", "g", 1, obj.etag)
    with pytest.raises(errors.ObjectNotFoundError):
        store.read_into(ghost, io.BytesIO())


def test_stage_in_and_publish_round_trip(store_and_root: tuple[base.ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_and_root
    files = {"r1.fq": os.urandom(200_000), "idx/r1.fai": b"idx", "idx/deep/x": os.urandom(70_000)}
    for rel, data in files.items():
        store.write_bytes(data, root + "sample/" + rel)
    settings = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=4, min_free_bytes=0)
    stats = stage.stage_in(lambda _u: store, [root + "sample"], tmp_path / "stage", settings)
    assert stats.files == len(files)
    for rel, data in files.items():
        assert (tmp_path / "stage" / "sample" / rel).read_bytes() == data
    again = stage.stage_in(lambda _u: store, [root + "sample"], tmp_path / "stage", settings)
    assert (again.files, again.skipped_files) == (0, len(files))
    outputs_dir = tmp_path / "stage" / "sample"
    published = publish.publish(lambda _u: store, outputs_dir, root + "out/", settings)
    assert published.files == len(files)
    assert store.exists(root + "out/" + publish.MARKER_NAME)
    outputs = listing(store, root + "out")
    assert outputs.pop(publish.MARKER_NAME) > 0
    assert outputs == {rel: len(data) for rel, data in files.items()}
    assert publish.publish(lambda _u: store, outputs_dir, root + "out/", settings).already_published


def test_close_twice_is_harmless(store_and_root: tuple[base.ObjectStore, str]) -> None:
    store, root = store_and_root
    store.write_bytes(b"x", root + "closing.bin")
    assert store.exists(root + "closing.bin")
    store.close()
    store.close()
