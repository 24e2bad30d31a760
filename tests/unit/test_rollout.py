"""``scalebus rollout``: the pure plan, then the whole rollout over the real azure-mgmt-compute client against
the ARM fake (both orchestration modes), under the shipped pipeline role."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scalebus import errors
from scalebus.backends import base
from scalebus.backends.azure import compute
from scalebus.backends.local import pool
from scalebus.cli import rollout
from tests.fakes import arm_compute
from tests.fakes.arm_compute import ArmComputeFake
from tests.fakes.compute_plugin import PIPELINE_TOKEN, StaticTokenCredential

NEW = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/node/versions/2.0.0"
OLD = arm_compute.DEFAULT_IMAGE
NOW = 1_000.0
RUNNING, FAILED, DELETING = base.InstanceState.RUNNING, base.InstanceState.FAILED, base.InstanceState.DELETING


def inst(iid: str, model: str, state: base.InstanceState = RUNNING) -> base.Instance:
    return base.Instance(iid, state, created_at=0.0, model=model)


def busy(iid: str, at: float = NOW - 1) -> base.Heartbeat:
    return base.Heartbeat(iid, base.WorkerState.BUSY, at, job_id=f"job-{iid}")


@pytest.mark.parametrize(
    ("instances", "beats", "capacity", "max_instances", "retire", "busy_ids", "capacity_to", "capped"),
    [
        pytest.param([], [], 0, 10, (), (), 0, False, id="empty-fleet"),
        pytest.param([inst("a", NEW)], [], 1, 10, (), (), 1, False, id="already-new"),
        pytest.param(
            [inst("a", OLD), inst("b", OLD), inst("c", NEW)],
            [busy("a")],
            3,
            10,
            ("a", "b"),
            ("a",),
            5,
            False,
            id="old-ones-replaced-ahead",
        ),
        pytest.param(
            [inst("a", OLD), inst("b", OLD), inst("c", OLD)],
            [],
            3,
            4,
            ("a", "b", "c"),
            (),
            4,
            True,
            id="capped-by-max-instances",
        ),
        pytest.param([inst("a", OLD)], [], 12, 10, ("a",), (), 12, True, id="never-lowered-above-max"),
        pytest.param(
            [inst("a", OLD, FAILED), inst("b", OLD, DELETING), inst("c", OLD)],
            [],
            2,
            10,
            ("a", "c"),
            (),
            3,
            False,
            id="failed-retire-without-replacement-deleting-ignored",
        ),
        pytest.param([inst("a", OLD)], [busy("a", at=NOW - 99)], 1, 10, ("a",), (), 2, False, id="stale-beat"),
    ],
)
def test_plan(
    instances: list[base.Instance],
    beats: list[base.Heartbeat],
    capacity: int,
    max_instances: int,
    retire: tuple[str, ...],
    busy_ids: tuple[str, ...],
    capacity_to: int,
    capped: bool,
) -> None:
    plan = rollout.plan_rollout(
        image=NEW,
        instances=instances,
        beats={hb.instance_id: hb for hb in beats},
        capacity=capacity,
        max_instances=max_instances,
        now=NOW,
        heartbeat_timeout_s=10.0,
    )
    assert (plan.retire, plan.busy, plan.capacity_to, plan.capacity_capped) == (
        retire,
        busy_ids,
        capacity_to,
        capped,
    )


def test_retire_hint_keeps_the_controllers_grace_and_age() -> None:
    assert rollout.retire_hint(base.FleetHint(7.0, at=5.0), ("a",)) == base.FleetHint(7.0, 5.0, ("a",))
    fresh = rollout.retire_hint(None, ("a",))
    assert fresh.at == 0.0, "no grace of ours looks like a live controller's"


# --------------------------------------------------------------------------------------------- over ARM


@pytest.fixture
def pipeline_adapter(arm_fake: ArmComputeFake) -> Iterator[Callable[[str], compute.VmssScaleSet]]:
    made: list[compute.VmssScaleSet] = []

    def make(scale_set_id: str) -> compute.VmssScaleSet:
        adapter = compute.VmssScaleSet(
            scale_set_id,
            credential=StaticTokenCredential(PIPELINE_TOKEN),
            arm_endpoint=arm_fake.endpoint,
            connection_verify=str(arm_fake.ca_path),
            polling_interval_s=0.02,
        )
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_update_model_leaves_existing_instances_on_their_image(
    mode: str, arm_fake: ArmComputeFake, pipeline_adapter: Callable[[str], compute.VmssScaleSet]
) -> None:
    scale_set = pipeline_adapter(arm_fake.create_scale_set(mode=mode, capacity=2))
    assert scale_set.model() == OLD
    assert isinstance(scale_set, base.ModelledScaleSet)

    scale_set.update_model(NEW)
    scale_set.set_capacity(3)

    assert scale_set.model() == NEW
    models = sorted(i.model for i in scale_set.list_instances())
    assert models == sorted([OLD, OLD, NEW])


@pytest.mark.parametrize(
    ("mode", "upgrade_mode"), [("Uniform", "Rolling"), ("Uniform", "Automatic"), ("Flexible", "Automatic")]
)
def test_update_model_is_refused_where_azure_would_reimage_running_instances(
    mode: str, upgrade_mode: str, arm_fake: ArmComputeFake, pipeline_adapter: Callable[[str], compute.VmssScaleSet]
) -> None:
    scale_set = pipeline_adapter(arm_fake.create_scale_set(mode=mode, capacity=1, upgrade_mode=upgrade_mode))
    with pytest.raises(errors.ConfigError, match=f"upgrade policy {upgrade_mode}"):
        scale_set.update_model(NEW)
    assert arm_fake.count("PATCH scaleset") == 0
    assert scale_set.model() == OLD


@pytest.mark.parametrize("mode", ["Uniform", "Flexible"])
def test_rollout_raises_capacity_ahead_names_old_instances_and_deletes_none(
    mode: str,
    arm_fake: ArmComputeFake,
    pipeline_adapter: Callable[[str], compute.VmssScaleSet],
    tmp_path: Path,
) -> None:
    scale_set = pipeline_adapter(arm_fake.create_scale_set(mode=mode, capacity=3))
    old_ids = sorted(i.instance_id for i in scale_set.list_instances())
    heartbeats = pool.SqliteHeartbeatStore.open(tmp_path / "beats.db")
    heartbeats.beat(base.Heartbeat(old_ids[0], base.WorkerState.BUSY, time.time(), job_id="j1"))
    heartbeats.beat(base.Heartbeat(old_ids[1], base.WorkerState.IDLE, time.time()))
    heartbeats.publish_hint(base.FleetHint(idle_grace_s=42.0, at=time.time()))
    arm_fake.reset_counts()

    result = rollout.run_rollout(
        scale_set, heartbeats=heartbeats, image=NEW, max_instances=10, heartbeat_timeout_s=30.0
    )

    assert sorted(result["retire"]) == old_ids
    assert result["busy"] == (old_ids[0],)
    assert (result["capacity_from"], result["capacity_to"]) == (3, 6)
    assert arm_fake.count("PATCH scaleset") == 2, "one model write, one capacity write"
    assert arm_fake.count("POST delete") == 0 and arm_fake.count("PUT instance") == 0, "nothing deleted"
    listed = scale_set.list_instances()
    assert sorted(i.instance_id for i in listed if i.model == OLD) == old_ids
    assert len([i for i in listed if i.model == NEW]) == 3
    hint = heartbeats.read_hint()
    assert hint is not None and sorted(hint.retire_instance_ids or ()) == old_ids
    assert hint.idle_grace_s == 42.0, "the controller's grace is kept"
    heartbeats.close()


def test_rollout_again_after_it_finished_changes_nothing(
    arm_fake: ArmComputeFake, pipeline_adapter: Callable[[str], compute.VmssScaleSet], tmp_path: Path
) -> None:
    scale_set = pipeline_adapter(arm_fake.create_scale_set(mode="Flexible", capacity=0, image=NEW))
    heartbeats = pool.SqliteHeartbeatStore.open(tmp_path / "beats.db")
    scale_set.set_capacity(2)
    arm_fake.reset_counts()

    result = rollout.run_rollout(
        scale_set, heartbeats=heartbeats, image=NEW, max_instances=10, heartbeat_timeout_s=30
    )

    assert result["retire"] == () and result["capacity_to"] == 2
    assert arm_fake.writes() == 0
    heartbeats.close()
