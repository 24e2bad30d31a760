"""The ingest journal: an append-only record that survives SIGKILL mid-run and a crash mid-compaction, and the
server-side copy path (presigned S3 URLs, Put Block From URL) at our own seams."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.aws import s3
from scalebus.backends.local import folder
from scalebus.ingest import engine, journal, plan
from scalebus.settings import IngestSettings
from tests.fakes.moto_plugin import S3Server

REPO = Path(__file__).resolve().parents[2]


def entry(i: int, etag: str = "e") -> plan.CopiedEntry:
    return plan.CopiedEntry(f"d/f{i}", f"{etag}{i}", i, copied_at=float(i))


def recorded(folder_path: Path) -> dict[str, plan.CopiedEntry]:
    with journal.Journal(folder_path, source="s3://b/p") as record:
        return {e.rel_path: e for e in plan.parse_lines(record.lines())}


# ------------------------------------------------------------------------------------------ the log itself


def test_appends_compact_into_a_base_and_the_last_line_wins(tmp_path: Path) -> None:
    with journal.Journal(tmp_path / "j", source="s3://b/p") as record:
        for i in range(5):
            record.append(entry(i))
        first = record.compact()
        record.append(entry(2, etag="new"))
        assert record.pending()
        second = record.compact()
        assert not record.pending() and record.owns(first) and record.owns(second)
        base_lines = record.base_path.read_text().splitlines()
    assert plan.parse_header(base_lines[0])["generation"] == second
    assert len(base_lines) == 1 + 5  # compacted: one line per path
    assert recorded(tmp_path / "j")["d/f2"].etag == "new2"


def test_one_ingest_of_a_pair_at_a_time(tmp_path: Path) -> None:
    with journal.Journal(tmp_path / "j", source="s"), pytest.raises(errors.UserInputError, match="another ingest"):
        journal.Journal(tmp_path / "j", source="s")


_CRASHING_COMPACTION = """
import os, sys
from pathlib import Path
from scalebus.ingest import journal, plan

folder, point = Path(sys.argv[1]), sys.argv[2]
record = journal.Journal(folder, source="s3://b/p")
for i in range(100):
    record.append(plan.CopiedEntry(f"d/f{i}", f"e{i}", i, copied_at=float(i)))
record.compact()
for i in range(50, 150):
    record.append(plan.CopiedEntry(f"d/f{i}", f"v2-{i}", i, copied_at=float(i)))
rename = journal.os.replace

def crash(src, dst):
    if point == "after-rename":
        rename(src, dst)
    os._exit(9)  # the process dies here, as under SIGKILL: no cleanup, no flush beyond what was written

journal.replace_file = crash
record.compact()
"""


@pytest.mark.parametrize("point", ["before-rename", "after-rename"])
def test_a_compaction_that_crashes_leaves_a_complete_record(tmp_path: Path, point: str) -> None:
    folder_path = tmp_path / "j"
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_COMPACTION, str(folder_path), point], cwd=REPO, timeout=60, check=False
    )
    assert done.returncode == 9
    assert (folder_path / journal.OLD_LOG).exists()  # the crash struck mid-compaction
    after = recorded(folder_path)
    assert set(after) == {f"d/f{i}" for i in range(150)}
    assert [after[f"d/f{i}"].etag for i in (0, 49, 50, 149)] == ["e0", "e49", "v2-50", "v2-149"]
    with journal.Journal(folder_path, source="s3://b/p") as record:  # the next compaction folds the leftover in
        record.compact()
        assert not (folder_path / journal.OLD_LOG).exists() and not record.pending()
    assert recorded(folder_path) == after


# ------------------------------------------------------------------------------------------ kill -9 mid-run

_SLOW_INGEST = """
import sys, time
from scalebus.backends.local import folder
from scalebus.ingest import engine
from scalebus.settings import IngestSettings

class SlowSource(folder.FolderStore):
    def read_into(self, obj, sink, *, offset=0, length=None):
        time.sleep(0.005)
        return super().read_into(obj, sink, offset=offset, length=length)

