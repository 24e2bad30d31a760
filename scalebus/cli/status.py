"""``scalebus status``: what an operator needs to act on, per pool: depth, dead letters, instances, the last
hour's throughput and waits, and the leader.

Each part of each pool is read on its own through the ports :mod:`scalebus.cli.wiring` opens (with the pool's
settings, :meth:`scalebus.settings.Settings.for_pool`), so an identity with only some rights still sees what it
may, and each pool's record says what could not be read. JSON is always ``{"pools": [...], "leader": ...,
"read_at": ...}`` (a list even for one pool, so a pipeline reads one shape), with real nulls, rounded numbers and
ISO timestamps; the table view is :func:`scalebus.cli.output.status_table`.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from scalebus import errors, settings
from scalebus.backends import base
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output

T = TypeVar("T")


DEFAULT_MAX_DEAD_LETTERS = 1000
"""How many dead letters ``status`` reads per pool unless told otherwise: enough to see every reason in a bad
hour, few enough that one call stays quick (ten peeks on Service Bus)."""
HISTORY_WINDOW_S = 3600.0
"""The throughput and waits ``status`` shows are over this last stretch of time."""
NO_HISTORY = "throughput and waits over the last hour: this queue keeps no record of settled jobs"


def status_cmd(
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
    pool: Annotated[
        str | None, typer.Option("--pool", help="Show only this pool (default: every pool of the config).")
    ] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Redraw every --interval seconds until Ctrl-C (-o json: one line each)."),
    ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between redraws with --watch.")] = 2.0,
    max_dead_letters: Annotated[
        int,
        typer.Option(
            "--max-dead-letters", help="Read at most this many dead letters per pool (says when capped)."
        ),
    ] = DEFAULT_MAX_DEAD_LETTERS,
) -> None:
    """Per pool: queue depth (active, in flight, dead-lettered, scheduled, transfer), dead letters, instances,
    and the last hour's completions, dead letters and waits; then the controller holding the lease.

    Each part is read on its own: with only some rights (say, no Manage right for the admin API's counts) the
    others are still shown, and `unavailable` says what could not be read and why. The table view lists dead
    letters by reason; -o json has each one. A queue database that does not exist, or a pool the config does not
    name, is a mistake, not an empty queue. Times are ISO 8601 (UTC), a value nobody could read is null.
    """
    if max_dead_letters < 1:
        raise errors.UserInputError(f"--max-dead-letters {max_dead_letters}: give 1 or more")
    if interval <= 0:
        raise errors.UserInputError(f"--interval {interval:g}: give a number of seconds above 0")
    cfg = wiring.load_settings(config, log_format)
    names = (pool,) if pool is not None else cfg.pool_names()
    pool_cfgs = [(name, cfg.for_pool(name)) for name in names]  # an unknown pool: ConfigError, before opening
    with contextlib.ExitStack() as stack:
        fleet = [_open_pool(stack, name, pool_cfg, config) for name, pool_cfg in pool_cfgs]
        lease = wiring.open_lease(cfg)  # one lease for every pool, as the controllers hold it
        wiring.close_on_exit(stack, lease)

        def read() -> dict[str, Any]:
            return read_fleet(fleet, lease, max_dead_letters=max_dead_letters, now=time.time())

        if watch:
            out.watch(read, output, out.status_table, interval_s=interval)
        else:
            out.emit(read(), output, out.status_table)


@dataclass(frozen=True, slots=True)
class _StatusPorts:
    queue: base.JobQueue
    depth: base.QueueDepth
    scale_set: base.ScaleSet
    heartbeats: base.HeartbeatStore
    history: base.QueueHistory | None = None
    """Where the last hour is read; ``None`` for a queue that keeps no record."""
    pool: str = settings.DEFAULT_POOL


def _open_pool(
    stack: contextlib.ExitStack, name: str, cfg: settings.Settings, config_path: Path | None
) -> _StatusPorts:
    """One pool's ports, each closed when ``stack`` unwinds (a missing queue database raises before any opens)."""
    queue, depth = wiring.open_queue_to_inspect(cfg)
    wiring.close_on_exit(stack, queue, depth)
    history = wiring.open_queue_history(cfg, queue)
    if history is not None and id(history) != id(queue):  # the embedded queue is its own history: closed above
        wiring.close_on_exit(stack, history)
    scale_set = wiring.open_scale_set(cfg, config_path)
    wiring.close_on_exit(stack, scale_set)
    heartbeats = wiring.open_heartbeats(cfg)
    wiring.close_on_exit(stack, heartbeats)
    return _StatusPorts(
        queue=queue, depth=depth, scale_set=scale_set, heartbeats=heartbeats, history=history, pool=name
    )


def read_fleet(
    pools: Sequence[_StatusPorts], lease: base.Lease | None, *, max_dead_letters: int, now: float
) -> dict[str, Any]:
    """The whole status record: each pool's, then the leader from the controllers' one lease (``None`` where
    there is no lease, nobody holds it, or it could not be read, which ``unavailable`` then says)."""
    unavailable: list[str] = []
    leader = _or_denied(lease.holder, "leader", unavailable) if lease is not None else None
    return {
        "pools": [read_status(ports, max_dead_letters=max_dead_letters, now=now) for ports in pools],
        "leader": None if leader is None else _leader_record(leader),
        "read_at": iso(now),
        "unavailable": unavailable,
    }


def read_status(ports: _StatusPorts, *, max_dead_letters: int, now: float) -> dict[str, Any]:
    """One pool's status record, JSON-ready: each part read on its own, ``None`` (and a line in
    ``unavailable``) for a part the identity has no right to read."""
    unavailable: list[str] = []
    sample = _or_denied(ports.depth.read_depth, "depth", unavailable)
    # One more than the cap: whether there were more than the cap, without counting them all.
    dead = _or_denied(
        lambda: ports.queue.peek_dead_letters(max_count=max_dead_letters + 1), "dead letters", unavailable
    )
    beats = {hb.instance_id: hb for hb in _or_denied(ports.heartbeats.read_all, "heartbeats", unavailable) or []}
    listed = _or_denied(ports.scale_set.list_instances, "instances", unavailable)
    history = None
    if ports.history is None:
        unavailable.append(NO_HISTORY)
    else:
        reader = ports.history
        history = _or_denied(lambda: reader.recent(since=now - HISTORY_WINDOW_S), "throughput", unavailable)
        unavailable += [f"throughput: {why}" for why in (history.unavailable if history else ())]
    return {
        "pool": ports.pool,
        "queue": ports.queue.name,
        "read_at": iso(now),
        "depth": None if sample is None else _depth_record(sample),
        "dead_letters": None if dead is None else [_dead_letter_record(d) for d in dead[:max_dead_letters]],
        "dead_letters_capped": None if dead is None else len(dead) > max_dead_letters,
        "max_dead_letters": max_dead_letters,
        "instances": None if listed is None else [_instance_row(i, beats.get(i.instance_id), now) for i in listed],
        "throughput": None if history is None else history_record(history),
        "unavailable": unavailable,
    }


def history_record(history: base.History) -> dict[str, Any]:
    """The last hour as JSON: counts as integers, seconds to a tenth, the window as ISO times."""
    minutes = max((history.until - history.since) / 60.0, 1.0)
    return {
        "since": iso(history.since),
        "until": iso(history.until),
        "source": history.source,
        "completed": history.completed,
        "completed_per_minute": None if history.completed is None else round(history.completed / minutes, 2),
        "dead_lettered": history.dead_lettered,
        "enqueued": history.enqueued,
        "wait_s": {
            "p50": _tenth(history.wait_p50_s),
            "p95": _tenth(history.wait_p95_s),
            "max": _tenth(history.wait_max_s),
        },
        "run_s": {"p50": _tenth(history.run_p50_s), "p95": _tenth(history.run_p95_s)},
        "oldest_waiting_s": _tenth(history.oldest_waiting_s),
        "oldest_includes_locked": history.oldest_includes_locked,
    }


def _tenth(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _leader_record(leader: base.LeaseHolder) -> dict[str, Any]:
    expires_at = None if leader.expires_at is None else iso(leader.expires_at)
    return {"holder": leader.holder, "token": leader.token, "expires_at": expires_at}


def iso(epoch_s: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the second."""
    return datetime.datetime.fromtimestamp(epoch_s, datetime.UTC).isoformat(timespec="seconds")


def _depth_record(sample: base.DepthSample) -> dict[str, Any]:
    return {
        "active": sample.active,
        "in_flight": sample.in_flight,
        "dead_lettered": sample.dead_lettered,
        "scheduled": sample.scheduled,
        "transfer": sample.transfer,
        "sampled_at": iso(sample.sampled_at),
        "source": sample.source or None,
        "active_includes_locked": sample.active_includes_locked,
    }


def _dead_letter_record(dead: base.DeadLetter) -> dict[str, Any]:
    return {
        "message_id": dead.message_id,
        "reason": dead.reason or None,
        "description": dead.description or None,
        "delivery_count": dead.delivery_count,
    }


def _or_denied(read: Callable[[], T], what: str, unavailable: list[str]) -> T | None:
    """``read()``, or ``None`` (noted in ``unavailable``) when the identity lacks the right for it."""
    try:
        return read()
    except errors.AccessDeniedError as exc:
        unavailable.append(f"{what}: {exc}")
        return None


def _instance_row(instance: base.Instance, beat: base.Heartbeat | None, now: float) -> dict[str, Any]:
    return {
        "instance_id": instance.instance_id,
        "state": instance.state.value,
        "worker": beat.state.value if beat else None,
        "job_id": beat.job_id if beat else None,
        "heartbeat_at": iso(beat.at) if beat else None,
        "created_at": iso(instance.created_at),
        "age_s": round(max(now - instance.created_at, 0.0)),
        "model": instance.model or None,
    }
