"""The queue contract against a real Service Bus namespace (opt-in: ``pytest --azure-live``).

Environment: ``SCALEBUS_LIVE_SERVICEBUS_CONNECTION`` (a connection string with Manage rights, so the test can
create and delete its queues) and optionally ``SCALEBUS_LIVE_SERVICEBUS_NAMESPACE``
(``<ns>.servicebus.windows.net``; read from the connection string when unset).
Each test gets a fresh queue with the requested lock duration and max delivery count, deleted afterwards.
The assertions are the contract suite's own, imported unchanged.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from azure.servicebus import parse_connection_string
from azure.servicebus.management import ServiceBusAdministrationClient

from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings
from tests.contract import test_queue_contract as contract

pytestmark = pytest.mark.azure_live

CONNECTION_ENV = "SCALEBUS_LIVE_SERVICEBUS_CONNECTION"


@pytest.fixture
def queue_factory() -> Iterator[Callable[..., tuple[base.JobQueue, base.QueueDepth]]]:
    conn_str = os.environ.get(CONNECTION_ENV)
    if not conn_str:
        pytest.skip(f"set {CONNECTION_ENV} to run against a real namespace")
    namespace = (
        os.environ.get("SCALEBUS_LIVE_SERVICEBUS_NAMESPACE")
        or parse_connection_string(conn_str).fully_qualified_namespace
    )
    admin = ServiceBusAdministrationClient.from_connection_string(conn_str)
    created: list[str] = []
    opened: list[servicebus.ServiceBusJobQueue] = []

    def factory(
        *, lock_duration_s: float = 5, max_delivery_count: int = 3
    ) -> tuple[base.JobQueue, base.QueueDepth]:
        name = f"scalebus-live-{uuid.uuid4().hex[:12]}"
        admin.create_queue(
            name,
            lock_duration=datetime.timedelta(seconds=lock_duration_s),
            max_delivery_count=max_delivery_count,
            requires_duplicate_detection=True,
        )
        created.append(name)
        settings = QueueSettings(
            url=f"servicebus://{namespace}/{name}",
            connection_string_env=CONNECTION_ENV,
            depth_source="admin",
            depth_cache_s=0.0,
        )
        queue, depth = servicebus.open_servicebus(settings)
        opened.append(queue)
        return queue, depth

    yield factory
    for queue in opened:
        queue.close()
    for name in created:
        admin.delete_queue(name)
    admin.close()


test_send_receive_complete_removes_message = contract.test_send_receive_complete_removes_message
test_messages_arrive_in_order = contract.test_messages_arrive_in_order_and_locked_ones_are_not_redelivered
test_abandon_redelivers_with_higher_delivery_count = contract.test_abandon_redelivers_with_higher_delivery_count
test_expired_lock_redelivers = contract.test_expired_lock_redelivers_and_old_lock_cannot_settle
test_renew_lock_extends_the_lock = contract.test_renew_lock_extends_the_lock
test_keep_locked_holds_a_job = contract.test_keep_locked_holds_a_job_past_several_lock_durations
test_dead_letter_keeps_reason_and_description = contract.test_dead_letter_keeps_reason_and_description
test_max_delivery_count_moves_message_to_dead_letter = (
    contract.test_max_delivery_count_moves_message_to_dead_letter
)
test_depth_counts_active_and_in_flight = contract.test_depth_counts_active_and_in_flight
test_concurrent_receivers_never_share_a_message = contract.test_concurrent_receivers_never_share_a_message
