"""What commands print: JSON for pipelines (``-o json``), a rich table for people (``-o table``).

Each command builds one plain, JSON-ready ``dict``; the table functions here only lay it out, so both outputs
always carry the same facts. Everything printed goes through the one redaction step (``scalebus.redact``) first:
a dead-letter reason or a URI that carries a SAS signature or a registered secret never reaches the terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import rich.console
import rich.table

from scalebus import redact


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


def emit(data: Any, output: Output, table: Callable[[Any], rich.table.Table] | None = None) -> None:
    """Print ``data`` as JSON, or as ``table(data)`` on ``-o table`` (JSON when a command has no table)."""
    if output is Output.JSON or table is None:
        sys.stdout.write(redact.redact(json.dumps(data, indent=2, default=str)) + "\n")
        return
    rich.console.Console().print(table(redact.default.redact_value(data)))


def kv_table(title: str, rows: dict[str, Any]) -> rich.table.Table:
    """Two columns, key and value: for a command's one-record result."""
    table = rich.table.Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def status_table(data: dict[str, Any]) -> rich.table.Table:
    """Instances with their workers; the depth in the title; dead letters and what could not be read below."""
    table = rich.table.Table(title=f"queue {data['queue']}: {_depth_line(data['depth'])}")
    for col in ("instance", "state", "worker", "job", "age s"):
        table.add_column(col)
    for inst in data["instances"] or []:
        table.add_row(inst["instance_id"], inst["state"], inst["worker"], inst["job_id"], str(inst["age_s"]))
    notes = [
        f"dead letter {d['message_id']}: {d['reason']} {d['description'] or ''}".rstrip()
        for d in data["dead_letters"]
    ]
    notes += [f"not shown: {what}" for what in data.get("unavailable", [])]
    if notes:
        table.caption = "\n".join(notes)
    return table


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
