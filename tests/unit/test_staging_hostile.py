"""The folder store and the staging engine against hostile storage shapes: paths out of the roots, symlinks,
system files, sources that change while read, names of any legal length, full disks, failures mid-staging and a
SIGKILL in the middle of one."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local.folder import FolderStore, uri_of
from scalebus.settings import StagingSettings
from scalebus.transfer import download, manifest, plan, publish, stage
from scalebus.worker import backoff
from scalebus.worker import job as worker_job

SETTINGS = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=4, min_free_bytes=0, processes=1)


def umasked(mode: int) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """A lake root with one folder of data, and a file outside it worth stealing."""
    lake = tmp_path / "lake"
    (lake / "in").mkdir(parents=True)
    (lake / "in" / "a.txt").write_text("alpha")
    (tmp_path / "secret.txt").write_text("the worker's secret")
    return lake, tmp_path / "secret.txt"


def confined(lake: Path, *reserved: Path) -> FolderStore:
    return FolderStore(roots=[str(lake)], reserved=[str(p) for p in reserved])


def stage_with(store: FolderStore, sources: list[str], dest: Path) -> None:
    stage.stage_in(lambda _u: store, sources, dest, SETTINGS)


# ------------------------------------------------------------------------------------------- confinement


def test_reads_and_writes_outside_the_roots_are_refused(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, secret = roots
    store = confined(lake)
    with pytest.raises(errors.UnsafePathError, match=r"outside storage\.local_roots"):
        list(store.list_files(uri_of(secret)))
    obj = base.RemoteObject(uri=uri_of(secret), rel_path="secret.txt", size=19, etag="")
    with open(os.devnull, "wb") as sink, pytest.raises(errors.UnsafePathError):
        store.read_into(obj, sink)
    with pytest.raises(errors.UnsafePathError):
        store.write_bytes(b"x", uri_of(tmp_path / "elsewhere" / "f"))
    assert not (tmp_path / "elsewhere").exists()
    assert [o.rel_path for o in store.list_files(uri_of(lake / "in"))] == ["a.txt"]


def test_a_symlink_leading_out_of_the_root_is_refused_not_followed(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    lake, secret = roots
    (lake / "in" / "looks-harmless.txt").symlink_to(secret)
    with pytest.raises(errors.UnsafePathError, match=r"looks-harmless\.txt"):
        stage_with(confined(lake), [uri_of(lake / "in")], tmp_path / "stage")
    assert not [p for p in (tmp_path / "stage").rglob("*") if p.is_file() and "secret" in p.read_text()]
    (lake / "in" / "looks-harmless.txt").unlink()
    (lake / "in" / "inside.txt").symlink_to(lake / "in" / "a.txt")  # a symlink that stays inside is fine
    stage_with(confined(lake), [uri_of(lake / "in")], tmp_path / "stage2")
    assert (tmp_path / "stage2" / "in" / "inside.txt").read_text() == "alpha"


def test_a_symlinked_folder_cannot_carry_a_write_out_of_the_root(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, _secret = roots
    (tmp_path / "outside").mkdir()
    (lake / "door").symlink_to(tmp_path / "outside")
    with pytest.raises(errors.UnsafePathError):
        confined(lake).write_bytes(b"x", uri_of(lake / "door" / "f"))
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("path", ["/proc/self/environ", "/dev/zero", "/sys/kernel"])
def test_system_files_are_never_staged_even_unconfined(path: str, tmp_path: Path) -> None:
    with pytest.raises(errors.UnsafePathError, match="system folders"):
        stage_with(FolderStore(), ["file://" + path], tmp_path / "stage")


def test_the_reserved_folders_cannot_be_read_or_written(roots: tuple[Path, Path]) -> None:
    lake, _secret = roots
    secrets_dir = lake / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "key").write_text("k")
    store = confined(lake, secrets_dir)
    with pytest.raises(errors.UnsafePathError, match="worker's own folders"):
        list(store.list_files(uri_of(secrets_dir / "key")))
    with pytest.raises(errors.UnsafePathError, match="worker's own folders"):
        store.write_bytes(b"x", uri_of(secrets_dir / "key"))
    assert (secrets_dir / "key").read_text() == "k"


def test_a_fifo_in_the_lake_is_not_read(roots: tuple[Path, Path]) -> None:
    lake, _secret = roots
    os.mkfifo(lake / "pipe")
    with pytest.raises(errors.UnsafePathError, match="not a regular file"):
        list(confined(lake).list_files(uri_of(lake / "pipe")))


def test_files_get_the_umask_mode_never_the_sources(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, _secret = roots
    (lake / "in" / "a.txt").chmod(0o751)
    stage_with(FolderStore(), [uri_of(lake / "in")], tmp_path / "stage")
    staged = tmp_path / "stage" / "in" / "a.txt"
    assert stat.S_IMODE(staged.stat().st_mode) == umasked(0o666)
    FolderStore().write_file(lake / "in" / "a.txt", uri_of(lake / "out" / "a.txt"))
    assert stat.S_IMODE((lake / "out" / "a.txt").stat().st_mode) == umasked(0o666)


# ------------------------------------------------------------------------------------------- verification


def test_a_file_changed_since_it_was_listed_is_a_transient_error(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, _secret = roots
    store = FolderStore()
    (obj,) = store.list_files(uri_of(lake / "in" / "a.txt"))
    time.sleep(0.01)
    (lake / "in" / "a.txt").write_text("ALPHA")  # same size, new mtime
    with (tmp_path / "sink").open("wb") as sink, pytest.raises(errors.SourceChangedError, match="changed since"):
        store.read_into(obj, sink)
    assert errors.SourceChangedError("x").transient


def test_a_file_rewritten_during_the_read_is_detected(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, _secret = roots
    big = lake / "in" / "big.bin"
    big.write_bytes(b"1" * (3 * 1024 * 1024))
    store = FolderStore()
    (obj,) = store.list_files(uri_of(big))

    class Rewriting:
        """A sink that, after the first block, has a producer rewrite the file in place."""

        def __init__(self) -> None:
            self.blocks = 0

        def write(self, data: bytes) -> int:
            self.blocks += 1
            if self.blocks == 1:
                with big.open("r+b") as fh:
                    fh.seek(2 * 1024 * 1024)
                    fh.write(b"2" * 1024)
            return len(data)

    with pytest.raises(errors.SourceChangedError):
        store.read_into(obj, Rewriting())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- names, temps


@pytest.mark.parametrize("length", [251, 255])
def test_names_up_to_name_max_stage_and_publish(roots: tuple[Path, Path], tmp_path: Path, length: int) -> None:
    lake, _secret = roots
    name = "n" * (length - 4) + ".txt"
    (lake / "in" / name).write_text("long")
    stage_with(FolderStore(), [uri_of(lake / "in")], tmp_path / "stage")
    assert (tmp_path / "stage" / "in" / name).read_text() == "long"
    publish.publish(lambda _u: FolderStore(), tmp_path / "stage" / "in", uri_of(lake / "out"), SETTINGS)
    assert (lake / "out" / name).read_text() == "long"


def test_a_write_in_progress_keeps_its_temporary_file_out_of_the_output(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    lake, _secret = roots
    fifo = tmp_path / "slow-source"
    os.mkfifo(fifo)
    out = lake / "results" / "job1"
    seen: list[str] = []

    def produce() -> None:
        with fifo.open("wb") as fh:
            fh.write(b"first half ")
            fh.flush()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not list((lake / ".scalebus-tmp").glob("*")):
                time.sleep(0.01)
            seen.extend(p.name for p in out.rglob("*"))
            fh.write(b"second half")

    producer = threading.Thread(target=produce)
    producer.start()
    confined(lake).write_file(fifo, uri_of(out / "sub" / "result.txt"))
    producer.join()
    assert seen == ["sub"], "nothing but the folders the output needs, while the write is in flight"
    assert (out / "sub" / "result.txt").read_text() == "first half second half"
    assert list((lake / ".scalebus-tmp").iterdir()) == []


def test_the_store_refuses_writes_into_its_temporary_folder(roots: tuple[Path, Path]) -> None:
    lake, _secret = roots
    with pytest.raises(errors.UnsafePathError, match="reserved"):
        confined(lake).write_bytes(b"x", uri_of(lake / ".scalebus-tmp" / "x"))


# ------------------------------------------------------------------------------------------- local disk


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_local_disk_is_a_local_disk_error_not_a_source_failure(roots: tuple[Path, Path]) -> None:
    lake, _secret = roots
    store = FolderStore()
    (obj,) = store.list_files(uri_of(lake / "in" / "a.txt"))
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(errors.LocalDiskError, match="disk"):
        store.read_into(obj, full)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, errors.LocalDiskError),
        (errno.EDQUOT, errors.LocalDiskError),
        (errno.EIO, errors.LocalDiskError),
        (errno.EROFS, errors.LocalDiskError),
        (errno.EACCES, errors.StorageError),
    ],
    ids=["ENOSPC", "EDQUOT", "EIO", "EROFS", "EACCES"],
)
def test_local_errors_are_classified_by_errno(code: int, kind: type[Exception], tmp_path: Path) -> None:
    error = download.local_disk_error(tmp_path, OSError(code, os.strerror(code)))
    assert type(error) is kind and str(tmp_path) in str(error)


def test_a_local_disk_error_is_the_environments_fault_and_keeps_its_reason() -> None:
    error = errors.LocalDiskError("/work/x: local disk error (No space left on device)")
    assert error.transient and not isinstance(error, (errors.StorageError, errors.TransientBackendError))
    settlement = worker_job.settlement_for(error)
    assert settlement.verdict is worker_job.Verdict.ABANDON and settlement.cause is worker_job.Cause.ENVIRONMENT
    kept = worker_job.final_settlement(settlement, delivery_count=5, max_deliveries=5, lock_lost=None)
    assert kept.verdict is worker_job.Verdict.ABANDON, "while it can be given back, it spends no delivery"
    last = worker_job.final_settlement(
        settlement, delivery_count=5, max_deliveries=5, lock_lost=None, released=backoff.MAX_RELEASES
    )
    assert (last.verdict, last.reason) == (worker_job.Verdict.DEAD_LETTER, "LocalDiskError")
    assert "No space left" in last.description


def test_a_full_disk_during_staging_is_a_local_disk_error(roots: tuple[Path, Path], tmp_path: Path) -> None:
    lake, _secret = roots

    class FullDisk(FolderStore):
        """Fills the sink as a full disk does: the write fails with ENOSPC."""

        def read_into(
            self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
        ) -> int:
            class Full:
                def write(self, data: bytes) -> int:
                    raise OSError(errno.ENOSPC, "No space left on device")

            sink_write = sink.write
            try:
                sink.write = Full().write  # type: ignore[method-assign]
                return super().read_into(obj, sink, offset=offset, length=length)
            finally:
                sink.write = sink_write  # type: ignore[method-assign]

    with pytest.raises(errors.LocalDiskError):
        stage_with(FullDisk(), [uri_of(lake / "in")], tmp_path / "stage")


# ------------------------------------------------------------------------------------------- failure paths


class FailingStore(FolderStore):
    """Writes part of a chosen file, then fails (a dropped connection on a permanent error mid-body)."""

    def __init__(self, *, fail_on: str, error: Exception, cancel: threading.Event | None = None) -> None:
        super().__init__()
        self._fail_on = fail_on
        self._error = error
        self._cancel = cancel

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        if obj.rel_path.endswith(self._fail_on):
            sink.write(b"half a body")
            if self._cancel is not None:
                self._cancel.set()
                sink.write(b"more")  # the stoppable sink raises StagingCancelled here
            raise self._error
        return super().read_into(obj, sink, offset=offset, length=length)


def big_lake(root: Path) -> Path:
    src = root / "data"
    src.mkdir(parents=True)
    for i in range(12):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(2000))
    (src / "large.bin").write_bytes(os.urandom(5 * 64 * 1024))
    return src


@pytest.mark.parametrize(
    "error",
    [errors.ObjectNotFoundError("gone"), errors.TransientStorageError("reset"), KeyboardInterrupt()],
    ids=["permanent", "transient", "interrupted"],
)
def test_a_failed_staging_leaves_no_temporary_files(tmp_path: Path, error: BaseException) -> None:
    src = big_lake(tmp_path)
    dest = tmp_path / "stage"
    store = FailingStore(fail_on="f05.bin", error=error)  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        stage.stage_in(lambda _u: store, [uri_of(src)], dest, SETTINGS)
    leftovers = [p.name for p in dest.rglob("*") if p.name.endswith(plan.PART_SUFFIX)]
    assert leftovers == []
    finished = {p.name for p in (dest / "data").iterdir()}
    assert "f05.bin" not in finished


def test_a_cancelled_staging_leaves_no_temporary_files(tmp_path: Path) -> None:
    src = big_lake(tmp_path)
    dest = tmp_path / "stage"
    cancel = threading.Event()
    store = FailingStore(fail_on="large.bin", error=errors.StorageError("unreached"), cancel=cancel)
    settings = StagingSettings(chunk_size_bytes=64 * 1024, max_concurrency=2, min_free_bytes=0, processes=1)
    with pytest.raises(errors.StagingCancelled):
        stage.stage_in(lambda _u: store, [uri_of(src)], dest, settings, cancel=cancel)
    assert [p.name for p in dest.rglob("*") if p.name.endswith(plan.PART_SUFFIX)] == []


# ------------------------------------------------------------------------------------------- SIGKILL


KILLED_STAGING = """
import sys, time
from pathlib import Path
from scalebus.backends.local.folder import FolderStore, uri_of
from scalebus.settings import StagingSettings
from scalebus.transfer import stage