settings = IngestSettings(scratch_dir=sys.argv[3], max_concurrency=4, checkpoint_interval_s=0.2)
engine.ingest(SlowSource(), sys.argv[1], folder.FolderStore(), sys.argv[2], settings)
"""


def _lines(folder_path: Path) -> int:
    """Lines in a journal another process holds (read without its lock)."""
    count = 0
    for name in (journal.BASE, journal.OLD_LOG, journal.LOG):
        try:
            count += (folder_path / name).read_bytes().count(b"\n")
        except FileNotFoundError:
            continue
    return count


def test_kill_9_mid_run_then_a_rerun_copies_only_what_had_not_finished(tmp_path: Path) -> None:
    src, dest, scratch = tmp_path / "src", tmp_path / "dest", tmp_path / "scratch"
    files = {f"s{i % 7}/f{i:04d}": hashlib.sha256(str(i).encode()).digest() * (1 + i % 5) for i in range(1500)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    src_uri, dest_uri = folder.uri_of(src), folder.uri_of(dest)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_INGEST, src_uri, dest_uri, str(scratch)], cwd=REPO, stderr=subprocess.DEVNULL
    )
    folder_path = journal.folder_for(
        engine.journal_root(IngestSettings(scratch_dir=str(scratch))), source=src_uri, dest=dest_uri + "/"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _lines(folder_path) < 300:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    finished = recorded(folder_path)
    assert 0 < len(finished) < len(files)  # killed mid-run, with some of it recorded
    landed_before = {rel: (dest / rel).stat().st_mtime_ns for rel in finished}

    settings = IngestSettings(scratch_dir=str(scratch), max_concurrency=4)
    rerun = engine.ingest(folder.FolderStore(), src_uri, folder.FolderStore(), dest_uri, settings)
    assert (rerun.skipped_files, rerun.copied_files) == (len(finished), len(files) - len(finished))
    assert {rel: (dest / rel).stat().st_mtime_ns for rel in finished} == landed_before  # none written again
    assert {rel: (dest / rel).read_bytes() for rel in files} == files
    manifest = plan.parse_manifest((dest / plan.MANIFEST_NAME).read_bytes())
    assert set(manifest) == set(files)


# ------------------------------------------------------------------------------------------ server-side copies


def test_put_block_from_url_blocks_cover_the_object_with_equal_length_ids() -> None:
    from scalebus.backends.azure import datalake

    blocks = datalake.from_url_blocks(250, block_bytes=100)
    assert [(offset, length) for _, offset, length in blocks] == [(0, 100), (100, 100), (200, 50)]
    assert len({len(block_id) for block_id, _, _ in blocks}) == 1
    assert datalake.from_url_blocks(0, block_bytes=100) == []


class UrlFetchingStore(folder.FolderStore):
    """A destination that copies from a URL as Azure's Put Block From URL does: the service GETs the source
    range itself and, given ``x-ms-source-content-md5``, checks the bytes against it
    (https://learn.microsoft.com/rest/api/storageservices/put-block-from-url). ``refuse``: answer as Azurite
    3.35 does (not implemented)."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.copied: list[str] = []

    def copy_from_url(self, url: str, uri: str, *, size: int, content_md5: bytes | None) -> bool:
        if self.refuse:
            return False
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        if len(data) != size or (content_md5 is not None and hashlib.md5(data).digest() != content_md5):
            raise errors.IntegrityError(f"{uri}: the source's bytes do not match")
        self.write_bytes(data, uri)
        self.copied.append(uri)
        return True


class CountingSource:
    """The S3 source, counting the bytes this process reads through it."""

    def __init__(self, inner: s3.S3Source) -> None:
        self._inner = inner
        self.read_calls = 0

    def list_files(self, uri: str) -> Any:
        return self._inner.list_files(uri)

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        self.read_calls += 1
        return self._inner.read_into(obj, sink, offset=offset, length=length)

    def copy_source(self, obj: base.RemoteObject, *, expires_s: int) -> tuple[str, bytes | None]:
        return self._inner.copy_source(obj, expires_s=expires_s)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("refuse", [False, True], ids=["server-side", "falls-back-to-streaming"])
def test_s3_objects_go_store_to_store_through_presigned_urls(
    s3_env: S3Server, tmp_path: Path, refuse: bool
) -> None:
    bucket = s3_env.new_bucket()
    data = {"a.txt": b"alpha", "d/b.bin": os.urandom(300_000), "empty": b""}
    for rel, body in data.items():
        s3_env.client().put_object(Bucket=bucket, Key=f"in/{rel}", Body=body)
    settings = s3_env.settings(scratch_dir=str(tmp_path / "scratch"))
    source = CountingSource(s3.open_source(settings))
    store = UrlFetchingStore(refuse=refuse)
    dest = tmp_path / "dest"
    try:
        stats = engine.ingest(source, f"s3://{bucket}/in", store, folder.uri_of(dest), settings)
    finally:
        source.close()
    assert stats.copied_files == 3
    assert {rel: (dest / rel).read_bytes() for rel in data} == data
    # Server-side: only the empty object (nothing to fetch) went through this process.
    assert (len(store.copied), source.read_calls) == ((0, 3) if refuse else (2, 1))


def test_a_presigned_url_reads_the_object(s3_env: S3Server) -> None:
    bucket = s3_env.new_bucket()
    body = os.urandom(1000)
    s3_env.client().put_object(Bucket=bucket, Key="k/x.bin", Body=body)
    source = s3.open_source(s3_env.settings())
    try:
        (obj,) = source.list_files(f"s3://{bucket}/k")
        url, md5 = source.copy_source(obj, expires_s=60)
    finally:
        source.close()
    assert "X-Amz-Signature=" in url and md5 == hashlib.md5(body).digest()
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == body
    assert json.dumps(url)  # a plain string


def test_server_side_copy_off_streams_every_object(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.new_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="in/a.txt", Body=b"alpha")
    settings = s3_env.settings(scratch_dir=str(tmp_path / "scratch"), server_side_copy=False)
    source = CountingSource(s3.open_source(settings))
    store = UrlFetchingStore()
    try:
        engine.ingest(source, f"s3://{bucket}/in", store, folder.uri_of(tmp_path / "dest"), settings)
    finally:
        source.close()
    assert (store.copied, source.read_calls) == ([], 1)


def test_state_dir_holds_the_record_of_each_ingest(tmp_path: Path) -> None:
    settings = IngestSettings(scratch_dir=str(tmp_path / "scratch"), state_dir=str(tmp_path / "state"))
    assert engine.journal_root(settings) == tmp_path / "state"
    assert engine.journal_root(IngestSettings(scratch_dir=str(tmp_path))).parent == tmp_path
