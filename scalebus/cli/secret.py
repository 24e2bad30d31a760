"""``scalebus secret get``: read a secret the way a worker would, from one vault or from every vault the identity
can list, and say where it was found.

The value is printed only with ``--show`` and then as it is: redaction would mask it (every secret read is
registered with :mod:`scalebus.redact`), and showing it is what was asked. Everything else in the output, vault
URLs and error texts included, goes through redaction as always. The search itself is a plain loop over
``(vault, read)`` so that what it reports does not depend on which backend read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import rich.console
import rich.table
import typer

from scalebus import errors, redact, settings
from scalebus.cli import output as out
from scalebus.cli import wiring
from scalebus.cli.options import ConfigOpt, LogFormatOpt, OutputOpt
from scalebus.cli.output import Output


@dataclass(frozen=True, slots=True)
class Place:
    """Somewhere a secret may be: a vault (or the local secrets folder) and how to name it."""

    url: str
    name: str = ""
    resource_id: str = ""


Read = Callable[[Place, str], str]


def get_cmd(
    name: Annotated[str, typer.Argument(help="The secret's name (letters, digits, '-').")],
    vault: Annotated[
        str | None, typer.Option("--vault", help="Read from this vault only: https://<vault>.vault.azure.net.")
    ] = None,
    all_vaults: Annotated[
        bool,
        typer.Option("--all-vaults", help="Search every vault ARM lists for this identity in the subscription."),
    ] = False,
    subscription: Annotated[
        str | None,
        typer.Option("--subscription", help="Subscription to list vaults in (default: scale_set.url's)."),
    ] = None,
    show: Annotated[
        bool,
        typer.Option(
            "--show",
            help="Print the secret's value. It is printed as it is, NOT redacted (that is what --show is for); "
            "everything else stays redacted. Without --show the value is never printed.",
        ),
    ] = False,
    config: ConfigOpt = None,
    log_format: LogFormatOpt = None,
    output: OutputOpt = Output.TABLE,
) -> None:
    """Read secret NAME: from --vault, from every vault the identity can list (--all-vaults), or else from
    secrets.url (a vault or the local folder), and say where it was found.

    A vault that refuses this identity is listed as refused, not as lacking the secret. Exit 1 when the secret is
    found nowhere. The value is shown only with --show.
    """
    if vault and all_vaults:
        raise errors.UserInputError("give --vault or --all-vaults, not both")
    cfg = wiring.load_settings(config, log_format)
    with contextlib.ExitStack() as stack:
        places, read = _places_and_reader(
            cfg, stack, vault=vault, all_vaults=all_vaults, subscription=subscription
        )
        record, value = find_secret(name, places, read)
    if value is not None:
        redact.register(value)  # masked in anything else this process prints
    verbatim = {"value": value} if show else None
    out.emit(record, output, secret_table, verbatim=verbatim)
    if value is None:
        refused = sum(1 for s in record["searched"] if s["result"] == "refused")
        also = f" ({refused} refused this identity)" if refused else ""
        raise errors.SecretNotFoundError(f"secret {name!r} not found in {len(record['searched'])} place(s){also}")


def _places_and_reader(
    cfg: settings.Settings,
    stack: contextlib.ExitStack,
    *,
    vault: str | None,
    all_vaults: bool,
    subscription: str | None,
) -> tuple[list[Place], Read]:
    if vault or all_vaults or not cfg.secrets.url.startswith("local://"):
        search = wiring.open_vault_search(cfg, subscription=subscription or "")
        stack.callback(search.close)
        if all_vaults:
            listed = search.list_vaults()
            places = [Place(v.url, v.name, v.resource_id) for v in listed]
        else:
            places = [Place(vault or cfg.secrets.url)]
        return places, lambda place, name: str(search.read(place.url, name))
    source = wiring.open_secrets(cfg)
    stack.callback(source.close)
    return [Place(cfg.secrets.url)], lambda _place, name: source.get(name)


def find_secret(name: str, places: Sequence[Place], read: Read) -> tuple[dict[str, Any], str | None]:
    """Look in every place, in order: the record of where it was found and why not elsewhere, and the value
    from the first place that has it (``None`` if none does)."""
    searched: list[dict[str, Any]] = []
    value: str | None = None
    for place in places:
        result, detail, got = _look(place, name, read)
        searched.append({"vault": place.url, "name": place.name or None, "result": result, "detail": detail})
        if got is not None and value is None:
            value = got
    found = [s["vault"] for s in searched if s["result"] == "found"]
    record = {
        "secret": name,
        "found_in": found[0] if found else None,
        "also_in": found[1:],
        "searched": searched,
        "value": None,
    }
    return record, value


def _look(place: Place, name: str, read: Read) -> tuple[str, str | None, str | None]:
    try:
        return "found", None, read(place, name)
    except errors.SecretNotFoundError as exc:
        return "not found", str(exc), None
    except errors.AccessDeniedError as exc:
        return "refused", str(exc), None
    except errors.SecretError as exc:
        return "failed", str(exc), None


def secret_table(data: dict[str, Any]) -> rich.console.RenderableType:
    """Where the secret was found (and its value, when shown), then every place searched."""
    rows: dict[str, Any] = {
        "secret": data["secret"],
        "found in": data["found_in"] or "nowhere",
    }
    if data["also_in"]:
        rows["also in"] = ", ".join(data["also_in"])
    if data.get("value") is not None:
        rows["value"] = data["value"]
    searched = rich.table.Table(title="searched")
    for col in ("vault", "name", "result", "detail"):
        searched.add_column(col)
    for s in data["searched"]:
        searched.add_row(s["vault"], s["name"] or "-", s["result"], s["detail"] or "-")
    return rich.console.Group(out.kv_table("secret", rows), searched)
