"""Fenced commits: the marker names the job and delivery that wrote it, a marker of another job is never taken as
this job's, a publisher that lost the job stops before touching the output, and a committed output is never
modified again. Over the real embedded backends and real analytics processes."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalebus import errors, jobs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import publish
from scalebus.worker import job as worker_job
from scalebus.worker import loop
from tests.unit.test_worker import OK_PROGRAM, Lake

SETTINGS = StagingSettings(min_free_bytes=0, max_concurrency=1)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=3, max_delivery_count=2)
    yield q
    q.close()


def run_worker(
    queue: base.JobQueue,
    tmp_path: Path,
    store: base.ObjectStore,
    *,
    rules: worker_job.JobRules | None = None,
) -> worker_job.WorkerStats:
    script = tmp_path / "analytics.py"
    script.write_text(OK_PROGRAM)
    settings = WorkerSettings(
        command=[sys.executable, str(script)],
        work_dir=str(tmp_path / "work"),
        idle_timeout_s=1.0,
        receive_wait_s=0.3,
        heartbeat_interval_s=0.2,
    )
    worker = loop.Worker(
        loop.WorkerPorts(queue=queue, resolve=lambda _uri: store),
        instance_id="test-1",
        settings=settings,
        staging_settings=SETTINGS,
        rules=rules,
    )
    return worker.run()


def submit(queue: base.JobQueue, job: jobs.Job | dict[str, object]) -> None:
    if isinstance(job, jobs.Job):
        queue.send([jobs.to_message(job)])
    else:
        queue.send([base.OutgoingMessage(str(job["job_id"]), json.dumps(job).encode())])


def marker_of(out: Path) -> dict[str, object]:
    return dict(json.loads((out / publish.MARKER_NAME).read_text()))


# ------------------------------------------------------------------------------------------- through the worker


def test_the_marker_names_the_job_and_the_delivery(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"))
    before = time.time()
    stats = run_worker(queue, tmp_path, folder.FolderStore())
    marker = marker_of(lake.out("j1"))
    assert stats.completed == 1
    assert (marker["job_id"], marker["message_id"], marker["delivery"]) == ("j1", "j1", 1)
    assert before <= float(marker["written_at"]) <= time.time()  # type: ignore[arg-type]


def test_a_marker_of_another_job_is_an_output_conflict_not_a_completion(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = lake.out("j1")
    out.mkdir(parents=True)
    theirs = json.dumps({"job_id": "someone-else", "files": [], "bytes": 0})
    (out / publish.MARKER_NAME).write_text(theirs)
    submit(queue, lake.job("j1"))
    stats = run_worker(queue, tmp_path, folder.FolderStore())
    (dead,) = queue.peek_dead_letters(max_count=5)
    assert (stats.completed, stats.dead_lettered, dead.reason) == (0, 1, "OutputConflict")
    assert "someone-else" in dead.description
    assert sorted(p.name for p in out.iterdir()) == [publish.MARKER_NAME], "the analytics never ran"
    assert (out / publish.MARKER_NAME).read_text() == theirs


def test_an_output_inside_the_work_dir_is_refused_by_the_intake(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    body = {
        "job_id": "j1",
        "inputs": [(lake.root / "in" / "sample").as_uri() + "/"],
        "output": work.as_uri() + "/x/",
    }
    submit(queue, body)
    rules = worker_job.JobRules(limits=jobs.Limits(reserved=(str(work),)))
    run_worker(queue, tmp_path, folder.FolderStore(reserved=[str(work)]), rules=rules)
    (dead,) = queue.peek_dead_letters(max_count=5)
    assert dead.reason == "PathNotAllowed"
    assert not (work / "x").exists()


def test_an_output_inside_the_work_dir_is_refused_by_the_store_too(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    body = {
        "job_id": "j1",
        "inputs": [(lake.root / "in" / "sample").as_uri() + "/"],
        "output": work.as_uri() + "/x/",
    }
    submit(queue, body)
    run_worker(queue, tmp_path, folder.FolderStore(reserved=[str(work)]))  # intake unconfined: the store holds
    (dead,) = queue.peek_dead_letters(max_count=5)
    assert dead.reason == "UnsafePath" and "worker's own folders" in dead.description
    assert not (work / "x").exists()


class LockStealingStore(folder.FolderStore):
    """A folder store whose first upload plays a partition: another receiver takes the lock, and this worker's
    lock keeper finds out at its next renewal (SQLite queue semantics, as Service Bus after the lock moved)."""

    def __init__(self, db: Path, *, renew_wait_s: float) -> None:
        super().__init__()
        self._db = db
        self._renew_wait_s = renew_wait_s
        self.uploads: list[str] = []

    def write_file(self, source: Path, uri: str) -> None:
        self.uploads.append(uri)
        super().write_file(source, uri)
        if len(self.uploads) == 1:
            conn = sqlite3.connect(self._db, isolation_level=None)
            conn.execute("UPDATE messages SET lock_token = 'someone-else' WHERE lock_token IS NOT NULL")
            conn.close()
            time.sleep(self._renew_wait_s)


def test_a_publisher_that_lost_the_lock_stops_before_the_next_upload(queue, lake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    submit(queue, lake.job("j1"))
    store = LockStealingStore(tmp_path / "q.db", renew_wait_s=2.0)  # lock 3 s: renewed every 1 s
    stats = run_worker(queue, tmp_path, store)
    assert stats.lock_lost == 1
    if stats.completed:  # the lock taken came back when it expired: the next delivery published it all
        marker = marker_of(lake.out("j1"))
        assert marker["delivery"] == 2
        assert len(store.uploads) == 1 + len(marker["files"]), "the first delivery stopped after its one upload"  # type: ignore[arg-type]
    else:
        assert len(store.uploads) == 1, "no upload after the lock was lost"
        assert not (lake.out("j1") / publish.MARKER_NAME).exists()


# ------------------------------------------------------------------------------------------- publish itself


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_text(name)
    return root


class CountingStore(folder.FolderStore):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write_file(self, source: Path, uri: str) -> None:
        self.writes.append(uri.rsplit("/", 1)[-1])
        super().write_file(source, uri)

    def write_bytes(self, data: bytes, uri: str) -> None:
        self.writes.append(uri.rsplit("/", 1)[-1])
        super().write_bytes(data, uri)


def test_publish_checks_the_lock_before_every_upload_and_the_marker(outputs: Path, tmp_path: Path) -> None:
    store = CountingStore()
    checks: list[int] = []

    def holds() -> None:
        checks.append(len(store.writes))
        if len(store.writes) >= 2:
            raise errors.LockLostError("lock moved")

    with pytest.raises(errors.LockLostError):
        publish.publish(
            lambda _u: store,
            outputs,
            folder.uri_of(tmp_path / "out"),
            SETTINGS,
            commit=publish.Commit("j1"),
            check=holds,
        )
    assert store.writes == ["a.txt", "b.txt"] and checks == [0, 0, 1, 2]
    assert not (tmp_path / "out" / publish.MARKER_NAME).exists()


def test_a_commit_made_meanwhile_is_never_overwritten(outputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = json.dumps({"job_id": "j1", "message_id": "j1", "delivery": 2, "files": [], "bytes": 0})

    class Racing(CountingStore):
        """Another delivery of the same job commits while this one uploads its first file."""

        def write_file(self, source: Path, uri: str) -> None:
            super().write_file(source, uri)
            if len(self.writes) == 1:
                (out / publish.MARKER_NAME).write_text(other)

    store = Racing()
    with pytest.raises(errors.LockLostError, match="committed by another delivery"):
        publish.publish(
            lambda _u: store, outputs, folder.uri_of(out), SETTINGS, commit=publish.Commit("j1", "j1", 1)
        )
    assert store.writes == ["a.txt"]
    assert (out / publish.MARKER_NAME).read_text() == other


def test_publish_refuses_an_output_committed_by_another_job(outputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / publish.MARKER_NAME).write_text(json.dumps({"job_id": "j0"}))
    store = CountingStore()
    with pytest.raises(errors.OutputConflictError, match="j0"):
        publish.publish(lambda _u: store, outputs, folder.uri_of(out), SETTINGS, commit=publish.Commit("j1"))
    assert store.writes == []
    stats = publish.publish(lambda _u: store, outputs, folder.uri_of(out), SETTINGS, commit=publish.Commit("j0"))
    assert stats.already_published and store.writes == []
