"""The options every command shares (``--config``, ``--log-format``, ``--output``), declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scalebus.cli.output import Output

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
PoolOpt = Annotated[
    str | None,
    typer.Option(
        "--pool",
        envvar="SCALEBUS_POOL",
        help="Which of the config's [[pools]] this command is for (needed when there are several).",
        show_default=False,
    ),
]
