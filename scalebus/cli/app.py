"""The composition root: the one module that reads settings, picks backends by URL and wires the parts.

Commands are thin: build the objects a command needs from the settings tree, call into ``controller``,
``worker``, ``selfdestroy`` or ``jobs``, print the result (``-o table`` for people, ``-o json`` for pipelines).
A user mistake (``ConfigError``, ``UserInputError``, a refused job) ends in one line on stderr and exit code 2;
a backend failure in one line and exit code 1. Tracebacks are for bugs only.

The controller, worker, self-destroy and demo modules are imported by the commands that run them, as the Azure
backends are: a one-shot command such as ``scalebus stage`` or ``submit`` pays start-up only for what it uses.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import rich.console
import rich.table
import structlog
import typer

from scalebus import errors, jobs, logs, settings
from scalebus.backends import base
from scalebus.backends.local import folder, pool, sqlite_queue
from scalebus.transfer import staging
from scalebus.worker import secrets as worker_secrets

if TYPE_CHECKING:
    from scalebus.controller import loop as controller_loop
    from scalebus.selfdestroy import routine

log = structlog.get_logger(__name__)


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML settings file. SCALEBUS_<SECTION>__<KEY> variables override it.",
        envvar="SCALEBUS_CONFIG",
        show_default=False,
    ),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for pipelines.")]
LogFormatOpt = Annotated[
    str | None, typer.Option("--log-format", help="console | json (default: console on a terminal, else json).")
]

app = typer.Typer(
    name="scalebus",
    help="Turn a job queue (Azure Service Bus, or SQLite locally) into a self-sizing fleet of worker machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "[controller]" or "<queue>" must print as written
)
controller_app = typer.Typer(help="The controller: sizes the scale set to the queue.", no_args_is_help=True)
worker_app = typer.Typer(help="The worker: runs jobs, then retires its own instance.", no_args_is_help=True)
app.add_typer(controller_app, name="controller")
app.add_typer(worker_app, name="worker")

# ----------------------------------------------------------------------------------------- composition


def load_settings(config: Path | None, log_format: str | None = None) -> settings.Settings:
    loaded = settings.load(config)
    fmt = log_format or loaded.log.format
    if fmt not in ("auto", "console", "json"):
        raise errors.UserInputError(f"--log-format {fmt!r} is not one of console, json")
    logs.configure(fmt=fmt, level=loaded.log.level)  # type: ignore[arg-type]
    return loaded


def open_queue(cfg: settings.Settings) -> tuple[base.JobQueue, base.QueueDepth]:
    scheme = urllib.parse.urlsplit(cfg.queue.url).scheme
    if scheme == "sqlite":
        queue = sqlite_queue.SqliteJobQueue.from_url(
            cfg.queue.url,
            lock_duration_s=cfg.queue.lock_duration_s,
            max_delivery_count=cfg.queue.max_delivery_count,
        )
        return queue, queue
    if scheme == "servicebus":
        from scalebus.backends.azure import servicebus

        return servicebus.open_servicebus(cfg.queue)
    raise errors.ConfigError(
        "queue.url",
        f"unknown scheme {scheme!r}",
        "use sqlite:///path?queue=jobs or servicebus://<namespace>.servicebus.windows.net/<queue>",
    )


def is_local_pool(cfg: settings.Settings) -> bool:
    return cfg.scale_set.url.startswith("local://")


def open_scale_set(cfg: settings.Settings, config_path: Path | None) -> base.ScaleSet:
    if is_local_pool(cfg):
        argv = [sys.executable, "-m", "scalebus", "worker", "run"]
        if config_path is not None:
            argv += ["--config", str(config_path.resolve())]
        return pool.LocalScaleSet(Path(cfg.scale_set.state_path), worker_argv=argv, worker_env={})
    if cfg.scale_set.url.lower().startswith("/subscriptions/"):
        from scalebus.backends.azure import compute, imds

        credential = None
        if cfg.identity.imds_endpoint.rstrip("/") != imds.DEFAULT_IMDS_ENDPOINT:
            credential = imds.managed_identity_credential(imds_endpoint=cfg.identity.imds_endpoint)
        return compute.open_scale_set(cfg.scale_set, credential=credential)
    raise errors.ConfigError(
        "scale_set.url",
        f"{cfg.scale_set.url!r} is neither local:// nor a VM scale set resource id",
        "use local:// or /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/<name>",
    )


def open_heartbeats(cfg: settings.Settings) -> base.HeartbeatStore:
    if is_local_pool(cfg):
        return pool.SqliteHeartbeatStore.open(Path(cfg.scale_set.state_path))
    from scalebus.backends.azure import heartbeats

    return heartbeats.open_heartbeats(cfg.storage, cfg.scale_set)


def open_identity(cfg: settings.Settings) -> base.InstanceIdentity:
    if is_local_pool(cfg):
        return pool.LocalIdentity(os.environ)
    from scalebus.backends.azure import imds

    return imds.ImdsIdentity(cfg.identity.imds_endpoint)


def open_notices(cfg: settings.Settings, identity: base.InstanceInfo | None) -> base.NoticeSource | None:
    """Where a worker learns its instance is being evicted: the pool's notices, or IMDS scheduled events (matched
    on the VM name). ``None`` outside a scale set or with ``worker.eviction_poll_s = 0``."""
    if identity is None or cfg.worker.eviction_poll_s <= 0:
        return None
    if is_local_pool(cfg):
        from scalebus.backends.local import notices

        return notices.SqliteNoticeSource.open(Path(cfg.scale_set.state_path), identity.instance_id)
    from scalebus.backends.azure import scheduled_events

    return scheduled_events.ImdsNoticeSource(
        cfg.identity.imds_endpoint, vm_name=identity.name or identity.instance_id
    )


def open_secrets(cfg: settings.Settings) -> base.SecretSource:
    """``secrets.url``: ``local://<folder>`` or a Key Vault URL (read with the same credential as ARM)."""
    scheme = urllib.parse.urlsplit(cfg.secrets.url).scheme
    if scheme == "local":
        from scalebus.backends.local import secrets as local_secrets

        return local_secrets.FolderSecretSource.from_url(cfg.secrets.url)
    if scheme in ("https", "http"):  # keyvault explains that a vault is https only
        from scalebus.backends.azure import imds, keyvault

        credential = None
        if cfg.identity.imds_endpoint.rstrip("/") != imds.DEFAULT_IMDS_ENDPOINT:
            credential = imds.managed_identity_credential(imds_endpoint=cfg.identity.imds_endpoint)
        return keyvault.open_secret_source(cfg.secrets, credential=credential)
    raise errors.ConfigError(
        "secrets.url",
        f"{cfg.secrets.url!r} is neither local:// nor a Key Vault URL",
        "use local://<folder> (e.g. local://.scalebus/secrets) or https://<vault>.vault.azure.net",
    )


