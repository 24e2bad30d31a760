"""The per-VM input cache on real files: what it serves, what it refuses to serve, what it forgets, and what a
restart, a reboot or a SIGKILL in the middle of an insert leave behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus.backends import base
from scalebus.transfer import cache

CAP = 1 << 20


def remote(name: str, size: int, *, etag: str = "e1") -> base.RemoteObject:
    return base.RemoteObject(
        uri=f"abfss://lake@acct.dfs.core.windows.net/ref/{name}", rel_path=name, size=size, etag=etag
    )


def staged(folder: Path, name: str, data: bytes) -> tuple[base.RemoteObject, Path]:
    """A file as staging leaves it: verified and renamed into place in a job's input folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return remote(name, len(data)), path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "work" / cache.CACHE_DIR


@pytest.fixture
def disk_cache(root: Path) -> Iterator[cache.DiskInputCache]:
    opened = cache.DiskInputCache.open(root, cap_bytes=CAP)
    yield opened
    opened.close()


def entry_file(root: Path, obj: base.RemoteObject) -> Path:
    name = cache.entry_name(obj)
    return root / cache.OBJECTS_DIR / name[:2] / name


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- hits and misses


def test_a_kept_file_is_placed_as_a_read_only_hard_link(disk_cache: cache.DiskInputCache, tmp_path: Path) -> None:
    obj, path = staged(tmp_path / "job1", "genome.fa", b"ACGT" * 1000)
    disk_cache.keep(obj, path)
    target = tmp_path / "job2" / "genome.fa"
    target.parent.mkdir()
    assert disk_cache.place(obj, target)
    assert target.read_bytes() == b"ACGT" * 1000
    assert os.stat(target).st_ino == os.stat(path).st_ino, "linked, not copied"
    assert os.stat(target).st_mode & 0o777 == cache.READ_ONLY
    assert disk_cache.usage() == cache.Usage(1, 4000)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(remote("genome.fa", 4000, etag="e2"), id="rewritten-new-etag"),
        pytest.param(remote("genome.fa", 4001), id="different-size"),
        pytest.param(remote("other.fa", 4000), id="different-uri"),
    ],
)
def test_another_version_of_the_object_misses(
    disk_cache: cache.DiskInputCache, tmp_path: Path, other: base.RemoteObject
) -> None:
    obj, path = staged(tmp_path / "job1", "genome.fa", b"A" * 4000)
    disk_cache.keep(obj, path)
    target = tmp_path / "job2" / "genome.fa"
    target.parent.mkdir()
    assert not disk_cache.place(other, target)
    assert not target.exists()
    assert disk_cache.place(obj, target), "the version kept is still served"


def test_an_object_listed_without_an_etag_is_never_cached(
    disk_cache: cache.DiskInputCache, tmp_path: Path
) -> None:
    _, path = staged(tmp_path / "job1", "a.bin", b"x" * 10)
    obj = remote("a.bin", 10, etag="")
    disk_cache.keep(obj, path)
    assert disk_cache.usage() == cache.Usage(0, 0)
    assert not disk_cache.place(obj, tmp_path / "job1" / "b.bin")


def test_a_file_placed_then_offered_again_stays_one_entry(
    disk_cache: cache.DiskInputCache, root: Path, tmp_path: Path
) -> None:
    obj, path = staged(tmp_path / "job1", "a.bin", b"x" * 10)
    disk_cache.keep(obj, path)
    target = tmp_path / "job2" / "a.bin"
    target.parent.mkdir()
    assert disk_cache.place(obj, target)
    disk_cache.keep(obj, target)
    assert disk_cache.usage() == cache.Usage(1, 10)
    assert os.stat(entry_file(root, obj)).st_ino == os.stat(path).st_ino


def test_a_leftover_at_the_target_is_replaced(disk_cache: cache.DiskInputCache, tmp_path: Path) -> None:
    obj, path = staged(tmp_path / "job1", "a.bin", b"good" * 3)
    disk_cache.keep(obj, path)
    target = tmp_path / "job2" / "a.bin"
    target.parent.mkdir()
    target.write_bytes(b"half")
    assert disk_cache.place(obj, target)
    assert target.read_bytes() == b"good" * 3


