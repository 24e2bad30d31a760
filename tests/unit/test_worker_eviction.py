"""The worker on an eviction notice, over the real embedded queue and store, with notices from the local pool's
board and from the IMDS fake (over HTTP).

The queue's lock lasts far longer than any test waits, so a message found back in the queue was abandoned by
the worker, not released by lock expiry: that is the whole point of acting on the notice.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from structlog.testing import capture_logs

from scalebus import jobs
from scalebus.backends import base
from scalebus.backends.local import folder, sqlite_queue
from scalebus.settings import StagingSettings, WorkerSettings
from scalebus.transfer import publish
from scalebus.worker import loop
from tests.contract.notice_platforms import *  # noqa: F403  (fixtures)
from tests.contract.notice_platforms import NoticePlatform

ME = "pool_1"
LONG_LOCK_S = 120.0


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[sqlite_queue.SqliteJobQueue]:
    q = sqlite_queue.SqliteJobQueue(
        tmp_path / "q.db", queue="jobs", lock_duration_s=LONG_LOCK_S, max_delivery_count=5
    )
    yield q
    q.close()


def job(tmp_path: Path, job_id: str) -> jobs.Job:
    inputs = tmp_path / "lake" / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "a.txt").write_text("a")
    return jobs.validate(
        {"job_id": job_id, "inputs": [inputs.as_uri() + "/"], "output": output(tmp_path, job_id).as_uri() + "/"}
    )


def output(tmp_path: Path, job_id: str) -> Path:
    return tmp_path / "lake" / "out" / job_id


def analytics(tmp_path: Path, seconds: float) -> str:
    """Marks that it started, then works for ``seconds``."""
    return f"import pathlib, time; pathlib.Path({str(tmp_path / 'started')!r}).touch(); time.sleep({seconds})"


def make_worker(
    queue: base.JobQueue,
    tmp_path: Path,
    program: str,
    notices: base.NoticeSource,
    on_idle: Callable[[], None],
    store: base.ObjectStore | None = None,
    **overrides: object,
) -> loop.Worker:
    script = tmp_path / "analytics.py"
    script.write_text(program)
    defaults: dict[str, object] = {
        "idle_timeout_s": 60.0,
        "receive_wait_s": 0.2,
        "heartbeat_interval_s": 0.2,
        "eviction_poll_s": 0.1,
        "retire_wait_s": 0.0,
    }
    the_store = store or folder.FolderStore()
    return loop.Worker(
        loop.WorkerPorts(queue=queue, resolve=lambda _uri: the_store, notices=notices),
        instance_id=ME,
        settings=WorkerSettings(
            command=[sys.executable, str(script)],
            work_dir=str(tmp_path / "work"),
            **(defaults | overrides),
        ),
        staging_settings=StagingSettings(min_free_bytes=0, max_concurrency=1),
        on_idle=on_idle,
    )


def when(condition: Callable[[], bool], action: Callable[[], None], *, deadline_s: float = 20.0) -> None:
    """Run ``action`` in the background once ``condition`` holds (polled, with a generous deadline)."""

    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not condition():
            time.sleep(0.02)
        action()

    threading.Thread(target=watch, daemon=True).start()


def test_preempt_releases_the_running_job_at_once(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, notice_platform: NoticePlatform
) -> None:
    jobs.JobProducer(queue).submit([job(tmp_path, "j1")])
    idle_calls: list[str] = []
    worker = make_worker(
        queue, tmp_path, analytics(tmp_path, 60), notice_platform.source(ME), lambda: idle_calls.append("x")
    )
    posted: list[str] = []
    when(
        (tmp_path / "started").exists,
        lambda: posted.append(notice_platform.post(base.NoticeKind.PREEMPT, [ME], not_before_s=30)),
    )

    with capture_logs() as logs:
        stats = worker.run()

    (event_id,) = posted
    again = queue.receive(max_wait_s=1.0)
    assert again is not None and again.message_id == "j1" and again.delivery_count == 2, "abandoned, not expired"
    assert not output(tmp_path, "j1").exists(), "nothing published"
    assert (stats.abandoned, stats.completed) == (1, 0)
    assert notice_platform.acknowledged() == [event_id]
    assert idle_calls == [], "the platform deletes the instance; the worker does not"
    assert worker.evicted_by is not None and worker.evicted_by.event_id == event_id
    (notice_log,) = [e for e in logs if e["event"] == "eviction_notice"]
    assert (notice_log["instance_id"], notice_log["event_id"], notice_log["kind"]) == (ME, event_id, "Preempt")
    events = [e["event"] for e in logs]
    assert events.index("job_abandoned") < events.index("eviction_acknowledged")


class SlowStore(folder.FolderStore):
    """Each read takes 0.2 s and is counted: a staging of many files lasts long enough for a notice to arrive."""

    def __init__(self) -> None:
        self.reads = 0

    def read_into(
        self, obj: base.RemoteObject, sink: BinaryIO, *, offset: int = 0, length: int | None = None
    ) -> int:
        self.reads += 1
        time.sleep(0.2)
        return super().read_into(obj, sink, offset=offset, length=length)


def test_preempt_during_staging_releases_the_job_without_waiting_for_the_downloads(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, notice_platform: NoticePlatform
) -> None:
    submitted = job(tmp_path, "j1")
    for i in range(40):
        (tmp_path / "lake" / "in" / f"part{i:02d}.fq").write_text(f"read {i}\n")
    jobs.JobProducer(queue).submit([submitted])
    store = SlowStore()
    worker = make_worker(
        queue, tmp_path, analytics(tmp_path, 0), notice_platform.source(ME), lambda: None, store=store
    )
    posted: list[str] = []
    when(
        lambda: store.reads >= 3,
        lambda: posted.append(notice_platform.post(base.NoticeKind.PREEMPT, [ME], not_before_s=30)),
    )

    stats = worker.run()

    again = queue.receive(max_wait_s=1.0)
    assert again is not None and again.message_id == "j1" and again.delivery_count == 2, "abandoned, not expired"
    assert (stats.abandoned, stats.completed) == (1, 0)
    assert store.reads < 41 // 2, "staging stopped on the notice instead of fetching every file"
    assert not (tmp_path / "started").exists(), "the analytics never started"
    assert not output(tmp_path, "j1").exists()


def test_job_that_ends_before_the_eviction_completes_then_the_worker_exits(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, notice_platform: NoticePlatform
) -> None:
    jobs.JobProducer(queue).submit([job(tmp_path, "j1"), job(tmp_path, "j2")])
    worker = make_worker(
        queue, tmp_path, analytics(tmp_path, 1.0), notice_platform.source(ME), lambda: None, job_timeout_s=5.0
    )
    posted: list[str] = []
    when(
        (tmp_path / "started").exists,
        lambda: posted.append(notice_platform.post(base.NoticeKind.TERMINATE, [ME], not_before_s=600)),
    )

    stats = worker.run()

    assert (stats.completed, stats.abandoned) == (1, 0), "finished j1, never took j2"
    assert (output(tmp_path, "j1") / publish.MARKER_NAME).exists()
    remaining = queue.receive(max_wait_s=1.0)
    assert remaining is not None and (remaining.message_id, remaining.delivery_count) == ("j2", 1)
    assert notice_platform.acknowledged() == posted


def test_idle_worker_exits_on_preempt_without_self_destroy(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, notice_platform: NoticePlatform
) -> None:
    event_id = notice_platform.post(base.NoticeKind.PREEMPT, [ME], not_before_s=30)
    idle_calls: list[str] = []
    worker = make_worker(queue, tmp_path, "pass", notice_platform.source(ME), lambda: idle_calls.append("x"))

    stats = worker.run()  # idle_timeout_s is 60 s: only the notice ends it

    assert stats.completed == 0 and idle_calls == []
    assert notice_platform.acknowledged() == [event_id]


@pytest.mark.parametrize(
    ("kind", "resources"),
    [
        pytest.param(base.NoticeKind.REBOOT, [ME], id="reboot-is-logged-only"),
        pytest.param(base.NoticeKind.PREEMPT, ["pool_2"], id="another-vms-eviction-is-ignored"),
    ],
)
def test_notices_that_do_not_end_this_instance_change_nothing(
    queue: sqlite_queue.SqliteJobQueue,
    tmp_path: Path,
    notice_platform: NoticePlatform,
    kind: base.NoticeKind,
    resources: list[str],
) -> None:
    notice_platform.post(kind, resources, not_before_s=30)
    jobs.JobProducer(queue).submit([job(tmp_path, "j1")])
    worker = make_worker(
        queue, tmp_path, analytics(tmp_path, 0.3), notice_platform.source(ME), lambda: None, idle_timeout_s=1.0
    )

    with capture_logs() as logs:
        stats = worker.run()

    assert (stats.completed, stats.abandoned) == (1, 0)
    assert worker.evicted_by is None and notice_platform.acknowledged() == []
    assert "eviction_notice" not in [e["event"] for e in logs]
    assert "worker_idle_retiring" in [e["event"] for e in logs]


def test_shared_eviction_is_acted_on_but_not_acknowledged(
    queue: sqlite_queue.SqliteJobQueue, tmp_path: Path, notice_platform: NoticePlatform
) -> None:
    """Approving would start the eviction for the other instance too, which may still hold a job."""
    notice_platform.post(base.NoticeKind.PREEMPT, ["pool_2", ME], not_before_s=30)
    worker = make_worker(queue, tmp_path, "pass", notice_platform.source(ME), lambda: None)
    worker.run()
    assert worker.evicted_by is not None and notice_platform.acknowledged() == []


# --------------------------------------------------------------------------------------------- wiring


def test_cli_opens_the_notice_source_the_scale_set_implies(tmp_path: Path) -> None:
    from scalebus import settings
    from scalebus.backends.azure import scheduled_events
    from scalebus.backends.local import notices
    from scalebus.cli import wiring as cli

    local = settings.Settings(scale_set=settings.ScaleSetSettings(state_path=str(tmp_path / "pool.db")))
    me = base.InstanceInfo("local-1", "local://x", name="local-1")
    source = cli.open_notices(local, me)
    assert isinstance(source, notices.SqliteNoticeSource)
    source.close()
    assert cli.open_notices(local, None) is None, "a worker run by hand is in no scale set"
    off = local.model_copy(update={"worker": settings.WorkerSettings(eviction_poll_s=0)})
    assert cli.open_notices(off, me) is None

    azure = settings.Settings(scale_set=settings.ScaleSetSettings(url="/subscriptions/s/resourceGroups/g/x"))
    vm = base.InstanceInfo("7", "/subscriptions/s/...", name="pool_7")
    assert isinstance(cli.open_notices(azure, vm), scheduled_events.ImdsNoticeSource)
