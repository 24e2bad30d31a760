"""One controller loop over several pools: each its own ports, settings and policy; a failing pool does not stop
the others; logs and metrics carry the pool.

The queues and heartbeat stores are the embedded backends (SQLite); the scale sets are small fakes at our port
seam (the local process pool would start real workers); a queue that is down is a depth source at our seam that
raises our ``TransientQueueError``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.local import pool as local_pool
from scalebus.backends.local import sqlite_queue
from scalebus.controller import loop
from scalebus.observability import prometheus
from scalebus.observability.recorder import Health
from scalebus.settings import ControllerSettings

FAST = ControllerSettings(max_instances=5, poll_interval_s=0.02)


@dataclass
class ScaleSet:
    """An empty scale set at our port seam that keeps its target capacity."""

    capacity: int = 0
    writes: list[int] = field(default_factory=list)

    def get_capacity(self) -> int:
        return self.capacity

    def list_instances(self) -> list[base.Instance]:
        return []

    def set_capacity(self, capacity: int) -> None:
        self.writes.append(capacity)
        self.capacity = capacity

    def delete_instances(self, instance_ids: Sequence[str]) -> None:
        raise AssertionError("nothing is broken")

    def set_protection(self, instance_id: str, *, protected: bool) -> None:
        """Not asked for."""

    def close(self) -> None:
        """Nothing to release."""


class DownQueue:
    """A queue whose depth cannot be read: every read fails as an unreachable queue does. ``tried`` is set at the
    ``signal_at``-th read."""

    def __init__(self, signal_at: int = 0) -> None:
        self.reads = 0
        self.signal_at = signal_at
        self.tried = threading.Event()

    def read_depth(self) -> base.DepthSample:
        self.reads += 1
        if self.reads == self.signal_at:
            self.tried.set()
        raise errors.TransientQueueError("queue unreachable")

    def close(self) -> None:
        """Nothing to release."""


Embedded = dict[str, tuple[sqlite_queue.SqliteJobQueue, local_pool.SqliteHeartbeatStore]]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Embedded]:
    opened = {}
    for name in ("short", "long"):
        queue = sqlite_queue.SqliteJobQueue(
            tmp_path / "queue.db", queue=name, lock_duration_s=30, max_delivery_count=3
        )
        opened[name] = (queue, local_pool.SqliteHeartbeatStore.open(tmp_path / f"{name}.db"))
    yield opened
    for queue, beats in opened.values():
        queue.close()
        beats.close()


def submit(queue: sqlite_queue.SqliteJobQueue, count: int) -> None:
    queue.send([base.OutgoingMessage(f"job-{n}", b"{}") for n in range(count)])


def run_until(controller: loop.Controller, done: threading.Event, *, timeout_s: float = 10) -> None:
    """Run the loop on a thread until ``done`` is set (or the time is up), then stop it."""
    stop = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            controller.run(stop)
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)
            done.set()

    runner = threading.Thread(target=run)
    runner.start()
    try:
        done.wait(timeout_s)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert raised == [], "the controller stopped by itself"


class WritesSignal(ScaleSet):
    """Sets an event at its first capacity write."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def set_capacity(self, capacity: int) -> None:
        super().set_capacity(capacity)
        self.event.set()


def test_a_pool_whose_queue_is_down_does_not_stop_the_other_pool_scaling(embedded: Embedded) -> None:
    long_queue, long_beats = embedded["long"]
    submit(long_queue, 3)
    down = DownQueue()
    wrote = threading.Event()
    long_set = WritesSignal(wrote)
    controller = loop.Controller(
        [
            loop.Pool(
                name="short", depth=down, scale_set=ScaleSet(), heartbeats=embedded["short"][1], settings=FAST
            ),
            loop.Pool(name="long", depth=long_queue, scale_set=long_set, heartbeats=long_beats, settings=FAST),
        ]
    )
    with structlog.testing.capture_logs() as logs:
        run_until(controller, wrote)
    assert long_set.writes == [3], "the healthy pool scaled out to its queue"
    stats = controller.pool_stats
    assert stats["short"].failures >= 1 and stats["short"].rounds == 0
    assert stats["long"].capacity_writes == 1 and stats["long"].failures == 0
    failed = [e for e in logs if e["event"] == "controller_round_failed"]
    assert failed and {e["pool"] for e in failed} == {"short"}
    decided = [e for e in logs if e["event"] == "scale_decision"]
    assert [e["pool"] for e in decided] == ["long"]


