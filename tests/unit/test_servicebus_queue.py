"""The Service Bus adapters over real sockets: the real SDK against the fake broker, admin endpoint and Monitor.

The port-wide behaviour (complete/abandon/dead-letter, expiry, renewal for 2.5 lock durations, max deliveries)
is in tests/contract; these tests cover what is specific to Service Bus: lost locks, the oversize guard,
duplicate detection, the depth sources and their caching, error translation, and secrets staying out of logs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import structlog
from azure.servicebus import exceptions as sb_exc

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.fakes.monitor_metrics import MonitorMetricsServer
from tests.fakes.servicebus_admin import ServiceBusAdminServer
from tests.fakes.servicebus_amqp import ServiceBusBroker
from tests.fakes.servicebus_plugin import StaticTokenCredential, new_queue_name

Settings = Callable[..., tuple[QueueSettings, dict[str, str]]]


def _msg(i: int | str, body: bytes = b"{}") -> base.OutgoingMessage:
    return base.OutgoingMessage(message_id=f"job-{i}", body=body)


@pytest.fixture
def open_queue(
    servicebus_broker: ServiceBusBroker, servicebus_settings: Settings
) -> Callable[..., tuple[str, servicebus.ServiceBusJobQueue, base.QueueDepth]]:
    opened: list[object] = []

    def make(
        *,
        lock_duration_s: float = 5,
        max_delivery_count: int = 3,
        duplicate_detection: bool = True,
        **overrides: object,
    ) -> tuple[str, servicebus.ServiceBusJobQueue, base.QueueDepth]:
        name = new_queue_name("u")
        servicebus_broker.create_queue(
            name,
            lock_duration_s=lock_duration_s,
            max_delivery_count=max_delivery_count,
            requires_duplicate_detection=duplicate_detection,
        )
        settings, environ = servicebus_settings(name, **overrides)
        credential = StaticTokenCredential() if settings.depth_source == "monitor" else None
        queue, depth = servicebus.open_servicebus(settings, environ=environ, credential=credential)
        opened.append(queue)
        return name, queue, depth

    yield make  # type: ignore[misc]
    for queue in opened:
        queue.close()  # type: ignore[attr-defined]


def test_lost_lock_raises_and_the_job_is_completed_once(open_queue, servicebus_broker: ServiceBusBroker) -> None:  # type: ignore[no-untyped-def]
    name, queue, _ = open_queue()
    queue.send([_msg(1)])
    first = queue.receive(max_wait_s=5)
    assert first is not None
    assert servicebus_broker.expire_locks_now(name) == 1  # the broker forgets the lock (failover, pause, ...)
    again = queue.receive(max_wait_s=5)
    assert again is not None and again.message_id == "job-1" and again.delivery_count == 2
    with pytest.raises(errors.LockLostError):
        queue.complete(first)
    with pytest.raises(errors.LockLostError):
        queue.renew_lock(first)
    queue.complete(again)
    counts = servicebus_broker.counts(name)
    assert counts is not None
    assert (counts.completed, counts.active, counts.locked, counts.dead_lettered) == (1, 0, 0, 0)


def test_keep_locked_reports_a_lost_lock(open_queue, servicebus_broker: ServiceBusBroker) -> None:  # type: ignore[no-untyped-def]
    name, queue, _ = open_queue(lock_duration_s=5)
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=5)
    assert got is not None
    lost: list[BaseException] = []
    called = threading.Event()

    def on_lost(exc: BaseException) -> None:
        lost.append(exc)
        called.set()

    keeper = queue.keep_locked(got, on_lost=on_lost)
    try:
        servicebus_broker.expire_locks_now(name)
        assert called.wait(10), "the renewer never noticed the lost lock"
    finally:
        keeper.stop()
    assert len(lost) == 1 and isinstance(lost[0], errors.LockLostError)
    assert keeper.lost is lost[0]
    with pytest.raises(errors.LockLostError):
        queue.complete(got)


def test_oversize_job_is_refused_before_sending(open_queue, servicebus_broker: ServiceBusBroker) -> None:  # type: ignore[no-untyped-def]
    name, queue, _ = open_queue()
    with pytest.raises(errors.InvalidJobError) as caught:
        queue.send([_msg("small"), _msg("big", b"x" * (256 * 1024))])
    assert caught.value.reason == "MessageTooLarge"
    counts = servicebus_broker.counts(name)
    assert counts is not None and counts.total_received == 0  # nothing of the batch went out


def test_many_jobs_go_out_in_batches_and_duplicates_are_dropped(  # type: ignore[no-untyped-def]
    open_queue, servicebus_broker: ServiceBusBroker
) -> None:
    name, queue, _ = open_queue()
    body = b"y" * (60 * 1024)  # four of these fill a 256 KB batch: the sender must split
    queue.send([_msg(i, body) for i in range(6)])
    queue.send([_msg(0, body)])  # same job id again: Service Bus duplicate detection drops it
    counts = servicebus_broker.counts(name)
    assert counts is not None and (counts.total_received, counts.active) == (6, 6)


def test_without_duplicate_detection_a_resubmitted_job_is_kept(  # type: ignore[no-untyped-def]
    open_queue, servicebus_broker: ServiceBusBroker
) -> None:
    name, queue, _ = open_queue(duplicate_detection=False)
    queue.send([_msg(0)])
    queue.send([_msg(0)])  # a queue created without requiresDuplicateDetection keeps both
    counts = servicebus_broker.counts(name)
    assert counts is not None and (counts.total_received, counts.active) == (2, 2)


def test_admin_depth_without_manage_rights_is_a_distinct_access_error(  # type: ignore[no-untyped-def]
    open_queue, servicebus_admin: ServiceBusAdminServer
) -> None:
    name, _, depth = open_queue(depth_source="admin")
    servicebus_admin.manage_rights = False
    try:
        before = servicebus_admin.request_count(name)
        with pytest.raises(errors.QueueAccessDenied, match="Manage") as caught:
            depth.read_depth()
    finally:
        servicebus_admin.manage_rights = True
    assert isinstance(caught.value, errors.AccessDeniedError) and not caught.value.transient
    assert servicebus_admin.request_count(name) == before + 1, "a missing right is not retried"


def test_closing_while_a_renewal_is_in_flight_raises_nowhere(  # type: ignore[no-untyped-def]
    open_queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    _, queue, _ = open_queue(lock_duration_s=5)
    queue.send([_msg(1)])
    got = queue.receive(max_wait_s=5)
    assert got is not None
    keeper = queue.keep_locked(got, on_lost=lambda _exc: None)
    time.sleep(1.2)  # the renewer wakes once a second and renews a 5 s lock at once

    queue.close()
    keeper.stop()
    time.sleep(1.2)  # let the renewer's thread run into the closed receiver

    assert escaped == []


def test_a_handler_failing_to_close_is_logged_not_raised() -> None:
    class Broken:
        def close(self) -> None:
            raise RuntimeError("link detached while renewing")

    with structlog.testing.capture_logs() as logs:
        servicebus._close_side_by_side([Broken()])

    assert [e["event"] for e in logs] == ["servicebus.close_failed"]


def test_requeue_with_many_receivers_moves_every_dead_letter_exactly_once(  # type: ignore[no-untyped-def]
    open_queue, servicebus_broker: ServiceBusBroker
) -> None:
    name, queue, _ = open_queue(lock_duration_s=30)
    count = 50
    queue.send([_msg(i, f'{{"n": {i}}}'.encode()) for i in range(count)])
    sequence_numbers = {}
    for _ in range(count):
        got = queue.receive(max_wait_s=5)
        assert got is not None
        queue.dead_letter(got, reason="Bad", description="bad input")
        sequence_numbers[got.message_id] = got.sequence_number

    moved = queue.requeue_dead_letters(max_count=1000, concurrency=4)

    assert sorted(m.message_id for m in moved) == sorted(sequence_numbers)  # each dead letter once
    assert sorted(m.new_message_id for m in moved) == sorted(
        base.requeued_message_id(mid, seq) for mid, seq in sequence_numbers.items()
    )
    counts = servicebus_broker.counts(name)
    assert counts is not None
    # the originals and one copy each reached the queue; nothing is dead-lettered or left locked
    assert (counts.total_received, counts.active, counts.dead_lettered, counts.locked) == (2 * count, count, 0, 0)
    bodies = {}
    while (got := queue.receive(max_wait_s=1)) is not None:
        bodies[got.message_id] = got.body
        queue.complete(got)
    assert bodies == {m.new_message_id: f'{{"n": {m.message_id.removeprefix("job-")}}}'.encode() for m in moved}


def test_requeue_on_a_missing_queue_raises_our_error_from_every_receiver(servicebus_settings: Settings) -> None:
    settings, environ = servicebus_settings("never-created-dlq")
    queue, _ = servicebus.open_servicebus(settings, environ=environ)
    try:
        with pytest.raises(errors.QueueNotFoundError):
            queue.requeue_dead_letters(max_count=10, concurrency=3)
    finally:
        queue.close()


def test_unknown_queue_is_a_permanent_not_found(
    servicebus_settings: Settings, servicebus_broker: ServiceBusBroker
) -> None:
    settings, environ = servicebus_settings("never-created")
    queue, depth = servicebus.open_servicebus(settings, environ=environ)
    try:
        with pytest.raises(errors.QueueNotFoundError):
            queue.send([_msg(1)])
        with pytest.raises(errors.QueueNotFoundError):
            depth.read_depth()
    finally:
        queue.close()


def test_admin_depth_reads_the_endpoint_at_most_once_per_interval(  # type: ignore[no-untyped-def]
    open_queue, servicebus_admin: ServiceBusAdminServer
) -> None:
    name, queue, depth = open_queue(depth_cache_s=30.0)
    queue.send([_msg(1), _msg(2)])
    before = servicebus_admin.request_count(name)
    samples = [depth.read_depth() for _ in range(5)]
    assert servicebus_admin.request_count(name) - before == 1
    assert {s.active for s in samples} == {2}
    assert samples[0].in_flight is None and samples[0].source == "servicebus-admin"


def test_admin_depth_without_cache_reads_live_counts(  # type: ignore[no-untyped-def]
    open_queue, servicebus_admin: ServiceBusAdminServer
) -> None:
    name, queue, depth = open_queue(depth_cache_s=0.0)
    queue.send([_msg(1), _msg(2)])
    got = queue.receive(max_wait_s=5)
    assert got is not None
    queue.dead_letter(got, reason="Bad", description="bad input")
    before = servicebus_admin.request_count(name)
    first, second = depth.read_depth(), depth.read_depth()
    assert servicebus_admin.request_count(name) - before == 2
    assert (first.active, first.dead_lettered) == (1, 1) == (second.active, second.dead_lettered)
    assert isinstance(depth, servicebus.ServiceBusAdminDepth)
    counts = depth.runtime_counts()
    assert (counts.active, counts.dead_lettered, counts.scheduled, counts.transfer, counts.total) == (
        1,
        1,
        0,
        0,
        2,
    )


def test_monitor_depth_reports_the_age_of_the_sample(  # type: ignore[no-untyped-def]
    open_queue, monitor_metrics: MonitorMetricsServer
) -> None:
    _, queue, depth = open_queue(depth_source="monitor")
    queue.send([_msg(1), _msg(2), _msg(3)])
    before = monitor_metrics.request_count
    sample = depth.read_depth()
    assert (sample.active, sample.in_flight, sample.source) == (3, None, "azure-monitor")
    age = time.time() - sample.sampled_at
    assert monitor_metrics.lag_s - 5 <= age <= monitor_metrics.lag_s + 5
    assert monitor_metrics.request_count - before == 1


def test_monitor_needs_a_namespace_resource_id(servicebus_settings: Settings) -> None:
    settings, environ = servicebus_settings("q", depth_source="monitor", namespace_resource_id="")
    with pytest.raises(errors.ConfigError) as caught:
        servicebus.open_servicebus(settings, environ=environ, credential=StaticTokenCredential())
    assert caught.value.key == "queue.namespace_resource_id"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("servicebus://ns.servicebus.windows.net/jobs", True),
        ("servicebus://ns.servicebus.windows.net/", False),
        ("sqlite:///x.db?queue=jobs", False),
        ("servicebus://ns.servicebus.windows.net/a/b", False),
    ],
    ids=["valid", "no-queue", "other-scheme", "nested-path"],
)
def test_parse_url(url: str, ok: bool) -> None:
    if ok:
        assert servicebus.parse_url(url) == servicebus.ServiceBusTarget("ns.servicebus.windows.net", "jobs")
    else:
        with pytest.raises(errors.ConfigError):
            servicebus.parse_url(url)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (sb_exc.MessageLockLostError(message="SDK-DETAIL"), errors.LockLostError),
        (sb_exc.MessagingEntityNotFoundError(message="SDK-DETAIL"), errors.QueueNotFoundError),
        (sb_exc.ServiceBusConnectionError(message="SDK-DETAIL"), errors.TransientQueueError),
        (sb_exc.ServiceBusServerBusyError(message="SDK-DETAIL"), errors.TransientQueueError),
        (sb_exc.OperationTimeoutError(message="SDK-DETAIL"), errors.TransientQueueError),
        (sb_exc.ServiceBusAuthorizationError(message="SDK-DETAIL"), errors.QueueError),
        (sb_exc.ServiceBusQuotaExceededError(message="SDK-DETAIL"), errors.QueueError),
    ],
    ids=["lock-lost", "not-found", "connection", "busy", "timeout", "unauthorised", "quota"],
)
def test_sdk_errors_translate_by_type(exc: BaseException, expected: type[errors.BackendError]) -> None:
    translated = servicebus._to_scalebus(exc, what="op")
    assert type(translated) is expected
    assert "SDK-DETAIL" not in str(translated)  # the SDK's message is never copied


def test_missing_connection_string_names_the_variable_only(servicebus_settings: Settings) -> None:
    settings, _ = servicebus_settings("q")
    with pytest.raises(errors.ConfigError) as caught:
        servicebus.open_servicebus(settings, environ={})
    assert settings.connection_string_env in str(caught.value)


def test_secrets_never_reach_logs_or_errors(  # type: ignore[no-untyped-def]
    servicebus_settings: Settings,
    servicebus_broker: ServiceBusBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = new_queue_name("secret")
    servicebus_broker.create_queue(name, lock_duration_s=5, max_delivery_count=3)
    settings, environ = servicebus_settings(name)
    missing, _ = servicebus_settings("missing-queue")
    raised: list[str] = []
    with structlog.testing.capture_logs() as logs:
        queue, depth = servicebus.open_servicebus(settings, environ=environ)
        other, _ = servicebus.open_servicebus(missing, environ=environ)
        try:
            queue.send([_msg(1)])
            got = queue.receive(max_wait_s=5)
            assert got is not None
            queue.dead_letter(got, reason="Bad", description="bad")
            depth.read_depth()
            with pytest.raises(errors.QueueNotFoundError) as caught:
                other.send([_msg(2)])
            raised.append(str(caught.value))
            raised.extend(str(e) for e in _chain(caught.value))
        finally:
            queue.close()
            other.close()
    assert logs, "the adapter logged nothing: the check below would prove nothing"
    text = "\n".join([repr(logs), caplog.text, *raised])
    assert servicebus_broker.key not in text
    assert "SharedAccessKey=" not in text


def _chain(exc: BaseException) -> list[BaseException]:
    """Our error only: its cause is the SDK's exception, which is for debugging and never printed by scalebus."""
    return [exc]
