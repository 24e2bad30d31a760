"""What commands print: JSON for pipelines (``-o json``), a rich table for people (``-o table``).

Each command builds one plain, JSON-ready ``dict``; the table functions here only lay it out, so both outputs
always carry the same facts. Everything printed goes through the one redaction step (``scalebus.redact``) first:
a dead-letter reason or a URI that carries a SAS signature or a registered secret never reaches the terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import rich.console
import rich.live
import rich.table
import rich.text

from scalebus import redact


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


Renderer = Callable[[Any], rich.console.RenderableType]
"""Lays out one command's record for people: a table, or several in a group."""


def emit(
    data: Any, output: Output, table: Renderer | None = None, *, verbatim: dict[str, Any] | None = None
) -> None:
    """Print ``data`` as JSON, or as ``table(data)`` on ``-o table`` (JSON when a command has no table).

    ``verbatim`` fields are added after redaction, as they are: only for a value the user asked to see (a
    secret with ``--show``), which redaction would otherwise mask as it masks every registered secret.
    """
    if verbatim is not None:
        shown = {**_redacted(data), **verbatim}
        if output is Output.JSON or table is None:
            sys.stdout.write(json.dumps(shown, indent=2, default=str) + "\n")
        else:
            rich.console.Console().print(table(shown))
        return
    if output is Output.JSON or table is None:
        sys.stdout.write(redact.redact(json.dumps(data, indent=2, default=str)) + "\n")
        return
    rich.console.Console().print(table(redact.default.redact_value(data)))


def _redacted(data: Any) -> dict[str, Any]:
    redacted = redact.default.redact_value(json.loads(json.dumps(data, default=str)))
    assert isinstance(redacted, dict)
    return redacted


