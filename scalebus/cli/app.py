"""The ``scalebus`` command line: the typer app, its command groups, and how errors end.

Commands live by what they touch: :mod:`~scalebus.cli.fleet` (controller run, worker run, selfdestroy,
status), :mod:`~scalebus.cli.jobs` (submit, requeue), :mod:`~scalebus.cli.data` (stage, ingest) and
:mod:`~scalebus.cli.tools` (demo, simulate), :mod:`~scalebus.cli.rollout` (rollout), :mod:`~scalebus.cli.image`
(image bake), :mod:`~scalebus.cli.config` (config from-deployment) and :mod:`~scalebus.cli.secret` (secret get).
Shell completion comes from typer (``--install-completion``). They are thin: build what they need through
:mod:`~scalebus.cli.wiring`, call into the subsystem, print with :mod:`~scalebus.cli.output` (``-o table`` for
people, ``-o json`` for pipelines).

A user mistake (``ConfigError``, ``UserInputError``, a refused job) ends in one line on stderr and exit code 2;
a backend failure in one line and exit code 1. Tracebacks are for bugs only.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
from typing import Annotated

import typer

from scalebus import errors, logs
from scalebus.cli import config, data, fleet, image, jobs, rollout, secret, status, tools

app = typer.Typer(
    name="scalebus",
    help="Turn a job queue (Azure Service Bus, or SQLite locally) into a self-sizing fleet of worker machines.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: "[controller]" or "<queue>" must print as written
)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"scalebus {importlib.metadata.version('scalebus')}\n")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Turn a job queue (Azure Service Bus, or SQLite locally) into a self-sizing fleet of worker machines."""


controller_app = typer.Typer(help="The controller: sizes the scale set to the queue.", no_args_is_help=True)
worker_app = typer.Typer(help="The worker: runs jobs, then retires its own instance.", no_args_is_help=True)
config_app = typer.Typer(help="Config files for scalebus, from what a deployment made.", no_args_is_help=True)
image_app = typer.Typer(help="Node images: capture a prepared VM for the scale set.", no_args_is_help=True)
secret_app = typer.Typer(help="Secrets as workers read them: find one across Key Vaults.", no_args_is_help=True)
app.add_typer(controller_app, name="controller")
app.add_typer(worker_app, name="worker")
app.add_typer(config_app, name="config")
app.add_typer(image_app, name="image")
app.add_typer(secret_app, name="secret")

# In the order ``scalebus --help`` lists them; the module says which group a command belongs to.
controller_app.command("run")(fleet.controller_run)
worker_app.command("run")(fleet.worker_run)
app.command("selfdestroy")(fleet.selfdestroy_cmd)
app.command("submit")(jobs.submit_cmd)
app.command("status")(status.status_cmd)
app.command("requeue")(jobs.requeue_cmd)
app.command("stage")(data.stage_cmd)
app.command("ingest")(data.ingest_cmd)
app.command("demo")(tools.demo_cmd)
app.command("simulate")(tools.simulate_cmd)
app.command("rollout")(rollout.rollout_cmd)
config_app.command("from-deployment")(config.from_deployment_cmd)
image_app.command("bake")(image.bake_cmd)
secret_app.command("get")(secret.get_cmd)

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
