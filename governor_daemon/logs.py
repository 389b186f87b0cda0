"""structlog configuration: JSON lines when stdout is not a TTY, readable console output otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from governor_daemon.text import printable


def _escape_strings(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Console logs: strings from the wire cannot forge lines or drive the terminal (JSON escapes itself)."""
    return {k: printable(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for the process. ``log_format`` is auto, json or console."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *(() if use_json else (_escape_strings,)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),  # text and newline in one write
        cache_logger_on_first_use=False,
    )