def open_secret_env(cfg: settings.Settings) -> worker_secrets.SecretEnv | None:
    """The analytics' secrets (``worker.secret_env``), or ``None`` when it maps none (no source is opened)."""
    if not cfg.worker.secret_env:
        return None
    return worker_secrets.SecretEnv(open_secrets(cfg), cfg.worker.secret_env, cache_s=cfg.secrets.cache_s)


class StoreResolver:
    """URI → store, one store per (scheme, filesystem@account).

    Picklable (the settings travel, the open stores do not): staging helper processes rebuild their own stores
    from the same settings, so credentials are looked up again in each process, never sent over a pipe.
    """

    def __init__(self, cfg: settings.Settings) -> None:
        self._cfg = cfg
        self._cache: dict[tuple[str, str], base.ObjectStore] = {}
        self._lock = threading.Lock()

    def __call__(self, uri: str) -> base.ObjectStore:
        parts = urllib.parse.urlsplit(uri)
        key = (parts.scheme, parts.netloc)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = _open_store(parts.scheme, uri, self._cfg)
            return self._cache[key]

    def close(self) -> None:
        """Close every store opened so far."""
        with self._lock:
            stores, self._cache = list(self._cache.values()), {}
        for store in stores:
            store.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self._cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])  # type: ignore[misc]


