"""Commands that move data: ``stage`` (lake → local disk, as a worker stages) and ``ingest`` (S3 → lake).

Both show a progress bar on a terminal and close every store they opened on every exit path.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from scalebus import errors
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output


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
    from scalebus.cli import progress
    from scalebus.transfer import stage

    cfg = wiring.load_settings(config, log_format)
    if not src:
        raise errors.UserInputError("give at least one source URI")
    with contextlib.ExitStack() as stack:
        resolver = wiring.StoreResolver(cfg)
        wiring.close_on_exit(stack, resolver)
        _require_sources(resolver, src)  # before anything is created at dest (staging creates it)
        on_progress = stack.enter_context(progress.progress_reporter())
        stats = stage.stage_in(resolver, src, dest, cfg.staging, on_progress=on_progress)
    out.emit(stats.as_dict(), output, lambda d: out.kv_table("staged", d))


def _require_sources(resolver: wiring.StoreResolver, src: list[str]) -> None:
    """A source with nothing at it is the caller's mistake (exit 2), told before any file is staged; a file
    that vanishes while staging runs stays a storage failure."""
    for uri in src:
        try:
            next(iter(resolver(uri).list_files(uri)), None)
        except errors.ObjectNotFoundError:
            raise errors.UserInputError(f"{uri!r}: no such file or folder") from None


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

    cfg = wiring.load_settings(config, log_format)
    with contextlib.ExitStack() as stack:
        resolver = wiring.StoreResolver(cfg)
        wiring.close_on_exit(stack, resolver)
        source = wiring.open_source(src, cfg, resolver=resolver, endpoint_url=endpoint_url or "")
        wiring.close_on_exit(stack, source)
        store = resolver(dest)
        on_progress = stack.enter_context(progress.progress_reporter(description="ingest"))
        stats = engine.ingest(source, src, store, dest, cfg.ingest, dry_run=dry_run, on_progress=on_progress)
    out.emit(stats.as_dict(), output, out.ingest_table)
    if stats.refused:
        first = stats.refused[0]
        raise errors.UnsafePathError(
            f"{len(stats.refused)} object(s) refused, the rest {'checked' if dry_run else 'copied'}; "
            f"first {first['path']!r}: {first['reason']}"
        )
