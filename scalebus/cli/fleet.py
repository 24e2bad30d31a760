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
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import structlog
import typer

from scalebus import errors, redact, settings
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
    from scalebus.observability import telemetry

    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        scale_set = wiring.open_scale_set(cfg, config)
        wiring.close_on_exit(stack, scale_set)
        report = telemetry.ControllerTelemetry(cfg.metrics)
        wiring.close_on_exit(stack, report)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        lease = wiring.open_lease(cfg)
        wiring.close_on_exit(stack, lease)
        controller = controller_loop.Controller(
            depth=depth,
            scale_set=report.metered(scale_set),
            heartbeats=heartbeats,
            settings=cfg.controller,
            protect_busy=cfg.scale_set.protect_busy,
            metrics=report,
            lease=lease,
            holder=wiring.controller_holder(),
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
    from scalebus.observability import telemetry
    from scalebus.worker import loop as worker_loop

    cfg = wiring.load_settings(config, log_format)
    redact.register_env(os.environ)  # the worker's own secret-looking variables are masked wherever it prints
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        report = telemetry.WorkerTelemetry(cfg.metrics)
        wiring.close_on_exit(stack, report)
        identity = _identity_or_none(cfg)
        instance_id = identity.instance_id if identity else f"manual-{os.getpid()}"
        on_idle = (lambda: _retire(cfg, config)) if identity and cfg.worker.self_destroy else None
        secret_env = wiring.open_secret_env(cfg)
        wiring.close_on_exit(stack, secret_env)
        notices = wiring.open_notices(cfg, identity)
        wiring.close_on_exit(stack, notices)
        rules = wiring.job_rules(cfg)
        resolver = wiring.StoreResolver(cfg, limits=rules.limits)
        wiring.close_on_exit(stack, resolver)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        worker = worker_loop.Worker(
            worker_loop.WorkerPorts(
                queue=queue,
                resolve=resolver,
                heartbeats=heartbeats,
                secrets=secret_env,
                notices=report.counted(notices),
            ),
            instance_id=instance_id,
            settings=cfg.worker,
            staging_settings=cfg.staging,
            on_idle=on_idle,
            rules=rules,
            metrics=report,
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
