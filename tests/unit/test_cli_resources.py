"""Every command closes what it opens, on success and on error: run in-process on the embedded default.

Python 3.11 reports unclosed files, sockets and child processes as ``ResourceWarning`` but says nothing about an
unclosed ``sqlite3`` connection (3.13 does), and SQLite is what the embedded default holds. So besides turning
``ResourceWarning`` into an error (caught through ``sys.unraisablehook``, where warnings raised in ``__del__``
land), a spy on ``sqlite3.connect`` keeps every connection opened and the test fails on any still open at the
end. ``test_the_leak_check_catches_an_unclosed_queue`` shows the check fails when one close is missing.
"""

from __future__ import annotations

import gc
import json
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scalebus.backends.local import sqlite_queue
from scalebus.cli import app

Leaks = Callable[[], list[str]]


@pytest.fixture
def leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Leaks]:
    """``leaks()``: what was opened while the test ran and is still open (after a ``gc.collect()``)."""
    connections: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        connections.append(conn)
        return conn

    unraisable: list[str] = []
    monkeypatch.setattr(sqlite3, "connect", connect)

    def hook(u: Any) -> None:
        unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}")

    monkeypatch.setattr(sys, "unraisablehook", hook)

    def check() -> list[str]:
        gc.collect()
        still_open = []
        for conn in connections:
            try:
                conn.total_changes  # noqa: B018  (raises once the connection is closed)
            except sqlite3.ProgrammingError:
                continue
            still_open.append(f"sqlite connection {conn!r}")
        return still_open + unraisable

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        yield check
    gc.collect()


def run(*argv: str) -> int:
    """``scalebus ARGV`` in this process; its exit code."""
    try:
        app.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "scalebus.toml"
    path.write_text(
        f'[queue]\nurl = "sqlite:///{tmp_path}/q.db?queue=jobs"\n'
        f'[scale_set]\nstate_path = "{tmp_path}/pool.db"\n'
        "[controller]\nexit_when_drained = true\npoll_interval_s = 0.05\n"
        "[worker]\nidle_timeout_s = 0\nreceive_wait_s = 0.1\nself_destroy = false\n"
        "[staging]\nmin_free_bytes = 0\n"
        "[ingest]\nscratch_min_free_bytes = 0\n"
        f'[storage]\nlocal_roots = ["/lake", "/out", "{tmp_path}"]\n'
    )
    # The queue database exists, as after a first submit: status refuses to invent one.
    sqlite_queue.SqliteJobQueue(tmp_path / "q.db", queue="jobs", lock_duration_s=30, max_delivery_count=5).close()
    return path


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    src = tmp_path / "lake" / "s1"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    return src


def _jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.jsonl"
    job = {"job_id": "j0", "inputs": ["file:///lake/x/"], "output": "file:///out/j0/"}
    path.write_text(json.dumps(job) + "\n")
    return path


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        pytest.param(["status", "-o", "json"], 0, id="status"),
        pytest.param(["requeue", "-o", "json"], 0, id="requeue"),
        pytest.param(["controller", "run", "-o", "json"], 0, id="controller-run"),
        pytest.param(["worker", "run"], 0, id="worker-run"),
        pytest.param(["selfdestroy", "--dry-run"], 2, id="selfdestroy-refused"),
        pytest.param(["submit", "--job-id", "a"], 2, id="submit-refused"),
    ],
)
def test_fleet_and_queue_commands_close_what_they_open(
    config: Path, leaks: Leaks, argv: list[str], code: int
) -> None:
    assert run(*argv, "-c", str(config)) == code
    assert leaks() == []


def test_submit_closes_the_queue(tmp_path: Path, config: Path, leaks: Leaks) -> None:
    assert run("submit", "-c", str(config), "-f", str(_jobs_file(tmp_path)), "-o", "json") == 0
    assert leaks() == []


def test_status_closes_the_queue_when_the_scale_set_cannot_open(
    config: Path, leaks: Leaks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCALEBUS_SCALE_SET__URL", "nowhere://x")
    assert run("status", "-c", str(config)) == 2
    assert leaks() == []


def test_worker_run_closes_what_it_opened_when_its_job_fails(tmp_path: Path, config: Path, leaks: Leaks) -> None:
    assert run("submit", "-c", str(config), "-f", str(_jobs_file(tmp_path)), "-o", "json") == 0
    assert run("worker", "run", "-c", str(config)) == 0  # the input is missing: the job is abandoned, not fatal
    assert leaks() == []


def test_data_commands_close_their_stores(tmp_path: Path, config: Path, lake: Path, leaks: Leaks) -> None:
    assert run("stage", lake.as_uri() + "/", str(tmp_path / "dest"), "-c", str(config), "-o", "json") == 0
    dest = (tmp_path / "ingested").as_uri() + "/"
    assert run("ingest", lake.as_uri() + "/", dest, "-c", str(config), "-o", "json") == 0
    assert (tmp_path / "ingested" / "a.bin").read_bytes() == b"x" * 1000
    assert leaks() == []


@pytest.mark.slow
def test_demo_closes_its_queue_and_pool(tmp_path: Path, leaks: Leaks) -> None:
    argv = ["demo", "--dir", str(tmp_path / "demo"), "--samples", "1", "--reads", "10", "--max-workers", "1"]
    assert run(*argv, "-o", "json") == 0
    assert leaks() == []


def test_simulate_opens_nothing_it_leaves_open(tmp_path: Path, leaks: Leaks) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,run_s,input_bytes\n0,10,0\n5,10,0\n")
    assert run("simulate", "--trace", str(trace), "--policy", "scalebus", "--seeds", "1", "-o", "json") == 0
    assert leaks() == []


def test_the_leak_check_catches_an_unclosed_queue(tmp_path: Path, leaks: Leaks) -> None:
    from scalebus import settings
    from scalebus.cli import wiring

    cfg = settings.Settings(queue=settings.QueueSettings(url=f"sqlite:///{tmp_path}/q.db?queue=jobs"))
    queue, _ = wiring.open_queue(cfg)
    assert len(leaks()) == 1
    queue.close()
    assert leaks() == []


def test_the_leak_check_catches_an_unclosed_file(tmp_path: Path, leaks: Leaks) -> None:
    (tmp_path / "f").write_bytes(b"")
    open(tmp_path / "f", "rb")  # noqa: SIM115  (left open on purpose)
    assert any("ResourceWarning" in leak for leak in leaks())


def test_wiring_imports_neither_typer_nor_the_output_modules() -> None:
    """Staging helper processes import ``wiring`` to unpickle ``StoreResolver``: they must not pay for typer or
    rich's tables and progress bars. (``rich`` itself is imported by structlog when installed, so the check is
    on the parts of rich only our output uses.)"""
    probe = (
        "import sys, pickle; import scalebus.cli.wiring as w; from scalebus import settings; "
        "pickle.loads(pickle.dumps(w.StoreResolver(settings.Settings()))); "
        "print(sorted(m for m in ('typer', 'click', 'rich.progress', 'scalebus.cli.output', "
        "'scalebus.cli.progress', 'scalebus.cli.app', 'scalebus.cli.fleet') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