def test_across_file_systems_the_entry_is_copied(disk_cache: cache.DiskInputCache, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system (tmpfs at /dev/shm)")
    obj, path = staged(tmp_path / "job1", "a.bin", b"z" * 5000)
    disk_cache.keep(obj, path)
    target = shm / f"scalebus-cache-test-{os.getpid()}.bin"
    try:
        assert disk_cache.place(obj, target)
        assert target.read_bytes() == b"z" * 5000
        assert os.stat(target).st_ino != os.stat(path).st_ino
    finally:
        target.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- never stale


def test_a_truncated_entry_is_not_served_and_is_dropped(
    disk_cache: cache.DiskInputCache, root: Path, tmp_path: Path
) -> None:
    obj, path = staged(tmp_path / "job1", "a.bin", b"q" * 1000)
    disk_cache.keep(obj, path)
    kept = entry_file(root, obj)
    os.chmod(kept, 0o644)
    os.truncate(kept, 500)
    os.chmod(kept, cache.READ_ONLY)
    target = tmp_path / "job2" / "a.bin"
    target.parent.mkdir()
    with capture_logs() as logs:
        assert not disk_cache.place(obj, target)
    assert not target.exists()
    assert not kept.exists()
    assert disk_cache.usage() == cache.Usage(0, 0)
    assert [e["why"] for e in logs if e["event"] == "input_cache_entry_dropped"] == ["size 500, kept with 1000"]


def test_an_entry_whose_file_vanished_is_dropped(
    disk_cache: cache.DiskInputCache, root: Path, tmp_path: Path
) -> None:
    obj, path = staged(tmp_path / "job1", "a.bin", b"q" * 10)
    disk_cache.keep(obj, path)
    entry_file(root, obj).unlink()
    assert not disk_cache.place(obj, tmp_path / "job1" / "again.bin")
    assert disk_cache.usage() == cache.Usage(0, 0)


def test_an_input_the_analytics_rewrote_through_its_link_is_not_served(
    disk_cache: cache.DiskInputCache, tmp_path: Path
) -> None:
    obj, path = staged(tmp_path / "job1", "ref.fa", b"ACGT" * 100)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(an_hour_ago, an_hour_ago))
    disk_cache.keep(obj, path)
    # the analytics, root or having made it writable again, rewrites the same number of bytes in place
    os.chmod(path, 0o644)
    path.write_bytes(b"TTTT" * 100)
    os.chmod(path, cache.READ_ONLY)
    target = tmp_path / "job2" / "ref.fa"
    target.parent.mkdir()
    with capture_logs() as logs:
        assert not disk_cache.place(obj, target)
    assert not target.exists()
    assert [e["why"] for e in logs if e["event"] == "input_cache_entry_dropped"] == ["modified since it was kept"]
    assert disk_cache.usage() == cache.Usage(0, 0)


def test_an_entry_made_writable_is_not_served(disk_cache: cache.DiskInputCache, tmp_path: Path) -> None:
    obj, path = staged(tmp_path / "job1", "ref.fa", b"ACGT")
    disk_cache.keep(obj, path)
    os.chmod(path, 0o644)  # the same inode as the entry: from now on anyone may write it unnoticed
    assert not disk_cache.place(obj, tmp_path / "job1" / "again.fa")


# ------------------------------------------------------------------------------------------- the cap


def test_least_recently_used_entries_are_evicted_to_the_cap(root: Path, tmp_path: Path) -> None:
    small = cache.DiskInputCache.open(root, cap_bytes=300)
    try:
        objs = {}
        for name in "abc":
            objs[name], path = staged(tmp_path / "job1", name, name.encode() * 100)
            small.keep(objs[name], path)
        job2 = tmp_path / "job2"
        job2.mkdir()
        assert small.place(objs["a"], job2 / "a")  # a is now the most recently used
        objs["d"], path = staged(tmp_path / "job1", "d", b"d" * 100)
        small.keep(objs["d"], path)
        assert small.usage() == cache.Usage(3, 300)
        assert not small.place(objs["b"], job2 / "b"), "b was the least recently used"
        assert not entry_file(root, objs["b"]).exists()
        assert all(small.place(objs[n], job2 / f"{n}2") for n in "acd")
    finally:
        small.close()


def test_a_file_larger_than_the_cap_is_not_kept(root: Path, tmp_path: Path) -> None:
    small = cache.DiskInputCache.open(root, cap_bytes=300)
    try:
        fits, path = staged(tmp_path / "job1", "fits", b"f" * 300)
        small.keep(fits, path)
        big, path = staged(tmp_path / "job1", "big", b"b" * 301)
        small.keep(big, path)
        assert small.usage() == cache.Usage(1, 300)
        assert not small.place(big, tmp_path / "job1" / "big2")
        assert os.stat(path).st_mode & 0o222, "a file not kept stays writable"
    finally:
        small.close()


def test_a_smaller_cap_at_the_next_start_evicts(root: Path, tmp_path: Path) -> None:
    first = cache.DiskInputCache.open(root, cap_bytes=CAP)
    for name in "abc":
        obj, path = staged(tmp_path / "job1", name, b"x" * 100)
        first.keep(obj, path)
    first.close()
    again = cache.DiskInputCache.open(root, cap_bytes=150)
    try:
        assert again.usage() == cache.Usage(1, 100)
        assert len(files_under(root / cache.OBJECTS_DIR)) == 1
    finally:
        again.close()


