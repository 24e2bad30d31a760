"""Showing staging progress: a rich bar on a terminal, throttled structlog events otherwise.

While the bar is live, this process's log lines go through the bar's console, which prints them above the bar:
written straight to the terminal they would land inside the bar's line and break it.

Both are ``on_progress`` callbacks for :func:`scalebus.transfer.stage.stage_in` / ``publish``. The engine already
calls them at most every :data:`~scalebus.transfer.kit.PROGRESS_INTERVAL_S`; the log reporter thins that
further so a long staging writes an event every ``interval_s``, not a flood.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from scalebus import logs
from scalebus.transfer import kit

log = structlog.get_logger(__name__)


class LogProgress:
    """Logs ``staging.progress`` events (files, bytes, rate, ETA) at most every ``interval_s`` seconds."""

    def __init__(self, *, interval_s: float = 10.0, what: str = "stage_in") -> None:
        self._interval_s = interval_s
        self._what = what
        self._logged_at: float | None = None

    def __call__(self, progress: kit.Progress) -> None:
        now = time.monotonic()
        done = (
            progress.totals_final
            and progress.files_done == progress.files_total
            and progress.bytes_done == progress.bytes_total
        )
        if not done and self._logged_at is not None and now - self._logged_at < self._interval_s:
            return
        self._logged_at = now
        rate = progress.bytes_done / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        remaining = progress.bytes_total - progress.bytes_done
        log.info(
            "staging.progress",
            what=self._what,
            files_done=progress.files_done,
            files_total=progress.files_total,
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            mb_per_s=round(rate / 1e6, 1),
            eta_s=round(remaining / rate, 1) if rate > 0 else None,
        )


class BarProgress:
    """A rich progress bar: files, bytes, rate, ETA. Use as a context manager around the staging call."""

    def __init__(self, *, console: Console | None = None, description: str = "staging") -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]}"),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._description = description
        self._task: TaskID | None = None
        self._logs = contextlib.ExitStack()

    def __enter__(self) -> BarProgress:
        self._bar.start()
        self._logs.enter_context(logs.diverted(self._print_log))
        return self

    def __exit__(self, *_exc: object) -> None:
        self._logs.close()
        self._bar.stop()

    def _print_log(self, text: str) -> None:
        """One rendered log line (ANSI colours kept), printed above the live bar."""
        self._bar.console.print(Text.from_ansi(text.rstrip("\n")), soft_wrap=True, highlight=False)

    def __call__(self, progress: kit.Progress) -> None:
        listing = "" if progress.totals_final else "+ (listing)"
        files = f"{progress.files_done:,}/{progress.files_total:,}{listing} files"
        if self._task is None:
            self._task = self._bar.add_task(self._description, total=progress.bytes_total, files=files)
        self._bar.update(self._task, completed=progress.bytes_done, total=progress.bytes_total, files=files)


@contextlib.contextmanager
def progress_reporter(
    *, stream: TextIO | None = None, log_interval_s: float = 10.0, description: str = "staging"
) -> Iterator[kit.OnProgress]:
    """A bar when ``stream`` (default stderr) is a terminal, progress log events otherwise."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        with BarProgress(console=Console(file=stream), description=description) as bar:
            yield bar
    else:
        yield LogProgress(interval_s=log_interval_s, what=description)
