"""A storage outage costs each job a few delayed releases and none of its deliveries: the job path gives a job that
failed for the environment back with ``JobQueue.release_later`` and the worker backs off before the next one.
Real embedded queue, real analytics subprocesses; the outage is a switch in a folder store subclass (our seam).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus import errors
from scalebus.backends.local import folder, sqlite_queue
from scalebus.worker import backoff
from tests.unit.test_worker import Lake, submit
from tests.unit.test_worker_faults import events, worker_for


class OutageStore(folder.FolderStore):
    """The lake unreachable while ``down`` is set: every read fails as a transient storage error."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()

    def exists(self, uri: str) -> bool:
        if self.down.is_set():
            raise errors.TransientStorageError(f"{uri}: connection reset")
        return super().exists(uri)


@pytest.mark.parametrize(("released", "expected"), [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (40, 5.0)], ids=str)
def test_release_delay_doubles_per_release_to_its_cap(released: int, expected: float) -> None:
    assert backoff.release_delay(released, cap_s=5.0) == expected


def test_a_job_is_released_a_bounded_number_of_times() -> None:
    assert backoff.releasable(0) and backoff.releasable(backoff.MAX_RELEASES - 1)
    assert not backoff.releasable(backoff.MAX_RELEASES)


def test_an_outage_spends_no_delivery_and_dead_letters_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=5, max_delivery_count=2)
    submit(queue, *(lake.job(f"j{i}") for i in range(4)))
    store = OutageStore()
    store.down.set()
    threading.Timer(4.0, store.down.clear).start()
    started = time.monotonic()
    try:
        with capture_logs() as logs:
            stats = worker_for(queue, tmp_path, store=store, env_backoff_max_s=1.0, idle_timeout_s=4.0).run()
        assert queue.peek_dead_letters(max_count=10) == []
    finally:
        queue.close()
    assert stats.completed == 4 and stats.abandoned == 0
    assert time.monotonic() - started >= 4.0
    assert {e["delivery_count"] for e in events(logs, "job_completed")} == {1}, "the outage spent no delivery"
    released = [e["released"] for e in events(logs, "job_released")]  # each job's release count so far
    assert released and max(released) <= 4.0 / 1.0 + 2, released
    backing_off = [e["seconds"] for e in events(logs, "worker_backing_off")]
    assert backing_off[:2] == [1.0, 1.0] and len(backing_off) == len(released)
    assert all(lake.out(f"j{i}").joinpath("_SUCCESS").exists() for i in range(4))
