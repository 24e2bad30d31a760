"""Commands that run or inspect the fleet: ``controller run``, ``worker run``, ``selfdestroy``, ``status``.

Each opens what it needs through :mod:`scalebus.cli.wiring` in one ``ExitStack``, so every client is closed on
every exit path (a return, an error, Ctrl-C). The controller, worker and self-destroy modules are imported by
the command that runs them: ``status`` pays no start-up for the worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import structlog
import typer

from scalebus import errors, settings
from scalebus.backends import base
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output

if TYPE_CHECKING:
    from scalebus.controller import loop as controller_loop
    from scalebus.selfdestroy import routine

T = TypeVar("T")

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def stop_on_signals(on_stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call ``on_stop`` (a drain), a second SIGINT interrupts for good."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    hits = {"n": 0}

    def handler(signum: int, _frame: object) -> None:
        hits["n"] += 1
        if hits["n"] > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        on_stop()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def controller_run(
    config: ConfigOpt = None, log_format: LogFormatOpt = None, output: OutputOpt = Output.TABLE
) -> None:
    """Watch the queue and size the scale set: observe, decide, apply, every poll_interval_s.

    Scales out in one write per decision; never lowers capacity (idle workers retire themselves); deletes only
    named broken instances. Stops on SIGTERM, or once drained with controller.exit_when_drained.
    """
    cfg = wiring.load_settings(config, log_format)
    stats = run_controller(cfg, config)
    if cfg.controller.exit_when_drained:
        out.emit(
            asdict(stats),
            output,
            lambda d: out.kv_table("controller", {k: v for k, v in d.items() if k != "decisions"}),
        )


def run_controller(cfg: settings.Settings, config: Path | None) -> controller_loop.ControllerStats:
    """Run the controller until SIGTERM (or drained, as configured); its ports are closed however it ends."""
    from scalebus.controller import loop as controller_loop

    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        scale_set = wiring.open_scale_set(cfg, config)
        wiring.close_on_exit(stack, scale_set)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        controller = controller_loop.Controller(
            depth=depth,
            scale_set=scale_set,
            heartbeats=heartbeats,
            settings=cfg.controller,
            protect_busy=cfg.scale_set.protect_busy,
        )
        stop = threading.Event()
        with stop_on_signals(stop.set):
            return controller.run(stop)


def worker_run(config: ConfigOpt = None, log_format: LogFormatOpt = None) -> None:
    """Take jobs from the queue until idle for worker.idle_timeout_s, then delete this instance.

    Each job: peek-lock (renewed while it runs), validate, stage inputs, run worker.command, publish outputs
    (committed once, _SUCCESS last), complete. SIGTERM drains: no new work, the running job gets
    worker.drain_timeout_s, then it is abandoned. A Spot eviction notice (worker.eviction_poll_s) abandons a job
    that cannot finish in time at once and exits without self-destroy.
    """
    from scalebus.worker import loop as worker_loop

    cfg = wiring.load_settings(config, log_format)
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        identity = _identity_or_none(cfg)
        instance_id = identity.instance_id if identity else f"manual-{os.getpid()}"
        on_idle = (lambda: _retire(cfg, config)) if identity and cfg.worker.self_destroy else None
        secret_env = wiring.open_secret_env(cfg)
        wiring.close_on_exit(stack, secret_env)
        notices = wiring.open_notices(cfg, identity)
        wiring.close_on_exit(stack, notices)
        resolver = wiring.StoreResolver(cfg)
        wiring.close_on_exit(stack, resolver)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        worker = worker_loop.Worker(
            worker_loop.WorkerPorts(
                queue=queue, resolve=resolver, heartbeats=heartbeats, secrets=secret_env, notices=notices
            ),
            instance_id=instance_id,
            settings=cfg.worker,
            staging_settings=cfg.staging,
            on_idle=on_idle,
            rules=wiring.job_rules(cfg),
        )
        with stop_on_signals(worker.request_stop):
            worker.run()


def _identity_or_none(cfg: settings.Settings) -> base.InstanceInfo | None:
    identity = wiring.open_identity(cfg)
    try:
        return identity.whoami()
    except errors.IdentityError as exc:
        log.info("worker_not_in_scale_set", detail=str(exc))
        return None
    finally:
        identity.close()


def _retire(cfg: settings.Settings, config: Path | None) -> None:
    result = self_destroy(cfg, config, dry_run=False)
    log.info("worker_retired", outcome=result.outcome.value)


def self_destroy(cfg: settings.Settings, config: Path | None, *, dry_run: bool) -> routine.Result:
    """Delete this instance from its scale set (see :mod:`scalebus.selfdestroy.routine`), closing what it opens."""
    from scalebus.selfdestroy import routine

    with contextlib.ExitStack() as stack:
        scale_set = wiring.open_scale_set(cfg, config)
        wiring.close_on_exit(stack, scale_set)
        identity = wiring.open_identity(cfg)
        wiring.close_on_exit(stack, identity)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        return routine.self_destroy(
            identity=identity,
            scale_set=scale_set,
            scale_set_id=wiring.scale_set_id(cfg),
            heartbeats=heartbeats,
            dry_run=dry_run,
            heartbeat_timeout_s=cfg.controller.heartbeat_timeout_s,
        )


def selfdestroy_cmd(
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Delete this instance (and only this one) from its scale set. Safe to run twice.

    Refuses when not in a scale set, when the instance belongs to another scale set than scale_set.url, or
    while its worker still holds a job. Usable as a container entrypoint or from a systemd unit.
    """
    cfg = wiring.load_settings(config, log_format)
    result = self_destroy(cfg, config, dry_run=dry_run)
    out.emit(asdict(result), output, lambda d: out.kv_table("selfdestroy", d))


