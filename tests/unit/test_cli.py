"""The CLI as a user meets it: real ``scalebus`` processes, one-line errors, ``-o json`` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalebus.backends import base
from scalebus.backends.local import sqlite_queue


def scalebus(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalebus", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "scalebus.toml"
    path.write_text(
        f'[queue]\nurl = "sqlite:///{tmp_path}/q.db?queue=jobs"\n[scale_set]\nstate_path = "{tmp_path}/pool.db"\n'
        '[storage]\nlocal_roots = ["/lake", "/out"]\n'
    )
    return path


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(
            ["status", "--config", "missing.toml"], {}, "missing.toml does not exist", id="missing-config"
        ),
        pytest.param(
            ["status"], {"SCALEBUS_CONTROLLER__MAX_INSTANCES": "zero"}, "controller.max_instances", id="bad-env"
        ),
        pytest.param(
            ["status"], {"SCALEBUS_QUEUE__URL": "redis://x"}, "queue.url: unknown scheme", id="bad-queue-url"
        ),
        pytest.param(["submit", "--file", "nope.jsonl"], {}, "cannot read nope.jsonl", id="unreadable-file"),
        pytest.param(
            ["submit", "--job-id", "a"], {}, "give --job-id, --input and --output-uri", id="missing-flags"
        ),
        pytest.param(
            ["submit", "--job-id", "a", "-i", "s3://b/k", "--output-uri", "file:///o/"],
            {},
            "scheme",
            id="bad-scheme",
        ),
        pytest.param(["selfdestroy"], {}, "not running in a scale set", id="selfdestroy-outside-pool"),
        pytest.param(["requeue", "--max", "0"], {}, "--max 0: give 1 or more", id="requeue-max-zero"),
        pytest.param(["requeue", "--concurrency", "99"], {}, "give 1 to 32", id="requeue-concurrency"),
        pytest.param(["status"], {}, "q.db does not exist", id="status-without-queue-database"),
        pytest.param(["status", "--max-dead-letters", "0"], {}, "give 1 or more", id="status-max-dead-letters"),
        pytest.param(
            ["stage", "file:///nonexistent/run1/", "out"], {}, "no such file or folder", id="stage-missing-source"
        ),
    ],
)
def test_user_mistakes_are_one_line(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    result = scalebus(
        *args,
        cwd=tmp_path,
        env={
            "SCALEBUS_QUEUE__URL": f"sqlite:///{tmp_path}/q.db?queue=jobs",
            "SCALEBUS_SCALE_SET__STATE_PATH": f"{tmp_path}/pool.db",
            **env,
        },
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalebus: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_submit_then_status_as_json(tmp_path: Path, config: Path) -> None:
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(
        "\n".join(
            json.dumps({"job_id": f"j{i}", "inputs": ["file:///lake/x/"], "output": f"file:///out/j{i}/"})
            for i in range(3)
        )
    )
    submitted = scalebus("submit", "-c", str(config), "-f", str(jobs_file), "-o", "json", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["job_ids"] == ["j0", "j1", "j2"]
    again = scalebus(
        "submit",
        "-c",
        str(config),
        "--job-id",
        "j1",
        "-i",
        "file:///lake/x/",
        "--output-uri",
        "file:///out/j1/",
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "j1 is already in queue" in again.stderr
    status = scalebus("status", "-c", str(config), "-o", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    (data,) = json.loads(status.stdout)["pools"]
    assert (data["depth"]["active"], data["depth"]["in_flight"], data["instances"]) == (3, 0, [])


def test_help_explains_commands(tmp_path: Path) -> None:
    result = scalebus("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in (
        "demo",
        "controller",
        "worker",
        "selfdestroy",
        "submit",
        "status",
        "requeue",
        "stage",
        "simulate",
    ):
        assert command in result.stdout


def test_help_prints_text_as_written_and_reflows_paragraphs(tmp_path: Path) -> None:
    simulate = scalebus("simulate", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert "runs with the [controller] settings of --config" in simulate.stdout
    assert "(max_instances comes from the trace, or from --max-instances)" in simulate.stdout
    ingest = scalebus("ingest", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert "s3://<bucket>/<prefix>" in ingest.stdout


def test_stage_command_copies_and_reports_json(tmp_path: Path) -> None:
    src = tmp_path / "lake" / "s1"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    result = scalebus(
        "stage",
        src.as_uri() + "/",
        str(tmp_path / "dest"),
        "-o",
        "json",
        cwd=tmp_path,
        env={"SCALEBUS_STAGING__MIN_FREE_BYTES": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == 1000
    assert (tmp_path / "dest" / "s1" / "a.bin").read_bytes() == b"x" * 1000


def test_stage_command_spreads_over_helper_processes_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "lake" / "many"
    src.mkdir(parents=True)
    for i in range(200):
        (src / f"f{i:03d}.idx").write_bytes(bytes([i]) * (i + 1))
    env = {"SCALEBUS_STAGING__MIN_FREE_BYTES": "0", "SCALEBUS_STAGING__PROCESSES": "2"}
    result = scalebus("stage", src.as_uri(), str(tmp_path / "dest"), "-o", "json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["files"], stats["processes"]) == (200, 2)
    staged = tmp_path / "dest" / "many"
    assert all((staged / f"f{i:03d}.idx").read_bytes() == bytes([i]) * (i + 1) for i in range(200))


def test_requeue_puts_dead_letters_back_as_json(tmp_path: Path, config: Path) -> None:
    queue = sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5)
    try:
        queue.send([base.OutgoingMessage(message_id=f"j{i}", body=f'{{"n": {i}}}'.encode()) for i in range(3)])
        for _ in range(3):
            got = queue.receive(max_wait_s=1)
            assert got is not None
            queue.dead_letter(got, reason="SchemaViolation", description="fixed since")
    finally:
        queue.close()

    first = scalebus("requeue", "-c", str(config), "--max", "2", "-o", "json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert (data["queue"], data["requeued"]) == ("jobs", 2)
    assert [m["message_id"] for m in data["messages"]] == ["j0", "j1"]
    assert all(m["new_message_id"].startswith(m["message_id"] + "+r") for m in data["messages"])
    rest = scalebus("requeue", "-c", str(config), "--concurrency", "1", cwd=tmp_path)  # the table, for people
    assert rest.returncode == 0, rest.stderr
    assert "requeued as" in rest.stdout and "j2+r" in rest.stdout
    (status,) = json.loads(scalebus("status", "-c", str(config), "-o", "json", cwd=tmp_path).stdout)["pools"]
    assert (status["depth"]["active"], status["depth"]["dead_lettered"], status["dead_letters"]) == (3, 0, [])
    help_text = scalebus("requeue", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "--concurrency" in help_text.stdout and "duplicate" in help_text.stdout


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    import importlib.metadata

    result = scalebus("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"scalebus {importlib.metadata.version('scalebus')}"
