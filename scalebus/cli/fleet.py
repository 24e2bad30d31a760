"""Commands that run the fleet: ``controller run`` (every pool of the config), ``worker run`` and ``selfdestroy``
(one pool: ``--pool``).

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
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt, PoolOpt
from scalebus.cli.output import Output

if TYPE_CHECKING:
    from scalebus.controller import loop as controller_loop
    from scalebus.observability import telemetry
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
    """Watch each pool's queue and size its scale set: observe, decide, apply, every poll_interval_s.

    Scales out in one write per decision; never lowers capacity (idle workers retire themselves); deletes only
    named broken instances. With [[pools]], one controller runs every pool, sharing ARM's write budget. Stops on
    SIGTERM, or once drained with controller.exit_when_drained.
    """
    cfg = wiring.load_settings(config, log_format)
    by_pool = run_controller(cfg, config)
    if all(cfg.for_pool(name).controller.exit_when_drained for name in by_pool):
        data = stats_by_pool(by_pool)
        out.emit(data, output, lambda d: out.kv_table("controller", _flat_stats(d)))


def stats_by_pool(by_pool: dict[str, controller_loop.ControllerStats]) -> dict[str, object]:
    """The controller's stats as ``-o json`` shows them: the one pool's alone, or ``{"pools": {name: ...}}``."""
    if len(by_pool) == 1:
        return asdict(next(iter(by_pool.values())))
    return {"pools": {name: asdict(stats) for name, stats in by_pool.items()}}


def _flat_stats(data: dict[str, object]) -> dict[str, object]:
    pools = data.get("pools")
    if not isinstance(pools, dict):
        return {k: v for k, v in data.items() if k != "decisions"}
    return {f"{name} {k}": v for name, stats in pools.items() for k, v in stats.items() if k != "decisions"}


def run_controller(cfg: settings.Settings, config: Path | None) -> dict[str, controller_loop.ControllerStats]:
    """Run the controller over every pool until SIGTERM (or drained, as configured); each pool's ports are
    closed however it ends. What each pool's controller did, by pool."""
    from scalebus.controller import loop as controller_loop
    from scalebus.observability import telemetry

    with contextlib.ExitStack() as stack:
        report = telemetry.ControllerTelemetry(cfg.metrics)
        wiring.close_on_exit(stack, report)
        several = len(cfg.pools) > 0
        pools = [
            _open_pool(stack, cfg.for_pool(name), config, report.pool(name), name=name, several=several)
            for name in cfg.pool_names()
        ]
        lease = wiring.open_lease(cfg)
        wiring.close_on_exit(stack, lease)
        controller = controller_loop.Controller(
            pools,
            max_writes_per_minute_total=cfg.controller.max_writes_per_minute_total,
            lease=lease,
            holder=wiring.controller_holder(),
        )
        stop = threading.Event()
        with stop_on_signals(stop.set):
            controller.run(stop)
        return controller.pool_stats


def _open_pool(
    stack: contextlib.ExitStack,
    cfg: settings.Settings,
    config: Path | None,
    report: telemetry.PoolTelemetry,
    *,
    name: str,
    several: bool,
) -> controller_loop.Pool:
    """One pool's ports, from its view of the settings (closed when ``stack`` unwinds)."""
    from scalebus.controller import budget
    from scalebus.controller import loop as controller_loop

    queue, depth = wiring.open_queue(cfg)
    wiring.close_on_exit(stack, queue, depth)
    scale_set = wiring.open_scale_set(cfg, config, pool_name=name if several else None)
    wiring.close_on_exit(stack, scale_set)
    heartbeats = wiring.open_heartbeats(cfg)
    wiring.close_on_exit(stack, heartbeats)
    adapter_stats = getattr(scale_set, "stats", None)  # VmssScaleSet.stats: counts the 429s it retried itself
    return controller_loop.Pool(
        name=name,
        depth=depth,
        scale_set=report.metered(scale_set),
        heartbeats=heartbeats,
        settings=cfg.controller,
        protect_busy=cfg.scale_set.protect_busy,
        metrics=report,
        budget_key=budget.budget_key(cfg.scale_set.url),
        throttled_count=(lambda: int(scale_set.stats.throttled)) if adapter_stats is not None else None,  # type: ignore[attr-defined]
    )


