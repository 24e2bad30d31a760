"""Configure structlog once per process: console lines for people, JSON lines for machines.

Modules get their logger with ``structlog.get_logger(__name__)`` and bind ``job_id`` / ``message_id`` /
``instance_id`` once per job. Secrets are never passed to a logger; :func:`redact` exists for the few
places that print a URL which might carry a SAS token.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_PATTERNS = (re.compile(r"(?i)(sig|SharedAccessKey|AccountKey|SharedAccessSignature|token)=([^;&\s]+)"),)


def redact(text: str) -> str:
    """Mask SAS signatures, account keys and tokens in a string that may carry them."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}=***", text)
    return text


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
    """Set up structlog (and stdlib logging for SDK messages) for this process."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    _configured[:] = [LogConfig("json" if use_json else "console", level)]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=_isatty(out), pad_event_to=28)
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if use_json else "%H:%M:%S", utc=use_json),
    ]
    if use_json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (print() writes the newline separately): worker processes share the controller's
        # stderr in the local pool, and lines under PIPE_BUF then never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # The Azure SDKs log through stdlib logging and can be chatty (and quote URLs): warnings only.
    logging.basicConfig(level=logging.WARNING, stream=out)  # type: ignore[arg-type]
    logging.getLogger("azure").setLevel(logging.WARNING)


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