class Slow(FolderStore):
    def read_into(self, obj, sink, *, offset=0, length=None):
        time.sleep(0.01)
        return super().read_into(obj, sink, offset=offset, length=length)

store = Slow()
settings = StagingSettings(max_concurrency=2, min_free_bytes=0, processes=1)
stage.stage_in(lambda _u: store, [uri_of(Path(sys.argv[1]))], Path(sys.argv[2]), settings)
"""


def test_a_sigkill_costs_only_refetches_of_the_last_unwritten_entries(tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(600):
        (src / f"f{i:04d}").write_bytes(b"x" * 100)
    dest = tmp_path / "stage"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGING, str(src), str(dest)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_finished(dest)) < 60:
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = _finished(dest)
    assert 60 <= len(finished) < 600, "killed in the middle"
    recorded = {json.loads(line)["path"] for line in (dest / plan.MANIFEST_NAME).read_text().splitlines() if line}
    assert recorded <= finished, "the manifest names only files in place"
    assert len(finished - recorded) < manifest.RECORD_BATCH
    again = stage.stage_in(lambda _u: FolderStore(), [uri_of(src)], dest, SETTINGS)
    assert again.skipped_files == len(recorded) and again.files == 600 - len(recorded)
    assert _finished(dest) == {f"many/f{i:04d}" for i in range(600)}


def _finished(dest: Path) -> set[str]:
    folder = dest / "many"
    if not folder.is_dir():
        return set()
    return {f"many/{p.name}" for p in folder.iterdir() if not p.name.endswith(plan.PART_SUFFIX)}
