"""``scalebus rollout --image``: move the fleet to a new image without reimaging or deleting a busy worker.

Azure's own rolling and automatic OS upgrades reimage running instances, and with them the job in progress.
A rollout here replaces the fleet by attrition instead, in three writes:

1. **Model.** The scale set's model names the new image (refused where Azure would upgrade running instances
   itself: an upgrade policy other than ``Manual``). Instances that exist keep their image; every instance
   created from now on boots the new one.
2. **Capacity, ahead.** Capacity rises by the number of old-model instances (bounded by
   ``controller.max_instances``), so their replacements boot while they still work and supply never dips. The
   alternative, teaching the controller's policy that retiring instances are no supply, would replace them
   only once the queue asks, one policy round later, and would change the policy for every user to serve a
   rollout; the cost of the raise chosen here is at most one idle grace of extra instances when the queue is
   short, after which the surplus retires as any idle worker does (the controller never lowers capacity).
3. **Hint.** The old-model instances are named in the fleet hint (``FleetHint.retire_instance_ids``). A
   worker reads it every heartbeat: idle, it retires at once; busy, it finishes its job and retires instead of
   taking another. Retired workers are deleted by the controller (or delete themselves), as after any idle
   grace, so nothing here deletes an instance: a busy one is never touched.

The decision (which instances are old, the new capacity) is :func:`plan_rollout`, a pure function.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import rich.table
import structlog
import typer

from scalebus import errors
from scalebus.backends import base
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt, PoolOpt
from scalebus.cli.output import Output

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    """What a rollout does to the instances it found."""

    retire: tuple[str, ...]
    """Old-model instances: named in the hint, each retires once it holds no job."""
    busy: tuple[str, ...]
    """Of those, the ones holding a job now (they finish it first)."""
    capacity_from: int
    capacity_to: int
    capacity_capped: bool
    """The raise was cut by ``max_instances``: some replacements boot only as old instances leave."""


def plan_rollout(
    *,
    image: str,
    instances: list[base.Instance],
    beats: dict[str, base.Heartbeat],
    capacity: int,
    max_instances: int,
    now: float,
    heartbeat_timeout_s: float,
) -> RolloutPlan:
    """Old-model instances retire; capacity rises by those still able to work (not failed), up to
    ``max_instances`` (never lowered: a capacity already above it stays)."""
    old = [i for i in instances if i.state is not base.InstanceState.DELETING and i.model != image]
    working = [i for i in old if i.state is not base.InstanceState.FAILED]
    busy = tuple(i.instance_id for i in old if _holds_job(beats.get(i.instance_id), now, heartbeat_timeout_s))
    wanted = capacity + len(working)
    target = max(capacity, min(wanted, max_instances))
    return RolloutPlan(
        retire=tuple(i.instance_id for i in old),
        busy=busy,
        capacity_from=capacity,
        capacity_to=target,
        capacity_capped=target < wanted,
    )


def _holds_job(beat: base.Heartbeat | None, now: float, timeout_s: float) -> bool:
    return beat is not None and beat.job_id is not None and now - beat.at < timeout_s


def retire_hint(current: base.FleetHint | None, retire: tuple[str, ...]) -> base.FleetHint:
    """The hint naming ``retire``, keeping the controller's idle grace as it was. With no hint yet, the grace is
    the epoch's (ignored by workers as stale, so they keep their own idle timeout until a controller speaks)."""
    if current is None:
        return base.FleetHint(idle_grace_s=0.0, at=0.0, retire_instance_ids=retire)
    return base.FleetHint(idle_grace_s=current.idle_grace_s, at=current.at, retire_instance_ids=retire)


def run_rollout(
    scale_set: base.ScaleSet,
    *,
    heartbeats: base.HeartbeatStore,
    image: str,
    max_instances: int,
    heartbeat_timeout_s: float,
) -> dict[str, Any]:
    """Model, then capacity, then hint: a failed write leaves the fleet serving (nothing retires before its
    replacements are asked for)."""
    if not isinstance(scale_set, base.ModelledScaleSet):
        raise errors.ConfigError(
            "scale_set.url", "this scale set's model cannot be replaced", "use a VM scale set"
        )
    if not image.strip():
        raise errors.UserInputError("--image must name an image")
    before = scale_set.model()
    if before != image:
        scale_set.update_model(image)
    capacity = scale_set.get_capacity()
    instances = scale_set.list_instances()
    beats = {hb.instance_id: hb for hb in heartbeats.read_all()}
    plan = plan_rollout(
        image=image,
        instances=instances,
        beats=beats,
        capacity=capacity,
        max_instances=max_instances,
        now=time.time(),
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    if plan.capacity_to != capacity:
        scale_set.set_capacity(plan.capacity_to)
    heartbeats.publish_hint(retire_hint(heartbeats.read_hint(), plan.retire))
    log.info("rollout_started", image=image, retire=len(plan.retire), busy=len(plan.busy), **_capacity(plan))
    return {"image": image, "model_before": before, **asdict(plan)}


def _capacity(plan: RolloutPlan) -> dict[str, int]:
    return {"capacity_from": plan.capacity_from, "capacity_to": plan.capacity_to}


def rollout_cmd(
    image: Annotated[
        str,
        typer.Option("--image", help="The image new instances boot (an image resource id).", show_default=False),
    ],
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
    pool: PoolOpt = None,
) -> None:
    """Move the fleet to a new image; no busy worker is reimaged or deleted.

    Updates the scale set model, raises capacity by the old-model instances (up to controller.max_instances) so
    replacements boot ahead, and tells the old-model workers to retire: idle ones now, busy ones after their job.
    `status` shows the instances per model as it proceeds.
    """
    cfg = wiring.load_settings(config, log_format).for_pool(pool)
    with contextlib.ExitStack() as stack:
        scale_set = wiring.open_scale_set(cfg, config)
        wiring.close_on_exit(stack, scale_set)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        result = run_rollout(
            scale_set,
            heartbeats=heartbeats,
            image=image,
            max_instances=cfg.controller.max_instances,
            heartbeat_timeout_s=cfg.controller.heartbeat_timeout_s,
        )
        out.emit(result, output, _table)  # before closing: the local pool then waits a little for its workers


def _table(data: dict[str, Any]) -> rich.table.Table:
    rows = {
        "image": data["image"],
        "model before": data["model_before"],
        "capacity": f"{data['capacity_from']} -> {data['capacity_to']}"
        + (" (max_instances)" if data["capacity_capped"] else ""),
        "retiring": ", ".join(data["retire"]) or "-",
        "finishing a job first": ", ".join(data["busy"]) or "-",
    }
    return out.kv_table("rollout", rows)
