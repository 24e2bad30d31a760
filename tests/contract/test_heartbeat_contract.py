"""``HeartbeatStore`` contract: the same assertions over the pool's SQLite store and the blob store (Azurite).

Beats flow from workers to the controller; the fleet hint flows back, one record per fleet, kept apart from the
heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.local import pool

StoreFactory = Callable[[], base.HeartbeatStore]
W = base.WorkerState


@pytest.fixture
def sqlite_heartbeats_factory(tmp_path: Path) -> StoreFactory:
    names = iter(range(1_000))
    return lambda: pool.SqliteHeartbeatStore.open(tmp_path / f"pool{next(names)}.db")


@pytest.fixture
def blob_heartbeats_factory(request: pytest.FixtureRequest) -> StoreFactory:
    from scalebus.backends.azure import heartbeats
    from tests.fakes.azurite_plugin import ACCOUNT

    azurite = request.getfixturevalue("azurite_env")

    def factory() -> base.HeartbeatStore:
        uri = f"abfss://{azurite.new_container()}@{ACCOUNT}.dfs.core.windows.net/fleet/"
        return heartbeats.open_heartbeat_store(uri, azurite.storage_settings())

    return factory


@pytest.fixture(params=["sqlite", pytest.param("blob", marks=pytest.mark.azurite)])
def heartbeats_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """``factory() -> HeartbeatStore`` for a fresh, empty fleet."""
    factory: StoreFactory = request.getfixturevalue(f"{request.param}_heartbeats_factory")
    return factory


def test_no_hint_until_one_is_published(heartbeats_factory: StoreFactory) -> None:
    store = heartbeats_factory()
    assert store.read_hint() is None
    store.beat(base.Heartbeat("vm-1", W.IDLE, at=1.0))
    assert store.read_hint() is None


def test_latest_hint_wins_and_is_not_a_heartbeat(heartbeats_factory: StoreFactory) -> None:
    store = heartbeats_factory()
    store.beat(base.Heartbeat("vm-1", W.BUSY, at=10.0, job_id="j1"))
    store.publish_hint(base.FleetHint(idle_grace_s=5.0, at=11.0))
    store.publish_hint(base.FleetHint(idle_grace_s=42.5, at=12.25))
    assert store.read_hint() == base.FleetHint(idle_grace_s=42.5, at=12.25)
    assert store.read_all() == [base.Heartbeat("vm-1", W.BUSY, at=10.0, job_id="j1")]


def test_hint_can_be_published_before_any_worker_beats(heartbeats_factory: StoreFactory) -> None:
    """The controller starts first on an empty fleet (for the blob store: before the container exists)."""
    store = heartbeats_factory()
    store.publish_hint(base.FleetHint(idle_grace_s=0.0, at=1.0))
    assert store.read_hint() == base.FleetHint(idle_grace_s=0.0, at=1.0)
    assert store.read_all() == []


def test_close_twice_is_harmless(heartbeats_factory: StoreFactory) -> None:
    store = heartbeats_factory()
    store.beat(base.Heartbeat("vm-1", W.IDLE, at=1.0))
    assert [hb.instance_id for hb in store.read_all()] == ["vm-1"]
    store.close()
    store.close()