def status_cmd(
    config: ConfigOpt = None, log_format: LogFormatOpt = None, output: OutputOpt = Output.TABLE
) -> None:
    """Queue depth (active, in flight, dead-lettered, scheduled, transfer), dead letters and instances.

    Each part is read on its own: with only some rights (say, no Manage right for the admin API's counts) the
    others are still shown, and `unavailable` says what could not be read and why.
    """
    cfg = wiring.load_settings(config, log_format)
    unavailable: list[str] = []
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        sample = _or_denied(lambda: asdict(depth.read_depth()), "depth", unavailable)
        dead = _or_denied(lambda: queue.peek_dead_letters(max_count=20), "dead letters", unavailable) or []
        scale_set = wiring.open_scale_set(cfg, config)
        wiring.close_on_exit(stack, scale_set)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        beats = {hb.instance_id: hb for hb in _or_denied(heartbeats.read_all, "heartbeats", unavailable) or []}
        listed = _or_denied(scale_set.list_instances, "instances", unavailable)
    data = {
        "queue": queue.name,
        "depth": sample,
        "dead_letters": [
            {"message_id": d.message_id, "reason": d.reason, "description": d.description} for d in dead
        ],
        "instances": None if listed is None else [_instance_row(i, beats.get(i.instance_id)) for i in listed],
        "unavailable": unavailable,
    }
    out.emit(data, output, out.status_table)


def _or_denied(read: Callable[[], T], what: str, unavailable: list[str]) -> T | None:
    """``read()``, or ``None`` (noted in ``unavailable``) when the identity lacks the right for it."""
    try:
        return read()
    except errors.AccessDeniedError as exc:
        unavailable.append(f"{what}: {exc}")
        return None


def _instance_row(instance: base.Instance, beat: base.Heartbeat | None) -> dict[str, Any]:
    return {
        "instance_id": instance.instance_id,
        "state": instance.state.value,
        "worker": beat.state.value if beat else "-",
        "job_id": (beat.job_id if beat else None) or "-",
        "age_s": round(time.time() - instance.created_at),
    }
