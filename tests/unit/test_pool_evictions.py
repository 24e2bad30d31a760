"""The local pool plays the platform's part in a Spot eviction: a started ``Preempt`` or ``Terminate`` stops its
instances at once and deletes them, and the event goes with them; other notices change nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus.backends import base
from scalebus.backends.local import notices, pool
from tests.contract.local_backends import SLEEPER


@pytest.fixture
def pool_and_board(tmp_path: Path) -> Iterator[tuple[pool.LocalScaleSet, notices.LocalNoticeBoard]]:
    scale_set = pool.LocalScaleSet(tmp_path / "pool.db", worker_argv=SLEEPER, worker_env={})
    board = notices.LocalNoticeBoard(tmp_path / "pool.db")
    yield scale_set, board
    scale_set.set_capacity(0)
    scale_set.close()
    board.close()


def states(scale_set: pool.LocalScaleSet) -> dict[str, base.InstanceState]:
    return {i.instance_id: i.state for i in scale_set.list_instances()}


def gone_within(scale_set: pool.LocalScaleSet, instance_id: str, deadline_s: float = 10.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if instance_id not in states(scale_set):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("kind", [base.NoticeKind.PREEMPT, base.NoticeKind.TERMINATE])
def test_a_started_eviction_deletes_its_instances_and_clears_the_event(
    pool_and_board: tuple[pool.LocalScaleSet, notices.LocalNoticeBoard], kind: base.NoticeKind
) -> None:
    scale_set, board = pool_and_board
    scale_set.set_capacity(3)
    event_id = board.post(["local-1", "local-3"], kind, not_before=time.time() - 1)  # its time has come
    with capture_logs() as logs:
        scale_set.list_instances()
    assert {e["instance_id"] for e in logs if e["event"] == "instance_evicted"} == {"local-1", "local-3"}
    assert gone_within(scale_set, "local-1") and gone_within(scale_set, "local-3")
    assert set(states(scale_set)) == {"local-2"}
    assert board.started_evictions(now=time.time()) == [], f"{event_id} cleared with its instances"


def test_an_approved_eviction_starts_before_its_time(
    pool_and_board: tuple[pool.LocalScaleSet, notices.LocalNoticeBoard],
) -> None:
    scale_set, board = pool_and_board
    scale_set.set_capacity(1)
    event_id = board.post(["local-1"], base.NoticeKind.PREEMPT, not_before=time.time() + 3600)
    assert "local-1" in states(scale_set), "scheduled, not started: nothing happens yet"
    source = board.source_for("local-1")
    source.acknowledge(event_id)
    source.close()
    assert gone_within(scale_set, "local-1")


@pytest.mark.parametrize("kind", [base.NoticeKind.REBOOT, base.NoticeKind.REDEPLOY, base.NoticeKind.FREEZE])
def test_other_events_leave_the_instance(
    pool_and_board: tuple[pool.LocalScaleSet, notices.LocalNoticeBoard], kind: base.NoticeKind
) -> None:
    scale_set, board = pool_and_board
    scale_set.set_capacity(1)
    board.post(["local-1"], kind, not_before=time.time() - 1)
    scale_set.list_instances()
    assert "local-1" in states(scale_set)
