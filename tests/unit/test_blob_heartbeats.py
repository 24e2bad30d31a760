"""``BlobHeartbeatStore`` against Azurite: one blob per instance, read back with one listing."""

from __future__ import annotations

import uuid

import pytest
from structlog.testing import capture_logs

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import heartbeats
from scalebus.settings import ScaleSetSettings
from tests.fakes.azurite_plugin import ACCOUNT, AzuriteServer

pytestmark = pytest.mark.azurite


@pytest.fixture
def store(azurite_env: AzuriteServer) -> heartbeats.BlobHeartbeatStore:
    container = azurite_env.new_container()
    uri = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/fleet-a/"
    return heartbeats.open_heartbeat_store(uri, azurite_env.storage_settings())


def test_beats_are_read_back_latest_wins(store: heartbeats.BlobHeartbeatStore) -> None:
    store.beat(base.Heartbeat("vm_0", base.WorkerState.IDLE, at=100.0))
    store.beat(base.Heartbeat("vm/1 ü", base.WorkerState.BUSY, at=101.5, job_id="job 7/ü"))
    store.beat(base.Heartbeat("vm_0", base.WorkerState.DRAINING, at=102.25))
    assert sorted(store.read_all(), key=lambda hb: hb.instance_id) == [
        base.Heartbeat("vm/1 ü", base.WorkerState.BUSY, at=101.5, job_id="job 7/ü"),
        base.Heartbeat("vm_0", base.WorkerState.DRAINING, at=102.25),
    ]


def test_forget_removes_one_and_is_idempotent(store: heartbeats.BlobHeartbeatStore) -> None:
    store.beat(base.Heartbeat("a", base.WorkerState.IDLE, at=1.0))
    store.beat(base.Heartbeat("b", base.WorkerState.IDLE, at=1.0))
    store.forget("a")
    store.forget("a")
    assert [hb.instance_id for hb in store.read_all()] == ["b"]


def test_prefixes_keep_fleets_apart(azurite_env: AzuriteServer) -> None:
    container = azurite_env.new_container()
    root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net"
    fleet_a = heartbeats.open_heartbeat_store(root + "/a", azurite_env.storage_settings())
    fleet_b = heartbeats.open_heartbeat_store(root + "/b", azurite_env.storage_settings())
    fleet_a.beat(base.Heartbeat("1", base.WorkerState.BUSY, at=5.0, job_id="j"))
    assert fleet_b.read_all() == []
    assert [hb.instance_id for hb in fleet_a.read_all()] == ["1"]


def test_the_first_beat_creates_the_container(azurite_env: AzuriteServer) -> None:
    settings = azurite_env.storage_settings()
    store = heartbeats.open_heartbeats(settings, ScaleSetSettings(url="/subscriptions/s/resourceGroups/r/x/vmss1"))
    store.forget("nobody")
    assert store.read_all() == []
    store.beat(base.Heartbeat("0", base.WorkerState.IDLE, at=3.0))
    assert [hb.instance_id for hb in store.read_all()] == ["0"]


def test_fleet_heartbeats_need_an_account() -> None:
    from scalebus.settings import StorageSettings

    with pytest.raises(errors.ConfigError, match=r"storage\.account_url"):
        heartbeats.open_heartbeats(StorageSettings(), ScaleSetSettings())


def test_hint_before_the_container_exists(azurite_env: AzuriteServer) -> None:
    """The controller may publish before any worker beat: the first write creates the container."""
    uri = f"abfss://hint-{uuid.uuid4().hex[:12]}@{ACCOUNT}.dfs.core.windows.net/fleet/"
    store = heartbeats.open_heartbeat_store(uri, azurite_env.storage_settings())
    assert store.read_hint() is None
    store.publish_hint(base.FleetHint(idle_grace_s=7.5, at=3.0))
    assert store.read_hint() == base.FleetHint(idle_grace_s=7.5, at=3.0)
    assert store.read_all() == []


def test_hints_of_fleets_are_apart(azurite_env: AzuriteServer) -> None:
    container = azurite_env.new_container()
    root = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net"
    fleet_a = heartbeats.open_heartbeat_store(root + "/a", azurite_env.storage_settings())
    fleet_b = heartbeats.open_heartbeat_store(root + "/b", azurite_env.storage_settings())
    fleet_a.publish_hint(base.FleetHint(idle_grace_s=1.0, at=2.0))
    assert fleet_b.read_hint() is None


def test_an_unreadable_hint_is_no_hint(azurite_env: AzuriteServer) -> None:
    from azure.storage.blob import BlobServiceClient

    container = azurite_env.new_container()
    uri = f"abfss://{container}@{ACCOUNT}.dfs.core.windows.net/fleet/"
    store = heartbeats.open_heartbeat_store(uri, azurite_env.storage_settings())
    with BlobServiceClient.from_connection_string(azurite_env.connection_string()) as client:
        client.get_blob_client(container, "fleet/" + heartbeats.HINT_BLOB).upload_blob(b"{oops")
    with capture_logs() as logs:
        assert store.read_hint() is None
    assert [e["event"] for e in logs] == ["fleet_hint.unreadable"]
    assert store.read_all() == []
