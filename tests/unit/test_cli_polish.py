"""The command line's rough edges: shell completion, SDK warnings as JSON lines, log lines above a live progress
bar, and a settings mistake that names the variable it came from."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import rich.console
import structlog
import structlog.testing

from scalebus import errors, logs, settings
from scalebus.cli import progress
from scalebus.transfer import kit

SCALEBUS = Path(sys.executable).with_name("scalebus")


@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(logging.root, "handlers", [])  # pytest's capture handler is not ours to replace
    yield
    structlog.reset_defaults()


def test_the_shell_completion_script_and_its_answers() -> None:
    # What `--show-completion` prints, asked for by name: the flag itself detects the shell from the parent
    # process, which under CI's `sh` and `make` is no interactive shell.
    source = {**os.environ, "_SCALEBUS_COMPLETE": "source_bash"}
    script = subprocess.run([str(SCALEBUS)], capture_output=True, text=True, env=source, check=True, timeout=60)
    assert "complete -o default -F _scalebus_completion scalebus" in script.stdout
    env = {**os.environ, "_SCALEBUS_COMPLETE": "complete_bash", "COMP_WORDS": "scalebus sta", "COMP_CWORD": "1"}
    answers = subprocess.run([str(SCALEBUS)], capture_output=True, text=True, env=env, check=True, timeout=60)
    assert set(answers.stdout.split()) == {"status", "stage"}


def test_sdk_warnings_are_json_lines_in_json_mode(fresh_logging: None) -> None:
    buffer = io.StringIO()
    logs.configure(fmt="json", stream=buffer)
    logging.getLogger("azure.core.pipeline.policies").warning("retrying %s", "https://h/c?sp=r&sig=SIG")
    logging.getLogger("azure.identity").info("chatty, below the threshold")
    line = json.loads(buffer.getvalue())  # one line, and it is JSON
    assert line["level"] == "warning" and line["logger"] == "azure.core.pipeline.policies"
    assert line["event"] == "retrying https://h/c?sp=r&sig=***"
    assert "timestamp" in line


def test_configuring_twice_leaves_one_handler_of_ours(fresh_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure(fmt="json", stream=first)
    logs.configure(fmt="json", stream=second)
    logging.getLogger("azure").warning("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1


def test_log_lines_print_above_a_live_bar(fresh_logging: None) -> None:
    stream = io.StringIO()
    logs.configure(fmt="console", stream=stream)
    screen = io.StringIO()
    bar_console = rich.console.Console(file=screen, force_terminal=True, width=100)
    log = structlog.get_logger("test")
    with progress.BarProgress(console=bar_console) as bar:
        bar(kit.Progress(files_done=1, files_total=4, bytes_done=10, bytes_total=40, elapsed_s=1.0))
        log.warning("disk_nearly_full", free_gb=3)
        logging.getLogger("azure.storage").warning("slow response")
    log.info("after_the_bar")
    assert "disk_nearly_full" in screen.getvalue() and "slow response" in screen.getvalue()
    assert "disk_nearly_full" not in stream.getvalue(), "nothing written past the bar's console"
    assert "after_the_bar" in stream.getvalue(), "once the bar is gone, lines go to the stream again"


@pytest.mark.parametrize(
    ("environ", "toml", "expected"),
    [
        pytest.param(
            {"SCALEBUS_WORKER__IDLE_TIMEOUT": "3"},
            "",
            "config worker.idle_timeout: unknown setting (from the environment variable "
            "SCALEBUS_WORKER__IDLE_TIMEOUT) — unset it or check its spelling",
            id="unknown-key",
        ),
        pytest.param(
            {"SCALEBUS_WORKR__IDLE_TIMEOUT_S": "3"},
            "",
            "config workr: unknown setting (from the environment variable SCALEBUS_WORKR__IDLE_TIMEOUT_S) — "
            "unset it or check its spelling",
            id="unknown-section",
        ),
        pytest.param(
            {},
            "[worker]\nidle_timeout = 3\n",
            "config worker.idle_timeout: unknown setting — remove it from {path} or check its spelling",
            id="unknown-in-file",
        ),
        pytest.param(
            {"SCALEBUS_QUEUE__LOCK_DURATION_S": "soon"},
            "",
            "(from the environment variable SCALEBUS_QUEUE__LOCK_DURATION_S) — set a valid value",
            id="bad-value",
        ),
    ],
)
def test_a_settings_mistake_names_where_it_was_made(
    tmp_path: Path, environ: dict[str, str], toml: str, expected: str
) -> None:
    path = tmp_path / "scalebus.toml"
    path.write_text(toml)
    with pytest.raises(errors.ConfigError) as caught:
        settings.load(path, environ=environ)
    assert expected.format(path=path) in str(caught.value)


def test_log_progress_does_not_call_a_staging_done_while_its_listing_goes_on() -> None:
    reporter = progress.LogProgress(interval_s=3600)
    with structlog.testing.capture_logs() as events:
        reporter(kit.Progress(1, 1, 10, 10, 0.1, totals_final=False))  # first event: always logged
        reporter(kit.Progress(2, 2, 20, 20, 0.2, totals_final=False))  # equal but still listing: throttled
        reporter(kit.Progress(3, 3, 30, 30, 0.3))  # final totals, all done: logged
    assert [e["files_done"] for e in events] == [1, 3]