def worker_run(config: ConfigOpt = None, pool: PoolOpt = None, log_format: LogFormatOpt = None) -> None:
    """Take jobs from the queue until idle for worker.idle_timeout_s, then delete this instance.

    Each job: peek-lock (renewed while it runs), validate, stage inputs, run worker.command, publish outputs
    (committed once, _SUCCESS last), complete. SIGTERM drains: no new work, the running job gets
    worker.drain_timeout_s, then it is abandoned. A Spot eviction notice (worker.eviction_poll_s) abandons a job
    that cannot finish in time at once and exits without self-destroy. With [[pools]], --pool (or SCALEBUS_POOL)
    names the pool whose queue, worker settings and scale set this instance serves.
    """
    from scalebus.observability import telemetry
    from scalebus.worker import loop as worker_loop

    loaded = wiring.load_settings(config, log_format)
    cfg = loaded.for_pool(pool)
    pool_name = pool or loaded.pool_names()[0]
    structlog.contextvars.bind_contextvars(pool=pool_name)
    redact.register_env(os.environ)  # the worker's own secret-looking variables are masked wherever it prints
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        report = telemetry.WorkerTelemetry(cfg.metrics, pool=pool_name)
        wiring.close_on_exit(stack, report)
        identity = _identity_or_none(cfg)
        instance_id = identity.instance_id if identity else f"manual-{os.getpid()}"
        on_idle = (lambda: _retire(cfg, config, pool)) if identity and cfg.worker.self_destroy else None
        secret_env = wiring.open_secret_env(cfg)
        wiring.close_on_exit(stack, secret_env)
        notices = wiring.open_notices(cfg, identity)
        wiring.close_on_exit(stack, notices)
        rules = wiring.job_rules(cfg)
        resolver = wiring.StoreResolver(cfg, limits=rules.limits)
        wiring.close_on_exit(stack, resolver)
        heartbeats = wiring.open_heartbeats(cfg)
        wiring.close_on_exit(stack, heartbeats)
        cache = wiring.open_input_cache(cfg)
        wiring.close_on_exit(stack, cache)
        worker = worker_loop.Worker(
            worker_loop.WorkerPorts(
                queue=queue,
                resolve=resolver,
                heartbeats=heartbeats,
                secrets=secret_env,
                notices=report.counted(notices),
                cache=cache,
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


def _retire(cfg: settings.Settings, config: Path | None, pool: str | None) -> None:
    result = self_destroy(cfg, config, dry_run=False, pool=pool)
    log.info("worker_retired", outcome=result.outcome.value)


def self_destroy(
    cfg: settings.Settings, config: Path | None, *, dry_run: bool, pool: str | None = None
) -> routine.Result:
    """Delete this instance from its scale set (see :mod:`scalebus.selfdestroy.routine`), closing what it opens.
    ``cfg`` is the pool's view (``Settings.for_pool``); ``pool`` its name when the config has several."""
    from scalebus.selfdestroy import routine

    with contextlib.ExitStack() as stack:
        scale_set = wiring.open_scale_set(cfg, config, pool_name=pool)
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
    pool: PoolOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Delete this instance (and only this one) from its scale set. Safe to run twice.

    Refuses when not in a scale set, when the instance belongs to another scale set than scale_set.url, or
    while its worker still holds a job. Usable as a container entrypoint or from a systemd unit.
    """
    cfg = wiring.load_settings(config, log_format).for_pool(pool)
    result = self_destroy(cfg, config, dry_run=dry_run, pool=pool)
    out.emit(asdict(result), output, lambda d: out.kv_table("selfdestroy", d))