@pytest.mark.parametrize(
    ("sizes", "held", "cap", "evicted"),
    [
        pytest.param([("a", 10), ("b", 10)], 20, 20, [], id="at-the-cap"),
        pytest.param([("a", 10), ("b", 10), ("c", 10)], 30, 15, ["a", "b"], id="oldest-first"),
        pytest.param([("a", 1), ("b", 100)], 101, 100, ["a"], id="one-small-is-enough"),
    ],
)
def test_evictions(sizes: list[tuple[str, int]], held: int, cap: int, evicted: list[str]) -> None:
    assert cache.evictions(sizes, held_bytes=held, cap_bytes=cap) == evicted


# ------------------------------------------------------------------------------------------- restarts and crashes


def test_entries_survive_a_restart(root: Path, tmp_path: Path) -> None:
    first = cache.DiskInputCache.open(root, cap_bytes=CAP)
    obj, path = staged(tmp_path / "job1", "ref.fa", b"ACGT" * 10)
    first.keep(obj, path)
    first.close()
    path.unlink()  # the job folder is gone; the entry is the last link
    again = cache.DiskInputCache.open(root, cap_bytes=CAP)
    try:
        target = tmp_path / "job2" / "ref.fa"
        target.parent.mkdir()
        assert again.place(obj, target)
        assert target.read_bytes() == b"ACGT" * 10
    finally:
        again.close()


def test_what_an_insert_killed_midway_leaves_is_cleaned_at_open(root: Path, tmp_path: Path) -> None:
    first = cache.DiskInputCache.open(root, cap_bytes=CAP)
    good, path = staged(tmp_path / "job1", "good", b"g" * 10)
    first.keep(good, path)
    gone, path = staged(tmp_path / "job1", "gone", b"x" * 10)
    first.keep(gone, path)
    first.close()
    # killed after the link, before the rename: a temporary file
    (root / cache.TMP_DIR / ("0" * 64)).write_bytes(b"partial")
    # killed after the rename, before the row: an entry file nobody names
    orphan = entry_file(root, remote("orphan", 7))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan!")
    # an eviction killed after the row went (or a file removed by hand): a row without a file
    entry_file(root, gone).unlink()
    again = cache.DiskInputCache.open(root, cap_bytes=CAP)
    try:
        assert again.usage() == cache.Usage(1, 10)
        assert not list((root / cache.TMP_DIR).iterdir())
        assert files_under(root / cache.OBJECTS_DIR) == [entry_file(root, good)]
        assert again.place(good, tmp_path / "job1" / "good2")
    finally:
        again.close()


KEEPER = """
import logging, sys
from pathlib import Path
import structlog
from scalebus.backends import base
from scalebus.transfer import cache

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
root, job = Path(sys.argv[1]), Path(sys.argv[2])
job.mkdir(parents=True, exist_ok=True)
kept = cache.DiskInputCache.open(root, cap_bytes=40_000)
print("ready", flush=True)
i = 0
while True:
    i += 1
    path = job / f"f{i}"
    data = str(i).encode() * 100
    path.write_bytes(data)
    kept.keep(base.RemoteObject(uri=f"file:///lake/f{i}", rel_path=f"f{i}", size=len(data), etag="e"), path)
"""


def test_sigkill_during_inserts_leaves_a_consistent_index(root: Path, tmp_path: Path) -> None:
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", KEEPER, str(root), str(tmp_path / f"job{round_}")], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            time.sleep(0.3 + 0.1 * round_)  # hundreds of inserts in, with evictions under the small cap
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        reopened = cache.DiskInputCache.open(root, cap_bytes=40_000)
        try:
            assert_consistent(root, reopened)
        finally:
            reopened.close()


def assert_consistent(root: Path, opened: cache.DiskInputCache) -> None:
    with sqlite3.connect(root / cache.INDEX_NAME) as db:
        rows = db.execute("SELECT name, uri, size FROM entries").fetchall()
        (held,) = db.execute("SELECT bytes FROM held").fetchone()
    assert rows, "the child kept something"
    assert held == sum(size for _, _, size in rows) <= 40_000
    assert opened.usage() == cache.Usage(len(rows), held)
    assert not list((root / cache.TMP_DIR).iterdir())
    on_disk = {p.name: p for p in files_under(root / cache.OBJECTS_DIR)}
    assert set(on_disk) == {name for name, _, _ in rows}
    for name, uri, size in rows:
        number = uri.rsplit("f", 1)[1]
        assert on_disk[name].read_bytes() == number.encode() * 100 and size == len(number) * 100


