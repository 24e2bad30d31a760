"""Commands for trying scalebus out: ``demo`` (the whole system on this machine) and ``simulate`` (policies
replayed against a job trace, no machines at all)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import rich.console
import typer

from scalebus import errors, jobs
from scalebus.cli import fleet, wiring
from scalebus.cli import output as out
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output


def demo_cmd(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo writes its data, queue and results.")
    ] = Path(".demo"),
    samples: Annotated[
        int, typer.Option(help="Samples (one job each, two FASTQ files each).", min=1, max=500)
    ] = 24,
    reads: Annotated[int, typer.Option(help="Reads per FASTQ file.", min=10)] = 18_000,
    max_workers: Annotated[int, typer.Option(help="Upper bound on worker processes.", min=1, max=64)] = 4,
    pools: Annotated[
        int, typer.Option(help="1, or 2: a short-job and a long-job queue, one controller.", min=1, max=2)
    ] = 1,
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

    user = wiring.load_settings(config, log_format)
    console = rich.console.Console(stderr=True)
    console.print(
        f"[bold]scalebus demo[/]: generating {samples} samples × 2 gzipped FASTQ files in {directory}/lake"
    )
    plan = demo.prepare(
        directory, user=user, samples=samples, reads_per_file=reads, max_workers=max_workers, pools=pools
    )
    console.print(f"  {plan.input_files} files, {plan.input_bytes / 1e6:.1f} MB; config {plan.config}")
    cfg = wiring.load_settings(plan.config, log_format)
    with contextlib.ExitStack() as stack:
        queues = {}
        for name, pool_jobs in plan.pools.items():
            pool_cfg = cfg.for_pool(name)
            queue, depth = wiring.open_queue(pool_cfg)
            wiring.close_on_exit(stack, queue, depth)
            jobs.JobProducer(queue, limits=jobs.Limits.from_settings(pool_cfg, cwd=os.getcwd())).submit(pool_jobs)
            queues[name] = queue
        console.print(f"  submitted {len(plan.jobs)} jobs to {', '.join(plan.pools)}; starting the controller")
        started = time.monotonic()
        by_pool = fleet.run_controller(cfg, plan.config)
        summary = demo.summarize(
            plan,
            queues=queues,
            peak_workers={name: stats.peak_instances for name, stats in by_pool.items()},
            wall_s=time.monotonic() - started,
        )
    out.emit(
        asdict(summary) | {"staging_mb_per_s": round(summary.staging_mb_per_s, 1)}, output, out.demo_summary_table
    )
    expected_dead = 1
    if summary.ok != summary.submitted - expected_dead or summary.dead_lettered != expected_dead:
        raise errors.ScalebusError(f"demo incomplete: {summary.ok} ok, {summary.dead_lettered} dead-lettered")


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
    from scalebus.simulator import model
    from scalebus.simulator import report as simulation

    cfg = wiring.load_settings(config, log_format or "console")
    world = model.World(controller=cfg.controller)
    report = simulation.run_simulation(
        trace,
        policies or ["scalebus", "keda", "azure-autoscale", "batch", "oracle"],
        seeds,
        plot,
        world=world,
        max_instances=max_instances,
    )
    out.emit(
        report.to_dict(), output, lambda _d: out.rows_table(f"simulation of {trace}, {seeds} seeds", report.rows())
    )
