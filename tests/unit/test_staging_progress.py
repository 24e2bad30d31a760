"""Progress reporting: throttled log events off a terminal, a bar on one."""

from __future__ import annotations

import io

from structlog.testing import capture_logs

from scalebus.cli import progress
from scalebus.transfer.kit import Progress


def test_log_progress_is_throttled_but_always_reports_the_end() -> None:
    reporter = progress.LogProgress(interval_s=3600)
    with capture_logs() as logs:
        reporter(Progress(1, 4, 1_000_000, 4_000_000, 1.0))
        reporter(Progress(2, 4, 2_000_000, 4_000_000, 2.0))  # within the interval: dropped
        reporter(Progress(4, 4, 4_000_000, 4_000_000, 4.0))  # the end: always logged
    assert [(e["event"], e["files_done"], e["bytes_done"]) for e in logs] == [
        ("staging.progress", 1, 1_000_000),
        ("staging.progress", 4, 4_000_000),
    ]
    assert (logs[0]["mb_per_s"], logs[0]["eta_s"]) == (1.0, 3.0)


def test_reporter_logs_when_not_a_terminal() -> None:
    with progress.progress_reporter(stream=io.StringIO()) as on_progress:
        assert isinstance(on_progress, progress.LogProgress)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reporter_draws_a_bar_on_a_terminal() -> None:
    stream = _Tty()
    with progress.progress_reporter(stream=stream) as on_progress:
        assert isinstance(on_progress, progress.BarProgress)
        on_progress(Progress(1, 2, 1_000_000, 2_000_000, 1.0))
        on_progress(Progress(2, 2, 2_000_000, 2_000_000, 2.0))
    assert "2/2 files" in stream.getvalue()
