"""Blob heartbeats against a real storage account (opt-in: ``--azure-live``).

Environment: ``SCALEBUS_LIVE_STORAGE_URI``, an ``abfss://<filesystem>@<account>.dfs.core.windows.net/<prefix>``
location the test may write under (it uses a fresh sub-prefix and deletes what it wrote). The identity needs
*Storage Blob Data Contributor* on that filesystem; credentials come from ``DefaultAzureCredential`` unless
``SCALEBUS_LIVE_STORAGE_CONNECTION`` holds a connection string or SAS.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from scalebus import settings
from scalebus.backends import base
from scalebus.backends.azure import heartbeats

pytestmark = pytest.mark.azure_live

URI_ENV = "SCALEBUS_LIVE_STORAGE_URI"
CONNECTION_ENV = "SCALEBUS_LIVE_STORAGE_CONNECTION"


@pytest.fixture
def live_store() -> Iterator[heartbeats.BlobHeartbeatStore]:
    uri = os.environ.get(URI_ENV, "")
    if not uri:
        pytest.skip(f"set {URI_ENV} to an abfss:// location the test may write under")
    storage = settings.StorageSettings(
        connection_string_env=CONNECTION_ENV if os.environ.get(CONNECTION_ENV) else ""
    )
    store = heartbeats.open_heartbeat_store(f"{uri.rstrip('/')}/live-{uuid.uuid4().hex[:8]}", storage)
    yield store
    store.close()


def test_a_heartbeat_round_trips_and_is_forgotten(live_store: heartbeats.BlobHeartbeatStore) -> None:
    beat = base.Heartbeat("live-0", base.WorkerState.BUSY, at=time.time(), job_id="job-live")

    live_store.beat(beat)
    read = {b.instance_id: b for b in live_store.read_all()}
    live_store.forget("live-0")

    assert read["live-0"].state is base.WorkerState.BUSY and read["live-0"].job_id == "job-live"
    assert "live-0" not in {b.instance_id for b in live_store.read_all()}
