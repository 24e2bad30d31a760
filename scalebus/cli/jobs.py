"""Commands that put work on the queue: ``submit`` (validated jobs) and ``requeue`` (dead letters, once fixed).

Both validate their input before opening the queue, and close the queue on every exit path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from scalebus import errors, jobs
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt, PoolOpt
from scalebus.cli.output import Output


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
    pool: PoolOpt = None,
) -> None:
    """Validate and enqueue jobs: one from flags, or many from --file.

    Every job is validated before anything is sent; a job a worker could not run (unknown scheme, bad URI,
    over 256 KB, duplicate id) is refused with the reason.
    """
    cfg = wiring.load_settings(config, log_format).for_pool(pool)
    limits = jobs.Limits.from_settings(cfg, cwd=os.getcwd())
    job_list = (
        jobs.read_jobs_file(file, limits=limits)
        if file
        else [_job_from_flags(job_id, inputs, output_uri, params, timeout_s, limits=limits)]
    )
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        ids = jobs.JobProducer(queue, limits=limits).submit(job_list)
    out.emit(
        {"queue": queue.name, "submitted": len(ids), "job_ids": ids},
        output,
        lambda d: out.kv_table("submitted", {"queue": d["queue"], "jobs": d["submitted"]}),
    )


def _job_from_flags(
    job_id: str | None,
    inputs: list[str] | None,
    output_uri: str | None,
    params: list[str] | None,
    timeout_s: float | None,
    *,
    limits: jobs.Limits,
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
        return jobs.validate(raw, limits=limits)
    except errors.InvalidJobError as exc:
        raise errors.UserInputError(f"invalid job: {exc.description}") from None


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
    pool: PoolOpt = None,
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
    cfg = wiring.load_settings(config, log_format).for_pool(pool)
    with contextlib.ExitStack() as stack:
        queue, depth = wiring.open_queue(cfg)
        wiring.close_on_exit(stack, queue, depth)
        moved = queue.requeue_dead_letters(max_count=max_count, concurrency=concurrency)
    data = {"queue": queue.name, "requeued": len(moved), "messages": [asdict(m) for m in moved]}
    out.emit(data, output, out.requeue_table)
