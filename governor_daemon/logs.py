"""structlog configuration: JSON lines when stdout is not a TTY, readable console output otherwise (the setup
`tolaria-train` shares, ``tolaria.logs``, plus the daemon's processors)."""

from __future__ import annotations

import logging
import sys

import structlog

from governor_daemon.text import printable
from tolaria import logs as shared


def _escape_strings(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Console logs: strings from the wire cannot forge lines or drive the terminal (JSON escapes itself)."""
    return {k: printable(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for the process, on stdout (``tolaria.logs``). ``log_format`` is auto, json or
    console."""
    use_json = shared.uses_json(log_format)
    shared.configure_structlog(
        sys.stdout,
        use_json,
        level,
        before=[structlog.contextvars.merge_contextvars],
        after=[structlog.processors.format_exc_info, *(() if use_json else (_escape_strings,))],
    )