def test_entries_never_flushed_before_a_reboot_are_dropped(root: Path, tmp_path: Path) -> None:
    first = cache.DiskInputCache.open(root, cap_bytes=CAP)
    obj, path = staged(tmp_path / "job1", "a.bin", b"a" * 10)
    first.keep(obj, path)
    # not closed (the worker was killed), then the machine crashed and booted again
    with sqlite3.connect(root / cache.INDEX_NAME) as db:
        db.execute("UPDATE entries SET boot_id = 'an-earlier-boot'")
    again = cache.DiskInputCache.open(root, cap_bytes=CAP)
    try:
        assert again.usage() == cache.Usage(0, 0)
        assert not entry_file(root, obj).exists()
    finally:
        again.close()
        first.close()


def test_entries_flushed_at_close_survive_a_reboot(root: Path, tmp_path: Path) -> None:
    first = cache.DiskInputCache.open(root, cap_bytes=CAP)
    obj, path = staged(tmp_path / "job1", "a.bin", b"a" * 10)
    first.keep(obj, path)
    first.close()
    with sqlite3.connect(root / cache.INDEX_NAME) as db:
        db.execute("UPDATE entries SET boot_id = 'an-earlier-boot'")
    again = cache.DiskInputCache.open(root, cap_bytes=CAP)
    try:
        assert again.place(obj, tmp_path / "job1" / "b.bin")
    finally:
        again.close()


def test_a_corrupt_index_starts_afresh(tmp_path: Path) -> None:
    root = tmp_path / "work" / cache.CACHE_DIR
    root.mkdir(parents=True)
    (root / cache.INDEX_NAME).write_bytes(b"this is not a database" * 100)
    with capture_logs() as logs:
        opened = cache.open_input_cache(str(tmp_path / "work"), cap_bytes=CAP)
    assert opened is not None
    try:
        assert opened.usage() == cache.Usage(0, 0)
        assert "input_cache_index_corrupt" in [e["event"] for e in logs]
    finally:
        opened.close()


def test_a_cap_of_zero_turns_the_cache_off(tmp_path: Path) -> None:
    assert cache.open_input_cache(str(tmp_path / "work"), cap_bytes=0) is None
    assert not (tmp_path / "work").exists()


def test_an_unusable_folder_means_no_cache(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("a file where the work dir should be")
    with capture_logs() as logs:
        assert cache.open_input_cache(str(tmp_path / "work"), cap_bytes=CAP) is None
    assert [e["event"] for e in logs] == ["input_cache_unavailable"]


# ------------------------------------------------------------------------------------------- never in the way


def test_keep_never_raises(disk_cache: cache.DiskInputCache, tmp_path: Path) -> None:
    with capture_logs() as logs:
        disk_cache.keep(remote("missing", 10), tmp_path / "missing")
        _, path = staged(tmp_path / "job1", "short", b"x" * 5)
        disk_cache.keep(remote("short", 10), path)
    assert [e["event"] for e in logs] == ["input_cache_keep_failed", "input_cache_keep_skipped"]
    assert disk_cache.usage() == cache.Usage(0, 0)


def test_place_into_a_missing_folder_is_a_miss_that_keeps_the_entry(
    disk_cache: cache.DiskInputCache, tmp_path: Path
) -> None:
    obj, path = staged(tmp_path / "job1", "a.bin", b"a" * 10)
    disk_cache.keep(obj, path)
    assert not disk_cache.place(obj, tmp_path / "no" / "such" / "folder" / "a.bin")
    assert disk_cache.usage() == cache.Usage(1, 10)


def test_threads_and_two_handles_share_one_cache(root: Path, tmp_path: Path) -> None:
    """Two handles on one folder (as two workers on one VM: separate connections and locks), each used from
    several threads, keeping and placing under a cap that forces evictions."""
    handles = [cache.DiskInputCache.open(root, cap_bytes=2_000) for _ in range(2)]
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                data = bytes([i % 25]) * 100
                _, path = staged(tmp_path / f"job{worker}", f"download{i}", data)
                obj = remote(f"f{i % 25}", len(data))
                handles[worker % 2].keep(obj, path)
                target = tmp_path / f"job{worker}" / f"placed{i}"
                if handles[(worker + 1) % 2].place(obj, target):
                    assert target.read_bytes() == bytes([i % 25]) * 100
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not failures
        usage = handles[0].usage()
        assert usage.bytes <= 2_000 and usage.bytes == usage.entries * 100
        assert len(files_under(root / cache.OBJECTS_DIR)) == usage.entries
    finally:
        for handle in handles:
            handle.close()
