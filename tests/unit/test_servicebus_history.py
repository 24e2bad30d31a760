"""What ``status`` can learn of a Service Bus queue's last hour: Azure Monitor's counts and the oldest active
message from a peek, over the wire-level broker and Monitor fakes; dead letters paged through short peeks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.azure import monitor, servicebus
from scalebus.settings import QueueSettings
from tests.fakes import rbac
from tests.fakes.monitor_metrics import MonitorMetricsServer
from tests.fakes.servicebus_amqp import ServiceBusBroker
from tests.fakes.servicebus_plugin import StaticTokenCredential, new_queue_name

Settings = Callable[..., tuple[QueueSettings, dict[str, str]]]


@pytest.fixture
def live_metrics(monitor_metrics: MonitorMetricsServer) -> Iterator[MonitorMetricsServer]:
    """The shared Monitor fake without its lag, for one test: what was just done is already counted."""
    lag, monitor_metrics.lag_s = monitor_metrics.lag_s, 0.0
    yield monitor_metrics
    monitor_metrics.lag_s = lag


@pytest.fixture
def open_queue(
    servicebus_broker: ServiceBusBroker, servicebus_settings: Settings
) -> Iterator[Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]]]:
    opened: list[servicebus.ServiceBusJobQueue] = []

    def make(**overrides: object) -> tuple[servicebus.ServiceBusJobQueue, QueueSettings]:
        name = new_queue_name("h")
        servicebus_broker.create_queue(name, lock_duration_s=5, max_delivery_count=3)
        settings, environ = servicebus_settings(name, **overrides)
        queue, depth = servicebus.open_servicebus(settings, environ=environ)
        depth.close()
        opened.append(queue)
        return queue, settings

    yield make
    for queue in opened:
        queue.close()


def _settle(queue: base.JobQueue, *, complete: int, dead: int, waiting: int) -> None:
    queue.send([base.OutgoingMessage(f"j{i}", b"{}") for i in range(complete + dead + waiting)])
    for i in range(complete + dead):
        got = queue.receive(max_wait_s=5)
        assert got is not None
        if i < complete:
            queue.complete(got)
        else:
            queue.dead_letter(got, reason="SchemaViolation", description="bad")


def test_counts_come_from_monitor_and_the_oldest_from_a_peek(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
    live_metrics: MonitorMetricsServer,
) -> None:
    queue, settings = open_queue()
    started = time.time()
    _settle(queue, complete=3, dead=2, waiting=1)
    history = servicebus.open_history(settings, queue, credential=StaticTokenCredential())
    try:
        got = history.recent(since=started - 3600)
    finally:
        history.close()
    assert (got.completed, got.dead_lettered, got.enqueued) == (3, 2, 6)
    assert got.source == "servicebus+azure-monitor"
    assert got.oldest_waiting_s is not None and 0 <= got.oldest_waiting_s < time.time() - started + 1
    assert got.oldest_includes_locked is True
    assert (got.wait_p50_s, got.run_p50_s) == (None, None)
    assert any(u.startswith("wait and run percentiles: ") for u in got.unavailable)


def test_a_refused_monitor_leaves_the_peek_standing(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
    live_metrics: MonitorMetricsServer,
) -> None:
    queue, settings = open_queue()
    _settle(queue, complete=1, dead=0, waiting=1)
    live_metrics.access = rbac.AccessPolicy()  # nobody holds Microsoft.Insights/Metrics/Read
    try:
        history = servicebus.open_history(settings, queue, credential=StaticTokenCredential())
        got = history.recent(since=time.time() - 3600)
        history.close()
    finally:
        live_metrics.access = None
    assert (got.completed, got.enqueued, got.source) == (None, None, "servicebus")
    assert got.oldest_waiting_s is not None
    assert any(
        "Metrics/Read" in u and u.startswith("completed, enqueued and dead-lettered: ") for u in got.unavailable
    )


def test_without_monitor_settings_it_says_where_counts_would_come_from(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
) -> None:
    queue, settings = open_queue(namespace_resource_id="")
    got = servicebus.open_history(settings, queue).recent(since=time.time() - 3600)
    assert got.completed is None and got.oldest_waiting_s is None  # nothing waiting, nothing counted
    assert any("queue.namespace_resource_id" in u for u in got.unavailable)


def test_the_oldest_skips_scheduled_messages(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
) -> None:
    """A released job waits out its delay as a scheduled copy: not waiting for a worker yet."""
    queue, _ = open_queue()
    queue.send([base.OutgoingMessage("early", b"{}")])
    got = queue.receive(max_wait_s=5)
    assert got is not None
    queue.release_later(got, delay_s=60)
    assert queue.oldest_active_enqueued_at(now=time.time()) == (None, True)
    queue.send([base.OutgoingMessage("later", b"{}")])
    at, known = queue.oldest_active_enqueued_at(now=time.time())
    assert known and at is not None and time.time() - at < 5


def test_the_oldest_is_unknown_when_the_pages_peeked_hold_none_waiting(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
    servicebus_broker: ServiceBusBroker,
) -> None:
    queue, settings = open_queue(namespace_resource_id="")
    queue.send([base.OutgoingMessage(f"j{i}", b"{}") for i in range(servicebus.OLDEST_PEEK_PAGES + 1)])
    for _ in range(servicebus.OLDEST_PEEK_PAGES + 1):
        got = queue.receive(max_wait_s=5)
        assert got is not None
        queue.release_later(got, delay_s=60)  # every one a scheduled copy now
    queue.send([base.OutgoingMessage("last", b"{}")])  # waiting, but behind them
    limit, servicebus_broker.peek_limit = servicebus_broker.peek_limit, 1
    try:
        assert queue.oldest_active_enqueued_at(now=time.time()) == (None, False)
        got_history = servicebus.open_history(settings, queue).recent(since=time.time() - 3600)
    finally:
        servicebus_broker.peek_limit = limit
    assert got_history.oldest_waiting_s is None
    assert any(u.startswith("oldest waiting: the first ") for u in got_history.unavailable)
    assert queue.oldest_active_enqueued_at(now=time.time())[0] is not None, "found with whole pages"


def test_dead_letters_page_on_past_short_peeks(
    open_queue: Callable[..., tuple[servicebus.ServiceBusJobQueue, QueueSettings]],
    servicebus_broker: ServiceBusBroker,
) -> None:
    """A peek may return fewer than asked while more remain: only an empty peek ends the reading."""
    queue, _ = open_queue()
    _settle(queue, complete=0, dead=30, waiting=0)
    limit, servicebus_broker.peek_limit = servicebus_broker.peek_limit, 7
    try:
        dead = queue.peek_dead_letters(max_count=1000)
    finally:
        servicebus_broker.peek_limit = limit
    assert [d.message_id for d in dead] == [f"j{i}" for i in range(30)]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param({}, monitor.MonitorCounts(None, None, None, None), id="no-samples"),
        pytest.param(
            {
                "CompleteMessage": [(0.0, 2.0), (60.0, 3.0)],
                "IncomingMessages": [(0.0, 4.0)],
                "DeadletteredMessages": [(0.0, 5.0), (60.0, 7.0), (120.0, 1.0), (180.0, 2.0)],
            },
            monitor.MonitorCounts(completed=5, enqueued=4, dead_lettered=3, newest_at=240.0),
            id="counters-summed-gauge-rises-summed",
        ),
    ],
)
def test_counts_from_points(points: dict[str, list[tuple[float, float]]], expected: monitor.MonitorCounts) -> None:
    assert monitor.counts_from_points(points) == expected


def _pool_toml(name: str, settings: QueueSettings, tmp_path: Path) -> str:
    return (
        f'[[pools]]\nname = "{name}"\n[pools.queue]\nurl = "{settings.url}"\n'
        f'connection_string_env = "{settings.connection_string_env}"\ndepth_source = "admin"\n'
        f'admin_endpoint = "{settings.admin_endpoint}"\nconnection_verify = "{settings.connection_verify}"\n'
        f'namespace_resource_id = ""\n[pools.scale_set]\nstate_path = "{tmp_path}/{name}-pool.db"\n'
    )


def _status(tmp_path: Path, config: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "scalebus.toml"
    path.write_text("[controller]\nlease_s = 0\n" + config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEBUS_")} | environ
    return subprocess.run(
        [sys.executable, "-m", "scalebus", "status", "-c", str(path), "-o", "json"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_of_a_service_bus_pool_says_what_it_cannot_tell(
    tmp_path: Path, servicebus_broker: ServiceBusBroker, servicebus_settings: Settings
) -> None:
    name = new_queue_name("s")
    servicebus_broker.create_queue(name, lock_duration_s=5, max_delivery_count=3)
    settings, environ = servicebus_settings(name)
    queue, depth = servicebus.open_servicebus(settings, environ=environ)
    try:
        _settle(queue, complete=0, dead=3, waiting=2)
    finally:
        queue.close()
        depth.close()
    result = _status(tmp_path, _pool_toml("azure", settings, tmp_path), environ)
    assert result.returncode == 0, result.stderr
    (pool,) = json.loads(result.stdout)["pools"]
    assert (pool["pool"], pool["depth"]["active"], len(pool["dead_letters"])) == ("azure", 2, 3)
    last = pool["throughput"]
    assert (last["completed"], last["wait_s"]["p50"], last["oldest_includes_locked"]) == (None, None, True)
    assert last["oldest_waiting_s"] is not None
    assert any("queue.monitor_endpoint" in u for u in pool["unavailable"])


def test_status_of_a_missing_service_bus_queue_is_a_mistake(tmp_path: Path, servicebus_settings: Settings) -> None:
    settings, environ = servicebus_settings("never-created-status")
    result = _status(tmp_path, _pool_toml("azure", settings, tmp_path), environ)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("scalebus: error: ")]
    assert len(errors) == 1 and "never-created-status: not found" in errors[0], result.stderr
