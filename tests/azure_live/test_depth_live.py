"""What the depth sources count, against a real namespace (opt-in: ``--azure-live``).

Environment: ``SCALEBUS_LIVE_SERVICEBUS_CONNECTION`` (a connection string with Manage rights: the test creates
and deletes its queue). Service Bus counts a locked message as active and reports no locked count, which the
controller relies on (it takes in-flight work from heartbeats); this test pins that down. The Monitor source is
minutes late by design and is not checked here.
"""

from __future__ import annotations

import datetime
import os
import uuid

import pytest
from azure.servicebus import parse_connection_string
from azure.servicebus.management import ServiceBusAdministrationClient

from scalebus.backends import base
from scalebus.backends.azure import servicebus
from scalebus.settings import QueueSettings

pytestmark = pytest.mark.azure_live

CONNECTION_ENV = "SCALEBUS_LIVE_SERVICEBUS_CONNECTION"


def test_a_locked_message_is_still_counted_active() -> None:
    conn_str = os.environ.get(CONNECTION_ENV)
    if not conn_str:
        pytest.skip(f"set {CONNECTION_ENV} to run against a real namespace")
    namespace = parse_connection_string(conn_str).fully_qualified_namespace
    name = f"scalebus-live-{uuid.uuid4().hex[:12]}"
    admin = ServiceBusAdministrationClient.from_connection_string(conn_str)
    admin.create_queue(name, lock_duration=datetime.timedelta(seconds=30), requires_duplicate_detection=True)
    settings = QueueSettings(
        url=f"servicebus://{namespace}/{name}",
        connection_string_env=CONNECTION_ENV,
        depth_source="admin",
        depth_cache_s=0.0,
    )
    queue, depth = servicebus.open_servicebus(settings)
    try:
        queue.send([base.OutgoingMessage(message_id=f"job-{i}", body=b"{}") for i in range(2)])
        locked = queue.receive(max_wait_s=10)
        assert locked is not None

        sample = depth.read_depth()

        assert sample.active == 2, "Service Bus counts the locked message as active"
        assert sample.active_includes_locked and sample.in_flight is None
        queue.abandon(locked)
    finally:
        queue.close()
        depth.close()
        admin.delete_queue(name)
        admin.close()
