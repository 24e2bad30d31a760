"""Configure structlog once per process: console lines for people, JSON lines for machines.

Modules get their logger with ``structlog.get_logger(__name__)`` and bind ``job_id`` / ``message_id`` /
``instance_id`` once per job. Secrets should never be passed to a logger, and every line goes through
:mod:`scalebus.redact` anyway: the event and every value (nested ones and rendered exceptions included) before
rendering, and the rendered line after it, so a SAS token in a URL, a connection string in an SDK message or a
registered secret value in an exception text is masked whatever module logs it. Messages printed outside
structlog use :func:`redact`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import structlog

from scalebus import redact as _redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def redact(text: str) -> str:
    """Mask credentials and registered secret values in a message printed outside structlog."""
    return _redact.redact(text)


def redact_event(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """structlog processor: every value of the event (the event text, kwargs, nested containers, the rendered
    exception) redacted. Runs after ``format_exc_info`` so tracebacks are text by then."""
    return {key: _redact.default.redact_value(value) for key, value in event_dict.items()}


def _redacting(renderer: structlog.types.Processor) -> structlog.types.Processor:
    """The renderer, with its line redacted once more (keys, and values a renderer escapes its own way)."""

    def render(logger: object, name: str, event_dict: structlog.types.EventDict) -> str:
        line = renderer(logger, name, event_dict)
        return _redact.redact(line) if isinstance(line, str) else _redact.redact(str(line))

    return render


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How this process logs (format already resolved from ``auto``), for child processes to log the same way."""

    fmt: Literal["console", "json"]
    level: str


_configured: list[LogConfig] = []  # at most one: what configure() last set in this process


def current() -> LogConfig | None:
    """What :func:`configure` set in this process (``None`` if it was never called)."""
    return _configured[-1] if _configured else None


def configure(
    *, fmt: Literal["auto", "console", "json"] = "auto", level: str = "info", stream: object = None
) -> None:
    """Set up structlog, and stdlib logging (the Azure SDKs' warnings) rendered by the same chain, for this
    process: in JSON mode an SDK warning is one JSON line like every other."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    _configured[:] = [LogConfig("json" if use_json else "console", level)]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_isatty(out), pad_event_to=28)
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if use_json else "%H:%M:%S", utc=use_json),
    ]
    # Exceptions are rendered to text here for both formats (the console's pretty tracebacks would bypass
    # redaction, and can show local variables), so redact_event sees every traceback as a string.
    rendering: list[structlog.types.Processor] = [
        structlog.processors.format_exc_info,
        redact_event,
        _redacting(renderer),
    ]
    sink = _Sink(out)
    _sinks[:] = [sink]
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (print() writes the newline separately): worker processes share the controller's
        # stderr in the local pool, and lines under PIPE_BUF then never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _route_stdlib(
        sink,
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        ),
    )


def _route_stdlib(sink: _Sink, formatter: logging.Formatter) -> None:
    """One root handler of ours (replacing the one an earlier call installed) writes stdlib records through
    ``formatter``. The SDKs are chatty and quote URLs: warnings only."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _SinkHandler)]:
        root.removeHandler(handler)
    handler = _SinkHandler(sink)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("azure").setLevel(logging.WARNING)


class _Sink:
    """Where this process's log lines go: the stream, or while a live progress bar holds the terminal, the
    bar's console (:func:`diverted`), which prints them above the bar instead of through it."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.divert: Callable[[str], None] | None = None

    def write(self, text: str) -> None:
        divert = self.divert
        if divert is not None:
            divert(text)
        else:
            self.stream.write(text)  # type: ignore[attr-defined]

    def flush(self) -> None:
        if self.divert is None and hasattr(self.stream, "flush"):
            self.stream.flush()

    def isatty(self) -> bool:
        return _isatty(self.stream)


class _SinkHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler :func:`configure` installs (told apart from pytest's or an application's)."""


_sinks: list[_Sink] = []  # at most one: the sink configure() last set up in this process


@contextlib.contextmanager
def diverted(write: Callable[[str], None]) -> Iterator[None]:
    """Send this process's log lines (structlog's and stdlib's) to ``write`` while the block runs."""
    sink = _sinks[-1] if _sinks else None
    if sink is None:
        yield
        return
    previous, sink.divert = sink.divert, write
    try:
        yield
    finally:
        sink.divert = previous


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
