"""Who am I → guards → delete me. Safe to run twice; refuses anything but this very instance.

The same routine serves the local pool and Azure: the identity comes from ``base.InstanceIdentity`` (IMDS on a
VM, the pool's variables locally) and the deletion from ``base.ScaleSet``. Guards, each a clear refusal:
not in a scale set; the scale set this instance belongs to is not the configured one; this instance is not in
the scale set's list; its worker still reports a job in hand. An instance already deleting, or already gone,
is success without a second delete. Transient failures are retried until a deadline; after that the caller
exits non-zero so systemd (or the container runtime) can try again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from scalebus import errors
from scalebus.backends import base

log = structlog.get_logger(__name__)


class Outcome(enum.StrEnum):
    DELETED = "deleted"
    ALREADY_DELETING = "already-deleting"
    ALREADY_GONE = "already-gone"
    DRY_RUN = "dry-run"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    instance_id: str
    scale_set: str
    attempts: int


def same_scale_set(a: str, b: str) -> bool:
    """ARM ids compare case-insensitively and without trailing slashes; ``local://`` URLs exactly."""
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def self_destroy(
    *,
    identity: base.InstanceIdentity,
    scale_set: base.ScaleSet,
    scale_set_id: str,
    heartbeats: base.HeartbeatStore | None,
    dry_run: bool = False,
    deadline_s: float = 300.0,
    heartbeat_timeout_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Delete this instance from its scale set, or raise ``SelfDestroyRefused`` / the last ``BackendError``."""
    me = _whoami(identity)
    if scale_set_id and not same_scale_set(me.scale_set, scale_set_id):
        raise errors.SelfDestroyRefused(
            f"this instance belongs to {me.scale_set!r}, not the configured scale set {scale_set_id!r}; "
            "refusing to delete anything"
        )
    _refuse_if_busy(me, heartbeats, heartbeat_timeout_s)
    deadline, attempt = clock() + deadline_s, 0
    while True:
        attempt += 1
        try:
            return _delete_me(me, scale_set, dry_run=dry_run, attempt=attempt)
        except errors.BackendError as exc:
            pause = min(30.0, float(2**attempt), max(0.0, deadline - clock()))
            if not exc.transient or pause <= 0:
                raise
            log.warning("selfdestroy_retrying", error=str(exc), attempt=attempt, pause_s=pause)
            sleep(getattr(exc, "retry_after_s", None) or pause)


def _whoami(identity: base.InstanceIdentity) -> base.InstanceInfo:
    try:
        me = identity.whoami()
    except errors.IdentityError as exc:
        raise errors.SelfDestroyRefused(f"not running in a scale set: {exc}") from exc
    if not me.scale_set or not me.instance_id:
        raise errors.SelfDestroyRefused("not running in a scale set: the instance metadata names none")
    return me


def _refuse_if_busy(me: base.InstanceInfo, heartbeats: base.HeartbeatStore | None, timeout_s: float) -> None:
    if heartbeats is None:
        return
    now = time.time()
    for beat in heartbeats.read_all():
        if (
            beat.instance_id == me.instance_id
            and beat.state is base.WorkerState.BUSY
            and now - beat.at < timeout_s
        ):
            raise errors.SelfDestroyRefused(
                f"instance {me.instance_id} still holds job {beat.job_id}; let the worker settle it first"
            )


def _delete_me(me: base.InstanceInfo, scale_set: base.ScaleSet, *, dry_run: bool, attempt: int) -> Result:
    mine = [i for i in scale_set.list_instances() if i.instance_id == me.instance_id]
    if not mine:
        log.info("selfdestroy_already_gone", instance_id=me.instance_id)
        return Result(Outcome.ALREADY_GONE, me.instance_id, me.scale_set, attempt)
    if mine[0].state is base.InstanceState.DELETING:
        log.info("selfdestroy_already_deleting", instance_id=me.instance_id)
        return Result(Outcome.ALREADY_DELETING, me.instance_id, me.scale_set, attempt)
    if dry_run:
        log.info("selfdestroy_dry_run", instance_id=me.instance_id, scale_set=me.scale_set)
        return Result(Outcome.DRY_RUN, me.instance_id, me.scale_set, attempt)
    scale_set.delete_instances([me.instance_id])
    log.info("selfdestroy_deleted", instance_id=me.instance_id, scale_set=me.scale_set)
    return Result(Outcome.DELETED, me.instance_id, me.scale_set, attempt)
