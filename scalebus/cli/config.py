"""``scalebus config from-deployment``: the deployment's outputs in, a complete scalebus config out.

A pipeline runs ``az deployment group show -g RG -n NAME --query properties.outputs -o json > outputs.json``
and then this command, so no hand-written config sits between deploying ``deploy/azuredeploy.json`` and running
``scalebus``. The template's ``scalebusConfig`` output already has the config's shape (section → key → value);
this command checks it against the settings tree, fills in every default, and writes TOML that
``scalebus.settings.load`` reads back to the same tree (or the tree as JSON). A file that is not a deployment's
outputs is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer

from scalebus import errors, settings

CONFIG_OUTPUT = "scalebusConfig"
"""The template output holding the config object (``deploy/azuredeploy.json``)."""


class ConfigFormat(StrEnum):
    TOML = "toml"
    JSON = "json"


def config_from_outputs(outputs: Any, *, source: str) -> settings.Settings:
    """The settings tree a deployment's outputs describe. Accepts ``properties.outputs`` (each output a
    ``{"type", "value"}`` pair), the whole ``az deployment group show`` answer, or the ``scalebusConfig`` value
    itself; anything else is a ``UserInputError`` naming ``source``."""
    tree = _config_object(outputs, source=source)
    # An Azure fleet stages from the lake only: file:// is refused unless the outputs name local roots.
    given = tree.get("storage")
    storage: dict[str, Any] = given if isinstance(given, dict) else {}
    tree = {**tree, "storage": {"local_roots": [], **storage}}
    try:
        return settings.Settings.model_validate(tree)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise errors.UserInputError(f"{source}: {CONFIG_OUTPUT}.{key}: {first['msg']}") from None


def _config_object(outputs: Any, *, source: str) -> dict[str, Any]:
    if isinstance(outputs, dict) and isinstance(outputs.get("properties"), dict):
        outputs = outputs["properties"].get("outputs")  # the whole `az deployment group show` answer
    if isinstance(outputs, dict) and CONFIG_OUTPUT in outputs:
        entry = outputs[CONFIG_OUTPUT]
        outputs = entry.get("value") if isinstance(entry, dict) and "value" in entry else entry
    if not isinstance(outputs, dict) or not outputs or not all(isinstance(v, dict) for v in outputs.values()):
        outputs = None
    elif all({"type", "value"} <= set(v) for v in outputs.values()):
        outputs = None  # deployment outputs, but not this template's
    if outputs is None:
        raise errors.UserInputError(
            f"{source} holds no {CONFIG_OUTPUT} output: pass the deployment's outputs "
            "(az deployment group show -g RG -n NAME --query properties.outputs -o json)"
        )
    tree: dict[str, Any] = outputs
    return tree


def render(cfg: settings.Settings, fmt: ConfigFormat) -> str:
    """The whole tree as TOML (read back to an equal tree) or JSON."""
    if fmt is ConfigFormat.JSON:
        return json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n"
    text = settings.dump_toml(cfg)
    settings.Settings.model_validate(tomllib.loads(text))  # what we write, `load` reads
    return text


def _read_outputs(path: Path) -> Any:
    try:
        raw = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.UserInputError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.UserInputError(f"cannot read {path} ({exc})") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise errors.UserInputError(f"{path} is not JSON ({exc.args[0]})") from None


def from_deployment_cmd(
    outputs: Annotated[
        Path,
        typer.Argument(
            help="The deployment's outputs as JSON (az deployment group show ... "
            "--query properties.outputs -o json), or - for stdin.",
            show_default=False,
        ),
    ],
    output: Annotated[ConfigFormat, typer.Option("--output", "-o", help="toml (a config file) or json.")] = (
        ConfigFormat.TOML
    ),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of stdout.", show_default=False)
    ] = None,
) -> None:
    """Write a complete scalebus config from a deployment of deploy/azuredeploy.json.

    Every setting is written, the deployment's values over the defaults, so the file documents what runs.
    """
    cfg = config_from_outputs(_read_outputs(outputs), source=str(outputs))
    text = render(cfg, output)
    if out_file is None:
        sys.stdout.write(text)
    else:
        out_file.write_text(text, encoding="utf-8")
