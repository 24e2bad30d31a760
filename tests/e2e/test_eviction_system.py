"""A Spot eviction on the embedded default, as real processes: the controller, its workers, the pool's notices.

The test makes the platform's decision: once the slow job's analytics has started on instance ``local-1`` it
posts a ``Preempt`` for that instance. The worker must give the job back, approve the eviction and exit without
deleting itself; the pool, playing the platform, then deletes the instance and clears the event; the controller
replaces the instance and the job runs again, to completion.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.local import notices
from tests.e2e._system import System, events, finish

pytestmark = pytest.mark.slow

QUEUE = """url = "sqlite:///{root}/queue.db?queue=jobs"
lock_duration_s = 60
max_delivery_count = 3"""


def test_evicted_worker_gives_its_job_back_and_the_fleet_finishes_it(tmp_path: Path) -> None:
    system = System(
        tmp_path, queue_table=QUEUE.format(root=tmp_path), environ={"SCALEBUS_WORKER__EVICTION_POLL_S": "0.2"}
    )
    submitted = system.cli("submit", "-f", str(system.write_inputs(["slow1"])))
    assert submitted.returncode == 0, submitted.stderr
    board = notices.LocalNoticeBoard(tmp_path / "pool.db")
    posted: list[str] = []

    def platform() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "slow1.started").exists():
            time.sleep(0.05)
        posted.append(board.post(["local-1"], base.NoticeKind.PREEMPT, not_before=time.time() + 30))

    threading.Thread(target=platform, daemon=True).start()
    _, err = finish(system.start_controller(), timeout_s=120)

    seen = events(err)
    for expected in ("eviction_notice", "eviction_releasing_job", "job_abandoned", "eviction_acknowledged"):
        assert expected in seen, f"{expected} missing from the logs:\n{err[-3000:]}"
    assert len(posted) == 1
    assert system.runs() == ["slow1", "slow1"], "stopped on the evicted instance, run again on another"
    report = json.loads((tmp_path / "out" / "slow1" / "_scalebus_job.json").read_text())
    assert report["delivery_count"] == 2
    assert seen.count("worker_evicted") == 1
    assert seen.count("instance_evicted") == 1, "the pool deleted the evicted instance"
    assert board.started_evictions(now=time.time() + 3600) == [], "the event went with its instance"
    assert seen.count("worker_idle_retiring") == seen.count("worker_started") - 1, "the evicted one did not retire"
    board.close()