def _open_store(scheme: str, uri: str, cfg: settings.Settings) -> base.ObjectStore:
    if scheme == "file":
        return folder.FolderStore()
    if scheme == "abfss":
        from scalebus.backends.azure import datalake

        return datalake.open_store(uri, cfg.storage)
    raise errors.UserInputError(f"{uri!r}: unsupported scheme {scheme!r}; use file:// or abfss://")


# ----------------------------------------------------------------------------------------- output


def emit(data: Any, output: Output, table: Callable[[Any], rich.table.Table] | None = None) -> None:
    if output is Output.JSON or table is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    rich.console.Console().print(table(data))


def _kv_table(title: str, rows: dict[str, Any]) -> rich.table.Table:
    table = rich.table.Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


@contextmanager
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


# ----------------------------------------------------------------------------------------- commands


@controller_app.command("run")
def controller_run(
    config: ConfigOpt = None, log_format: LogFormatOpt = None, output: OutputOpt = Output.TABLE
) -> None:
    """Watch the queue and size the scale set: observe, decide, apply, every poll_interval_s.

    Scales out in one write per decision; never lowers capacity (idle workers retire themselves); deletes only
    named broken instances. Stops on SIGTERM, or once drained with controller.exit_when_drained.
    """
    cfg = load_settings(config, log_format)
    stats = run_controller(cfg, config)
    if cfg.controller.exit_when_drained:
        emit(
            asdict(stats),
            output,
            lambda d: _kv_table("controller", {k: v for k, v in d.items() if k != "decisions"}),
        )


def run_controller(cfg: settings.Settings, config: Path | None) -> controller_loop.ControllerStats:
    from scalebus.controller import loop as controller_loop

    _, depth = open_queue(cfg)
    controller = controller_loop.Controller(
        depth=depth,
        scale_set=open_scale_set(cfg, config),
        heartbeats=open_heartbeats(cfg),
        settings=cfg.controller,
        protect_busy=cfg.scale_set.protect_busy,
    )
    stop = threading.Event()
    with stop_on_signals(stop.set):
        return controller.run(stop)


@worker_app.command("run")
def worker_run(config: ConfigOpt = None, log_format: LogFormatOpt = None) -> None:
    """Take jobs from the queue until idle for worker.idle_timeout_s, then delete this instance.

    Each job: peek-lock (renewed while it runs), validate, stage inputs, run worker.command, publish outputs
    (committed once, _SUCCESS last), complete. SIGTERM drains: no new work, the running job gets
    worker.drain_timeout_s, then it is abandoned. A Spot eviction notice (worker.eviction_poll_s) abandons a job
    that cannot finish in time at once and exits without self-destroy.
    """
    from scalebus.worker import loop as worker_loop

    cfg = load_settings(config, log_format)
    queue, _ = open_queue(cfg)
    identity = _identity_or_none(cfg)
    instance_id = identity.instance_id if identity else f"manual-{os.getpid()}"
    on_idle = (lambda: _retire(cfg, config)) if identity and cfg.worker.self_destroy else None
    secret_env = open_secret_env(cfg)
    notices = open_notices(cfg, identity)
    resolver = StoreResolver(cfg)
    worker = worker_loop.Worker(
        queue=queue,
        resolve=resolver,
        heartbeats=open_heartbeats(cfg),
        instance_id=instance_id,
        settings=cfg.worker,
        staging_settings=cfg.staging,
        on_idle=on_idle,
        secrets=secret_env,
        notices=notices,
    )
    with stop_on_signals(worker.request_stop):
        worker.run()
    queue.close()
    resolver.close()
    if notices is not None:
        notices.close()
    if secret_env is not None:
        secret_env.close()


def _identity_or_none(cfg: settings.Settings) -> base.InstanceInfo | None:
    try:
        return open_identity(cfg).whoami()
    except errors.IdentityError as exc:
        log.info("worker_not_in_scale_set", detail=str(exc))
        return None


def _retire(cfg: settings.Settings, config: Path | None) -> None:
    result = self_destroy(cfg, config, dry_run=False)
    log.info("worker_retired", outcome=result.outcome.value)