def test_the_controller_gives_up_only_once_every_pool_has(embedded: Embedded) -> None:
    long_queue, long_beats = embedded["long"]
    submit(long_queue, 1)
    down = DownQueue(signal_at=3)  # given up after 2 failures, and still tried again
    long_set = ScaleSet()
    controller = loop.Controller(
        [
            loop.Pool(name="short", depth=down, scale_set=ScaleSet(), heartbeats=long_beats, settings=FAST),
            loop.Pool(name="long", depth=long_queue, scale_set=long_set, heartbeats=long_beats, settings=FAST),
        ],
        max_consecutive_failures=2,
    )
    with structlog.testing.capture_logs() as logs:
        run_until(controller, down.tried)
    assert down.tried.is_set()
    assert [e["pool"] for e in logs if e["event"] == "pool_failing"] == ["short"]
    assert long_set.writes == [1], "the healthy pool scaled while the other failed"

    both_down = loop.Controller(
        [
            loop.Pool(name="a", depth=DownQueue(), scale_set=ScaleSet(), heartbeats=long_beats, settings=FAST),
            loop.Pool(name="b", depth=DownQueue(), scale_set=ScaleSet(), heartbeats=long_beats, settings=FAST),
        ],
        max_consecutive_failures=2,
    )
    with pytest.raises(errors.TransientQueueError):
        both_down.run(threading.Event())
    assert {name: s.failures for name, s in both_down.pool_stats.items()} == {"a": 2, "b": 2}


def test_it_exits_when_drained_only_once_every_pool_is(embedded: Embedded) -> None:
    (short_queue, short_beats), (long_queue, long_beats) = embedded["short"], embedded["long"]
    submit(long_queue, 1)
    drained = FAST.model_copy(update={"exit_when_drained": True})
    controller = loop.Controller(
        [
            loop.Pool(
                name="short", depth=short_queue, scale_set=ScaleSet(), heartbeats=short_beats, settings=drained
            ),
            loop.Pool(
                name="long", depth=long_queue, scale_set=ScaleSet(), heartbeats=long_beats, settings=drained
            ),
        ]
    )
    finished = threading.Event()

    def run() -> None:
        controller.run(threading.Event())
        finished.set()

    runner = threading.Thread(target=run)
    runner.start()
    assert not finished.wait(0.3), "the long queue still holds a job"
    received = long_queue.receive(max_wait_s=1)
    assert received is not None
    long_queue.complete(received)
    assert finished.wait(10)
    runner.join()
    stats = controller.pool_stats
    assert stats["short"].capacity_writes == 0 and stats["long"].capacity_writes == 1
    assert controller.stats.rounds == stats["short"].rounds + stats["long"].rounds, "combined: the sum"


def test_each_pool_reports_under_its_own_label(embedded: Embedded) -> None:
    (short_queue, short_beats), (long_queue, long_beats) = embedded["short"], embedded["long"]
    submit(long_queue, 2)
    exporter = prometheus.ControllerExporter(Health(stall_s=60))
    wrote = threading.Event()
    controller = loop.Controller(
        [
            loop.Pool(
                name="short",
                depth=short_queue,
                scale_set=ScaleSet(),
                heartbeats=short_beats,
                settings=FAST,
                metrics=exporter.pool("short"),
            ),
            loop.Pool(
                name="long",
                depth=long_queue,
                scale_set=WritesSignal(wrote),
                heartbeats=long_beats,
                settings=FAST,
                metrics=exporter.pool("long"),
            ),
        ]
    )
    run_until(controller, wrote)
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exporter.render()[0].decode())
        for s in family.samples
    }
    assert found[("scalebus_queue_active_messages", (("pool", "long"),))] == 2
    assert found[("scalebus_queue_active_messages", (("pool", "short"),))] == 0
    assert found[("scalebus_controller_decisions_total", (("pool", "long"), ("reason", "scale_out")))] == 1
    assert found[("scalebus_controller_decisions_total", (("pool", "short"), ("reason", "scale_out")))] == 0
    assert {dict(labels).get("pool") for _, labels in found} == {"short", "long"}


class Counter:
    """The adapter's count of 429s it retried itself: one more after the first read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return 0 if self.reads == 1 else 1


def test_a_429_one_pool_saw_holds_back_the_writes_of_every_pool_on_its_subscription(embedded: Embedded) -> None:
    (short_queue, short_beats), (long_queue, long_beats) = embedded["short"], embedded["long"]
    submit(long_queue, 2)
    key = "subscription:s1"
    long_set = ScaleSet()
    down = DownQueue(signal_at=6)  # a third pool, only to count passes
    controller = loop.Controller(
        [
            loop.Pool(
                name="short",
                depth=short_queue,
                scale_set=ScaleSet(),
                heartbeats=short_beats,
                settings=FAST,
                budget_key=key,
                throttled_count=Counter(),
            ),
            loop.Pool(
                name="long",
                depth=long_queue,
                scale_set=long_set,
                heartbeats=long_beats,
                settings=FAST,
                budget_key=key,
            ),
            loop.Pool(name="other", depth=down, scale_set=ScaleSet(), heartbeats=long_beats, settings=FAST),
        ]
    )
    with structlog.testing.capture_logs() as logs:
        run_until(controller, down.tried)
    assert long_set.writes == [], "held back by the other pool's 429"
    assert controller.budget.state(key).closed_until > 0
    assert [e["pool"] for e in logs if e["event"] == "arm_throttled_holding_writes"] == ["short"]
    waits = [e for e in logs if e["event"] == "shared_write_budget"]
    assert [(e["pool"], e["waiting"]) for e in waits] == [("long", True)], "logged once as the wait starts"
