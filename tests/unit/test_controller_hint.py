"""The controller publishes the policy's idle grace where the workers read it (the pool's heartbeat store).

Real embedded backends (SQLite queue, local pool, SQLite heartbeats) with an empty queue, so no worker starts;
time moves on an injected clock.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import pool, sqlite_queue
from scalebus.controller import step
from scalebus.settings import ControllerSettings

SETTINGS = ControllerSettings(idle_grace_min_s=7.0)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp_path: Path, heartbeats: base.HeartbeatStore | None = None) -> None:
        self.clock = Clock()
        self.queue = sqlite_queue.SqliteJobQueue(
            tmp_path / "queue.db", queue="jobs", lock_duration_s=30, max_delivery_count=5
        )
        self.scale_set = pool.LocalScaleSet(
            tmp_path / "pool.db", worker_argv=[sys.executable, "-c", "pass"], worker_env={}
        )
        self.heartbeats = pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")
        self.controller = step.ControllerStep(
            depth=self.queue,
            scale_set=self.scale_set,
            heartbeats=heartbeats or self.heartbeats,
            settings=SETTINGS,
            clock=self.clock,
            writes=step.InlineWriteRunner(),
        )

    def close(self) -> None:
        self.queue.close()
        self.scale_set.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_first_round_publishes_the_grace(rig: Rig) -> None:
    _, decision = rig.controller.run_round()
    assert decision.idle_grace_s == 7.0
    assert rig.heartbeats.read_hint() == base.FleetHint(idle_grace_s=7.0, at=rig.clock.now)
    assert rig.heartbeats.read_all() == [], "the hint is not a worker"


def test_an_unchanged_grace_is_rewritten_only_to_stay_fresh(rig: Rig) -> None:
    first = rig.clock.now
    for _ in range(5):
        rig.controller.run_round()
        rig.clock.now += SETTINGS.poll_interval_s
    assert rig.heartbeats.read_hint() == base.FleetHint(idle_grace_s=7.0, at=first)
    assert rig.controller.stats.hints_published == 1
    rig.clock.now = first + base.HINT_MAX_AGE_S / 2
    rig.controller.run_round()
    assert rig.heartbeats.read_hint() == base.FleetHint(idle_grace_s=7.0, at=rig.clock.now)
    assert rig.controller.stats.hints_published == 2


class FailingHints:
    """The pool's store, except that publishing the hint fails (a storage outage)."""

    def __init__(self, inner: pool.SqliteHeartbeatStore) -> None:
        self._inner = inner

    def beat(self, heartbeat: base.Heartbeat) -> None:
        self._inner.beat(heartbeat)

    def read_all(self) -> list[base.Heartbeat]:
        return self._inner.read_all()

    def forget(self, instance_id: str) -> None:
        self._inner.forget(instance_id)

    def publish_hint(self, hint: base.FleetHint) -> None:
        raise errors.TransientStorageError("storage is down")

    def read_hint(self) -> base.FleetHint | None:
        return self._inner.read_hint()

    def close(self) -> None:
        self._inner.close()


def test_a_failed_publish_does_not_stop_scaling(tmp_path: Path) -> None:
    rig = Rig(tmp_path, FailingHints(pool.SqliteHeartbeatStore.open(tmp_path / "pool.db")))
    try:
        with capture_logs() as logs:
            rig.controller.run_round()
            rig.controller.run_round()
        failed = [e for e in logs if e["event"] == "idle_grace_publish_failed"]
        assert len(failed) == 2, "retried every round until it works"
        assert rig.controller.stats.rounds == 2 and rig.controller.stats.failures == 0
        assert rig.heartbeats.read_hint() is None
    finally:
        rig.close()
