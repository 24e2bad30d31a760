"""The input cache over the real worker job path on the embedded default (SQLite queue, folder store, a real
analytics subprocess): jobs sharing a reference input, a redelivery, and an object rewritten between jobs."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from structlog.testing import capture_logs

from scalebus import jobs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import cache
from scalebus.worker import job as worker_job
from scalebus.worker import loop

DIGESTS = """
import hashlib, os, pathlib
src = pathlib.Path(os.environ["SCALEBUS_INPUT_DIR"])
out = pathlib.Path(os.environ["SCALEBUS_OUTPUT_DIR"])
digests = {str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(src.rglob("*")) if p.is_file() and not p.name.startswith(".")}
(out / "digests.json").write_text(__import__("json").dumps(digests))
"""

FAIL_FIRST = (
    DIGESTS
    + """
marker = pathlib.Path(os.environ["FAILED_ONCE"])
if not marker.exists():
    marker.write_text("x")
    raise SystemExit(1)
"""
)

REFERENCE = bytes(range(256)) * 800  # 200 KiB, read in more than one chunk by the staging settings below


class CountingStore(folder.FolderStore):
    """The real folder store, counting the bytes each object's reads returned (what a job downloaded)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[str, int] = {}
        self._lock = threading.Lock()

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        n = super().read_into(obj, sink, offset=offset, length=length)
        name = obj.uri.rsplit("/", 1)[1]
        with self._lock:  # chunks of one file are read on several threads
            self.read[name] = self.read.get(name, 0) + n
        return n


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "ref").mkdir(parents=True)
        self.reference = root / "ref" / "genome.fa"
        self.reference.write_bytes(REFERENCE)
        for sample in ("s1", "s2"):
            (root / "in" / sample).mkdir(parents=True)
            (root / "in" / sample / f"{sample}.fastq").write_bytes(sample.encode() * 500)

    def job(self, job_id: str, sample: str) -> jobs.Job:
        return jobs.validate(
            {
                "job_id": job_id,
                "inputs": [self.reference.as_uri(), (self.root / "in" / sample).as_uri() + "/"],
                "output": (self.root / "out" / job_id).as_uri() + "/",
            }
        )

    def report(self, job_id: str) -> dict[str, object]:
        return json.loads((self.root / "out" / job_id / worker_job.JOB_REPORT).read_text())  # type: ignore[no-any-return]

    def digests(self, job_id: str) -> dict[str, str]:
        return json.loads((self.root / "out" / job_id / "digests.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    yield q
    q.close()


def run_worker(
    queue: base.JobQueue, tmp_path: Path, store: CountingStore, program: str, *, pass_env: tuple[str, ...] = ()
) -> worker_job.WorkerStats:
    """One worker run until idle, with its own cache handle (as ``scalebus worker run`` opens it), closed after."""
    script = tmp_path / "analytics.py"
    script.write_text(program)
    settings = WorkerSettings(
        command=[sys.executable, str(script)],
        work_dir=str(tmp_path / "work"),
        cache_bytes=10 * 1024 * 1024,
        idle_timeout_s=1.0,
        receive_wait_s=0.3,
        heartbeat_interval_s=0.2,
        pass_env=list(pass_env),
    )
    input_cache = cache.open_input_cache(settings.work_dir, cap_bytes=settings.cache_bytes)
    assert input_cache is not None
    try:
        return loop.Worker(
            loop.WorkerPorts(queue=queue, resolve=lambda _uri: store, cache=input_cache),
            instance_id="test-1",
            settings=settings,
            staging_settings=StagingSettings(min_free_bytes=0, chunk_size_bytes=64 * 1024, processes=1),
        ).run()
    finally:
        input_cache.close()


def submit(queue: base.JobQueue, *job_list: jobs.Job) -> None:
    jobs.JobProducer(queue).submit(job_list)


def test_a_second_job_sharing_the_reference_links_it_instead_of_downloading(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    store = CountingStore()
    submit(queue, lake.job("j1", "s1"), lake.job("j2", "s2"))
    with capture_logs() as logs:
        stats = run_worker(queue, tmp_path, store, DIGESTS)
    assert stats.completed == 2
    assert store.read["genome.fa"] == len(REFERENCE), "downloaded once, by the first job only"
    assert store.read["s1.fastq"] == store.read["s2.fastq"] == 1000
    first, second = lake.report("j1"), lake.report("j2")
    assert (first["cache_hits"], first["cache_bytes_saved"]) == (0, 0)
    assert (second["cache_hits"], second["cache_bytes_saved"]) == (1, len(REFERENCE))
    assert second["files_staged"] == 2
    expected = hashlib.sha256(REFERENCE).hexdigest()
    assert lake.digests("j1")["genome.fa"] == lake.digests("j2")["genome.fa"] == expected
    staged = [(e["cache_hits"], e["cache_bytes_saved"]) for e in logs if e["event"] == "job_staged"]
    assert staged == [(0, 0), (1, len(REFERENCE))]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [cache.CACHE_DIR], "job folders removed"


def test_a_redelivered_job_stages_from_the_cache(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountingStore()
    submit(queue, lake.job("j1", "s1"))
    monkeypatch.setenv("FAILED_ONCE", str(tmp_path / "failed-once"))
    stats = run_worker(queue, tmp_path, store, FAIL_FIRST, pass_env=("FAILED_ONCE",))
    assert (stats.abandoned, stats.completed) == (1, 1)
    assert store.read == {"genome.fa": len(REFERENCE), "s1.fastq": 1000}, "nothing downloaded twice"
    report = lake.report("j1")
    assert report["delivery_count"] == 2
    assert (report["cache_hits"], report["cache_bytes_saved"]) == (2, len(REFERENCE) + 1000)


def test_an_object_rewritten_between_jobs_is_downloaded_again(
    queue: sqlite_queue.SqliteJobQueue, lake: Lake, tmp_path: Path
) -> None:
    store = CountingStore()
    submit(queue, lake.job("j1", "s1"))
    run_worker(queue, tmp_path, store, DIGESTS)
    rewritten = bytes(reversed(REFERENCE))  # same size: only the etag tells
    lake.reference.write_bytes(rewritten)
    submit(queue, lake.job("j2", "s1"))
    run_worker(queue, tmp_path, store, DIGESTS)  # a new worker run: the cache was closed and reopened
    assert store.read["genome.fa"] == 2 * len(REFERENCE)
    assert store.read["s1.fastq"] == 1000, "the unchanged sample came from the cache, across the restart"
    report = lake.report("j2")
    assert (report["cache_hits"], report["cache_bytes_saved"]) == (1, 1000)
    assert lake.digests("j2")["genome.fa"] == hashlib.sha256(rewritten).hexdigest()