def watch(read: Callable[[], Any], output: Output, table: Renderer, *, interval_s: float) -> None:
    """Read and show again every ``interval_s`` until Ctrl-C: the table redrawn in place on a terminal, one
    JSON line per reading on ``-o json`` (so a pipeline can follow it). Ctrl-C ends it normally."""
    try:
        if output is Output.JSON:
            while True:
                sys.stdout.write(redact.redact(json.dumps(read(), default=str)) + "\n")
                sys.stdout.flush()
                time.sleep(interval_s)
        with rich.live.Live(auto_refresh=False, console=rich.console.Console()) as live:
            while True:
                live.update(table(redact.default.redact_value(read())), refresh=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return


def kv_table(title: str, rows: dict[str, Any]) -> rich.table.Table:
    """Two columns, key and value: for a command's one-record result."""
    table = rich.table.Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def status_table(data: dict[str, Any]) -> rich.console.RenderableType:
    """Each pool (:func:`pool_status_table`), then the controller holding the lease and what could not be read
    of it."""
    parts: list[rich.console.RenderableType] = [pool_status_table(pool) for pool in data["pools"]]
    notes = [f"leader: {data['leader']['holder']} (token {data['leader']['token']})"] if data.get("leader") else []
    notes += [f"not shown: {what}" for what in data.get("unavailable", [])]
    if notes:
        parts.append(rich.text.Text("\n".join(notes)))
    return rich.console.Group(*parts)


def pool_status_table(data: dict[str, Any]) -> rich.console.RenderableType:
    """One pool: instances with their workers (the depth in the title), the last hour, dead letters by reason,
    then what could not be read."""
    parts: list[rich.console.RenderableType] = [_instances_table(data)]
    if data.get("throughput"):
        parts.append(rich.text.Text(_throughput_line(data["throughput"])))
    if data.get("dead_letters"):
        parts.append(_dead_letters_table(data))
    notes = _status_notes(data)
    if notes:
        parts.append(rich.text.Text("\n".join(notes)))
    return rich.console.Group(*parts)


def _throughput_line(last: dict[str, Any]) -> str:
    """``last hour: 42 completed (0.7/min), 3 dead-lettered, 45 enqueued; wait p50 1.2 s ...``: a dash for what
    the source cannot tell."""
    per_minute = f" ({last['completed_per_minute']}/min)" if last.get("completed_per_minute") is not None else ""
    wait, run = last["wait_s"], last["run_s"]
    held = " (may be held by a worker)" if last.get("oldest_includes_locked") else ""
    oldest = (
        "nothing waiting"
        if last["oldest_waiting_s"] is None
        else f"oldest waiting {_seconds(last['oldest_waiting_s'])}{held}"
    )
    return (
        f"last hour: {_or_dash(last['completed'])} completed{per_minute}, {_or_dash(last['dead_lettered'])} "
        f"dead-lettered, {_or_dash(last['enqueued'])} enqueued; wait p50 {_seconds(wait['p50'])}, p95 "
        f"{_seconds(wait['p95'])}, max {_seconds(wait['max'])}; run p50 {_seconds(run['p50'])}, p95 "
        f"{_seconds(run['p95'])}; {oldest}"
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g} s"


def _instances_table(data: dict[str, Any]) -> rich.table.Table:
    pool = f"pool {data['pool']}, " if data.get("pool") else ""
    table = rich.table.Table(title=f"{pool}queue {data['queue']}: {_depth_line(data['depth'])}")
    for col in ("instance", "state", "worker", "job", "age s", "model"):
        table.add_column(col)
    if data["instances"] is None:
        table.caption = "instances could not be read"
    for inst in data["instances"] or []:
        table.add_row(
            inst["instance_id"],
            inst["state"],
            _or_dash(inst["worker"]),
            _or_dash(inst["job_id"]),
            str(inst["age_s"]),
            _short_model(inst.get("model") or "-"),
        )
    return table


def _dead_letters_table(data: dict[str, Any]) -> rich.table.Table:
    """One row per reason, most frequent first: how many, an example description, the first message ids."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for dead in data["dead_letters"]:
        by_reason.setdefault(dead["reason"] or "(no reason)", []).append(dead)
    table = rich.table.Table(title=f"dead letters by reason ({_dead_count_line(data)})")
    for col, justify in (("reason", "left"), ("count", "right"), ("description", "left"), ("messages", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        ids = ", ".join(d["message_id"] for d in group[:3]) + (", …" if len(group) > 3 else "")
        table.add_row(reason, str(len(group)), _or_dash(group[0]["description"]), ids)
    return table


def _dead_count_line(data: dict[str, Any]) -> str:
    read = len(data["dead_letters"])
    total = (data.get("depth") or {}).get("dead_lettered")
    if data.get("dead_letters_capped"):
        of = f" of {total}" if total is not None else ""
        return f"the first {read}{of}, capped by --max-dead-letters {data['max_dead_letters']}"
    if total is not None and total > read:
        return f"{read} of {total} read"
    return f"{read}"


def _status_notes(data: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    models: dict[str, int] = {}
    for inst in data["instances"] or []:
        models[inst.get("model") or "-"] = models.get(inst.get("model") or "-", 0) + 1
    if len(models) > 1:  # a rollout in progress: how far it has come
        notes += [f"model {_short_model(m)}: {n} instances" for m, n in sorted(models.items())]
    return notes + [f"not shown: {what}" for what in data.get("unavailable", [])]


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _short_model(model: str) -> str:
    """A gallery image version as ``<image>/<version>``, a managed image as its name: the part that differs
    between two models of one fleet (``-o json`` has the whole id)."""
    parts = model.split("/")
    if len(parts) > 4 and parts[-2].lower() == "versions":
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1] if model.startswith("/") else model


def _depth_line(depth: dict[str, Any] | None) -> str:
    if depth is None:
        return "depth unavailable"
    in_flight = depth["in_flight"] if depth["in_flight"] is not None else "?"
    return (
        f"{depth['active']} active, {in_flight} in flight, {depth['dead_lettered']} dead-lettered, "
        f"{depth['scheduled']} scheduled, {depth['transfer']} transfer"
    )


def requeue_table(data: dict[str, Any]) -> rich.table.Table:
    table = rich.table.Table(title=f"queue {data['queue']}: {data['requeued']} dead letters requeued")
    table.add_column("dead letter")
    table.add_column("requeued as")
    for moved in data["messages"]:
        table.add_row(moved["message_id"], moved["new_message_id"])
    return table


def ingest_table(data: dict[str, Any]) -> rich.table.Table:
    rows = {k: len(v) if isinstance(v, list) else v for k, v in data.items()}
    return kv_table("ingest (dry run)" if data["dry_run"] else "ingested", rows)


def demo_summary_table(data: dict[str, Any]) -> rich.table.Table:
    rows = {
        "jobs submitted": data["submitted"],
        "jobs ok": data["ok"],
        "jobs failed": data["failed"],
        "jobs dead-lettered": data["dead_lettered"],
        **{f"  dead letter {mid}": reason for mid, reason in data["dead_letter_reasons"].items()},
        "peak workers": data["peak_workers"],
        **{
            f"  pool {name}": f"{p['ok']} of {p['submitted']} ok, {p['dead_lettered']} dead-lettered, "
            f"peak {p['peak_workers']} workers"
            for name, p in data.get("pools", {}).items()
            if len(data.get("pools", {})) > 1
        },
        "wall time": f"{data['wall_s']:.1f} s",
        "bytes staged": f"{data['bytes_staged'] / 1e6:.1f} MB",
        "staging speed (per worker)": f"{data['staging_mb_per_s']} MB/s",
        "results": data["results"],
    }
    return kv_table("scalebus demo summary", rows)


def rows_table(title: str, rows: list[dict[str, Any]]) -> rich.table.Table:
    """One column per policy, one row per metric: fits a terminal however many metrics there are."""
    table = rich.table.Table(title=title)
    table.add_column("metric", style="bold")
    for row in rows:
        table.add_column(str(row.get("policy", "")), justify="right")
    metrics = [key for key in (rows[0] if rows else {}) if key not in ("policy", "trace")]
    for metric in metrics:
        table.add_row(metric, *(str(row[metric]) for row in rows))
    return table