def self_destroy(cfg: settings.Settings, config: Path | None, *, dry_run: bool) -> routine.Result:
    from scalebus.selfdestroy import routine

    scale_set = open_scale_set(cfg, config)
    scale_set_id = pool.pool_url(Path(cfg.scale_set.state_path)) if is_local_pool(cfg) else cfg.scale_set.url
    return routine.self_destroy(
        identity=open_identity(cfg),
        scale_set=scale_set,
        scale_set_id=scale_set_id,
        heartbeats=open_heartbeats(cfg),
        dry_run=dry_run,
        heartbeat_timeout_s=cfg.controller.heartbeat_timeout_s,
    )


@app.command("selfdestroy")
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
    cfg = load_settings(config, log_format)
    result = self_destroy(cfg, config, dry_run=dry_run)
    emit(asdict(result), output, lambda d: _kv_table("selfdestroy", d))


@app.command("submit")
def submit_cmd(
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Jobs as JSON (object or list) or JSON lines (.jsonl).")
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="Job id (also the message id).")] = None,
    inputs: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Input file or folder URI (repeat).")
    ] = None,
    output_uri: Annotated[str | None, typer.Option("--output-uri", help="Folder URI for the outputs.")] = None,
    params: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE for the analytics (repeat).")
    ] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout-s", help="Analytics timeout in seconds.")] = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Validate and enqueue jobs: one from flags, or many from --file.

    Every job is validated before anything is sent; a job a worker could not run (unknown scheme, bad URI,
    over 256 KB, duplicate id) is refused with the reason.
    """
    cfg = load_settings(config, log_format)
    job_list = (
        jobs.read_jobs_file(file) if file else [_job_from_flags(job_id, inputs, output_uri, params, timeout_s)]
    )
    queue, _ = open_queue(cfg)
    try:
        ids = jobs.JobProducer(queue).submit(job_list)
    finally:
        queue.close()
    emit(
        {"queue": queue.name, "submitted": len(ids), "job_ids": ids},
        output,
        lambda d: _kv_table("submitted", {"queue": d["queue"], "jobs": d["submitted"]}),
    )


def _job_from_flags(
    job_id: str | None,
    inputs: list[str] | None,
    output_uri: str | None,
    params: list[str] | None,
    timeout_s: float | None,
) -> jobs.Job:
    if not job_id or not inputs or not output_uri:
        raise errors.UserInputError("give --job-id, --input and --output-uri, or --file with jobs")
    pairs = {}
    for item in params or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise errors.UserInputError(f"--param {item!r} must be NAME=VALUE")
        pairs[name] = value
    raw: dict[str, object] = {"job_id": job_id, "inputs": inputs, "output": output_uri, "params": pairs}
    if timeout_s is not None:
        raw["timeout_s"] = timeout_s
    try:
        return jobs.validate(raw)
    except errors.InvalidJobError as exc:
        raise errors.UserInputError(f"invalid job: {exc.description}") from None


@app.command("status")
def status_cmd(
    config: ConfigOpt = None, log_format: LogFormatOpt = None, output: OutputOpt = Output.TABLE
) -> None:
    """Queue depth (active, in flight, dead-lettered, scheduled, transfer) and instances with their state."""
    cfg = load_settings(config, log_format)
    queue, depth = open_queue(cfg)
    sample = depth.read_depth()
    dead = queue.peek_dead_letters(max_count=20)
    scale_set = open_scale_set(cfg, config)
    beats = {hb.instance_id: hb for hb in open_heartbeats(cfg).read_all()}
    instances = [
        {
            "instance_id": i.instance_id,
            "state": i.state.value,
            "worker": beats[i.instance_id].state.value if i.instance_id in beats else "-",
            "job_id": (beats[i.instance_id].job_id if i.instance_id in beats else None) or "-",
            "age_s": round(time.time() - i.created_at),
        }
        for i in scale_set.list_instances()
    ]
    data = {
        "queue": queue.name,
        "depth": asdict(sample),
        "dead_letters": [
            {"message_id": d.message_id, "reason": d.reason, "description": d.description} for d in dead
        ],
        "instances": instances,
    }
    emit(data, output, _status_table)


def _status_table(data: dict[str, Any]) -> rich.table.Table:
    depth = data["depth"]
    table = rich.table.Table(
        title=f"queue {data['queue']}: {depth['active']} active, "
        f"{depth['in_flight'] if depth['in_flight'] is not None else '?'} in flight, "
        f"{depth['dead_lettered']} dead-lettered, {depth['scheduled']} scheduled, "
        f"{depth['transfer']} transfer"
    )
    for col in ("instance", "state", "worker", "job", "age s"):
        table.add_column(col)
    for inst in data["instances"]:
        table.add_row(inst["instance_id"], inst["state"], inst["worker"], inst["job_id"], str(inst["age_s"]))
    return table


@app.command("requeue")
def requeue_cmd(
    max_count: Annotated[
        int, typer.Option("--max", help="Move at most this many dead letters (run again for more).")
    ] = 1000,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            help="Service Bus: dead letters settled at once, one receiver each (1-32). "
            "The embedded queue moves them all in one transaction.",
        ),
    ] = 8,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Put dead-lettered jobs back on the queue, once their cause is fixed (see them with `status`).

    Each goes back with its body and a fresh delivery count, under the id <job id>+r<sequence number>: Service
    Bus duplicate detection would silently drop a copy that reused the job id. The copy is sent before the dead
    letter is removed, so an interruption can duplicate a job (its committed outputs make the rerun a no-op),
    never lose one.
    """
    if max_count < 1:
        raise errors.UserInputError(f"--max {max_count}: give 1 or more")
    if not 1 <= concurrency <= 32:
        raise errors.UserInputError(f"--concurrency {concurrency}: give 1 to 32")
    cfg = load_settings(config, log_format)
    queue, _ = open_queue(cfg)
    try:
        moved = queue.requeue_dead_letters(max_count=max_count, concurrency=concurrency)
    finally:
        queue.close()
    data = {"queue": queue.name, "requeued": len(moved), "messages": [asdict(m) for m in moved]}
    emit(data, output, _requeue_table)


