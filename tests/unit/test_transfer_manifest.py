"""The resume manifest: its lines, its batched writes, and the compact index a resume reads from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.transfer import manifest, plan


def task(rel: str, etag: str = "e1", size: int = 3) -> plan.FileTask:
    obj = base.RemoteObject(uri=f"mem://x/{rel}", rel_path=rel, size=size, etag=etag)
    return plan.FileTask(obj=obj, rel_dest=rel, source=0, chunks=(plan.Chunk(0, size),))


@pytest.mark.parametrize(
    ("rel", "etag"),
    [("run/a.fq", "0x8DC"), ("run/é 日本.fq", '"quoted"'), ("back\\slash", "tab\tetag")],
    ids=["plain", "non-ascii-and-quotes", "escapes"],
)
def test_lines_are_what_json_dumps_writes_and_read_back(tmp_path: Path, rel: str, etag: str) -> None:
    path = tmp_path / plan.MANIFEST_NAME
    with manifest.Manifest(path) as record:
        record.record(task(rel, etag, 7))
    expected = json.dumps({"path": rel, "etag": etag, "size": 7}) + "\n"
    assert path.read_text() == expected
    index = manifest.read_index(path)
    assert index.matches(rel, etag, 7) and not index.matches(rel, etag, 8) and len(index) == 1


def test_every_entry_is_on_disk_after_the_staging_and_full_batches_before(tmp_path: Path) -> None:
    path = tmp_path / plan.MANIFEST_NAME
    with manifest.Manifest(path) as record:
        for i in range(manifest.RECORD_BATCH):
            record.record(task(f"f{i}"))
        assert len(path.read_text().splitlines()) == manifest.RECORD_BATCH  # a full batch is written at once
        record.record(task("last"))
    assert len(path.read_text().splitlines()) == manifest.RECORD_BATCH + 1


def test_reading_skips_torn_and_foreign_lines_and_keeps_the_last_entry(tmp_path: Path) -> None:
    path = tmp_path / plan.MANIFEST_NAME
    lines = [
        json.dumps({"path": "a", "etag": "old", "size": 1}),
        json.dumps({"size": 2, "etag": "e", "path": "b"}, separators=(",", ":")),  # another writer's shape
        "[1, 2]",
        json.dumps({"path": "a", "etag": "new", "size": 1}),
        '{"path": "c", "et',  # torn by a crash
    ]
    path.write_text("\n".join(lines))
    index = manifest.read_index(path)
    assert index.matches("a", "new", 1) and not index.matches("a", "old", 1)
    assert index.matches("b", "e", 2) and len(index) == 2


def test_a_new_staging_starts_its_lines_after_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / plan.MANIFEST_NAME
    path.write_text('{"path": "c", "et')
    with manifest.Manifest(path) as record:
        record.record(task("d"))
    assert manifest.read_index(path).matches("d", "e1", 3)


def test_no_manifest_is_an_empty_index(tmp_path: Path) -> None:
    assert len(manifest.read_index(tmp_path / "none")) == 0


def test_a_full_disk_at_the_last_write_does_not_hide_the_staging_failure() -> None:
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("needs /dev/full")
    with pytest.raises(errors.LocalDiskError, match="staging manifest"), manifest.Manifest(full) as record:
        record.record(task("a"))
    with pytest.raises(errors.IntegrityError, match="the staging's own"), manifest.Manifest(full) as record:
        record.record(task("a"))
        raise errors.IntegrityError("the staging's own failure")


def test_the_size_check_looks_at_the_disk(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    is_staged = manifest.staged_size_matches(tmp_path)
    assert is_staged("d/f", 3)
    assert not is_staged("d/f", 4) and not is_staged("d/gone", 3) and not is_staged("d/f\x00", 3)