def _requeue_table(data: dict[str, Any]) -> rich.table.Table:
    table = rich.table.Table(title=f"queue {data['queue']}: {data['requeued']} dead letters requeued")
    table.add_column("dead letter")
    table.add_column("requeued as")
    for moved in data["messages"]:
        table.add_row(moved["message_id"], moved["new_message_id"])
    return table


@app.command("stage")
def stage_cmd(
    src: Annotated[list[str], typer.Argument(help="Source file or folder URIs (file://, abfss://).")],
    dest: Annotated[Path, typer.Argument(help="Local destination folder.")],
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Stage files from the data lake to local disk, as a worker does: parallel, verified, resumable.

    Shows a progress bar on a terminal. Running it again skips files already staged intact. When one process
    is bound by its own CPU (many small files) helper processes join, up to one per core (staging.processes).
    """
    cfg = load_settings(config, log_format)
    if not src:
        raise errors.UserInputError("give at least one source URI")
    dest.mkdir(parents=True, exist_ok=True)
    resolver = StoreResolver(cfg)
    try:
        with staging_progress() as on_progress:
            stats = staging.stage_in(resolver, src, dest, cfg.staging, on_progress=on_progress)
    finally:
        resolver.close()
    emit(stats.as_dict(), output, lambda d: _kv_table("staged", d))


@contextmanager
def staging_progress() -> Iterator[Callable[[staging.Progress], None] | None]:
    from scalebus.cli import progress

    with progress.progress_reporter() as reporter:
        yield reporter


@app.command("ingest")
def ingest_cmd(
    src: Annotated[str, typer.Argument(help="Source: s3://<bucket>/<prefix> (or a file:// or abfss:// folder).")],
    dest: Annotated[str, typer.Argument(help="Destination folder URI (abfss://, file://).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be copied; copy nothing.")] = False,
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (ingest.endpoint_url)."
        ),
    ] = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Copy the objects under SRC that are new or changed since the last run into DEST.

    What was copied is recorded in DEST/_scalebus_ingest.jsonl (key, ETag, size): a rerun, after a crash too,
    copies only what is not recorded, and an object with a new ETag again. Nothing is deleted at DEST. Objects
    whose names could not land safely are refused with the reason (exit 1, after the rest are copied). Shows a
    progress bar on a terminal.
    """
    from scalebus.cli import progress
    from scalebus.ingest import engine

    cfg = load_settings(config, log_format)
    source, close = open_source(src, cfg, endpoint_url=endpoint_url or "")
    try:
        store = StoreResolver(cfg)(dest)
        with progress.progress_reporter(description="ingest") as on_progress:
            stats = engine.ingest(source, src, store, dest, cfg.ingest, dry_run=dry_run, on_progress=on_progress)
    finally:
        close()
    emit(stats.as_dict(), output, _ingest_table)
    if stats.refused:
        first = stats.refused[0]
        raise errors.UnsafePathError(
            f"{len(stats.refused)} object(s) refused, the rest {'checked' if dry_run else 'copied'}; "
            f"first {first['path']!r}: {first['reason']}"
        )


def open_source(
    uri: str, cfg: settings.Settings, *, endpoint_url: str = ""
) -> tuple[base.ObjectSource, Callable[[], None]]:
    """The source ``scalebus ingest`` reads, and how to close it: S3, or any store the resolver knows."""
    if urllib.parse.urlsplit(uri).scheme != "s3":
        return StoreResolver(cfg)(uri), lambda: None
    from scalebus.backends.aws import s3

    s3.S3Uri.parse(uri)
    try:
        source = s3.open_source(cfg.ingest, endpoint_url=endpoint_url)
    except ModuleNotFoundError as exc:  # boto3 is the optional extra ``s3``
        if (exc.name or "").partition(".")[0] not in ("boto3", "botocore"):
            raise
        raise errors.UserInputError(f"s3:// sources need {exc.name}: pip install 'scalebus[s3]'") from None
    return source, source.close


def _ingest_table(data: dict[str, Any]) -> rich.table.Table:
    rows = {k: len(v) if isinstance(v, list) else v for k, v in data.items()}
    return _kv_table("ingest (dry run)" if data["dry_run"] else "ingested", rows)


@app.command("demo")
def demo_cmd(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo writes its data, queue and results.")
    ] = Path(".demo"),
    samples: Annotated[
        int, typer.Option(help="Samples (one job each, two FASTQ files each).", min=1, max=500)
    ] = 24,
    reads: Annotated[int, typer.Option(help="Reads per FASTQ file.", min=10)] = 18_000,
    max_workers: Annotated[int, typer.Option(help="Upper bound on worker processes.", min=1, max=64)] = 4,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Run the whole system on this machine: synthetic FASTQ data, a SQLite queue, worker processes.

    Generates the data set, submits one job per sample (plus one broken job, to show dead-lettering), runs the
    controller until every job is settled and every worker has retired, then prints a summary. Settings from
    --config (your worker.command, say) are kept, except where the demo must place its queue, pool and data.
    """
    from scalebus.demo import demo

    user = load_settings(config, log_format)
    console = rich.console.Console(stderr=True)
    console.print(
        f"[bold]scalebus demo[/]: generating {samples} samples × 2 gzipped FASTQ files in {directory}/lake"
    )
    plan = demo.prepare(directory, user=user, samples=samples, reads_per_file=reads, max_workers=max_workers)
    console.print(f"  {plan.input_files} files, {plan.input_bytes / 1e6:.1f} MB; config {plan.config}")
    cfg = load_settings(plan.config, log_format)
    queue, _ = open_queue(cfg)
    jobs.JobProducer(queue).submit(plan.jobs)
    console.print(f"  submitted {len(plan.jobs)} jobs; starting the controller (Ctrl-C drains)")
    started = time.monotonic()
    stats = run_controller(cfg, plan.config)
    summary = demo.summarize(
        plan, queue=queue, peak_workers=stats.peak_instances, wall_s=time.monotonic() - started
    )
    emit(asdict(summary) | {"staging_mb_per_s": round(summary.staging_mb_per_s, 1)}, output, _summary_table)
    expected_dead = 1
    if summary.ok != summary.submitted - expected_dead or summary.dead_lettered != expected_dead:
        raise errors.ScalebusError(f"demo incomplete: {summary.ok} ok, {summary.dead_lettered} dead-lettered")


def _summary_table(data: dict[str, Any]) -> rich.table.Table:
    rows = {
        "jobs submitted": data["submitted"],
        "jobs ok": data["ok"],
        "jobs failed": data["failed"],
        "jobs dead-lettered": data["dead_lettered"],
        **{f"  dead letter {mid}": reason for mid, reason in data["dead_letter_reasons"].items()},
        "peak workers": data["peak_workers"],
        "wall time": f"{data['wall_s']:.1f} s",
        "bytes staged": f"{data['bytes_staged'] / 1e6:.1f} MB",
        "staging speed (per worker)": f"{data['staging_mb_per_s']} MB/s",
        "results": data["results"],
    }
    return _kv_table("scalebus demo summary", rows)


@app.command("simulate")
def simulate_cmd(
    trace: Annotated[
        str, typer.Option("--trace", help="CSV file (arrival_s,run_s,input_bytes) or builtin:NAME.")
    ] = "builtin:burst500",
    policies: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="scalebus | scalebus-monitor | keda | azure-autoscale | batch | oracle (repeat).",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, max=1000, help="Runs per policy.")] = 30,
    max_instances: Annotated[
        int | None, typer.Option("--max-instances", min=1, help="Fleet cap for all policies (default: trace's).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of depth, capacity and busy instances.")
    ] = None,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Replay a job trace through scaling policies (ours and the KEDA / Azure autoscale / Batch baselines).

    The scalebus policy runs with the [controller] settings of --config (max_instances comes from the trace,
    or from --max-instances).
    """
    from scalebus.simulator import model as simulate

    cfg = load_settings(config, log_format or "console")
    world = simulate.World(controller=cfg.controller)
    report = simulate.run_simulation(
        trace,
        policies or ["scalebus", "keda", "azure-autoscale", "batch", "oracle"],
        seeds,
        plot,
        world=world,
        max_instances=max_instances,
    )
    emit(report.to_dict(), output, lambda _d: _rows_table(f"simulation of {trace}, {seeds} seeds", report.rows()))


def _rows_table(title: str, rows: list[dict[str, Any]]) -> rich.table.Table:
    """One column per policy, one row per metric: fits a terminal however many metrics there are."""
    table = rich.table.Table(title=title)
    table.add_column("metric", style="bold")
    for row in rows:
        table.add_column(str(row.get("policy", "")), justify="right")
    metrics = [key for key in (rows[0] if rows else {}) if key not in ("policy", "trace")]
    for metric in metrics:
        table.add_row(metric, *(str(row[metric]) for row in rows))
    return table


# ----------------------------------------------------------------------------------------- entry point

_USER_ERRORS = (
    errors.ConfigError,
    errors.UserInputError,
    errors.InvalidJobError,
    errors.DuplicateJobError,
    errors.SelfDestroyRefused,
    errors.QueueNotFoundError,
    errors.BucketNotFoundError,
)


def reflow_help(typer_app: typer.Typer) -> None:
    """Join the lines of each paragraph of every command's docstring, so ``--help`` wraps them to the terminal
    (typer keeps single line breaks in all but the first paragraph)."""
    for info in typer_app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            paragraphs = inspect.cleandoc(doc).split("\n\n")
            info.help = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; our errors become one line on stderr (exit 2: your input, exit 1: a backend)."""
    reflow_help(app)
    try:
        app(args=argv)  # standalone: usage errors, --help and exit codes are handled by typer
    except KeyboardInterrupt:
        sys.stderr.write("scalebus: interrupted\n")
        sys.exit(130)
    except _USER_ERRORS as exc:
        sys.stderr.write(f"scalebus: error: {logs.redact(str(exc))}\n")
        sys.exit(2)
    except errors.ScalebusError as exc:
        sys.stderr.write(f"scalebus: error: {type(exc).__name__}: {logs.redact(str(exc))}\n")
        sys.exit(1)
