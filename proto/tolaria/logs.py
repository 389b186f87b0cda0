"""The structlog setup both CLIs share (``governor_daemon.logs``, ``tolaria_trainer.logs``): what
``--log-format`` means, the two renderers, and a logger that writes each line in one write.

One write per line (the text and its newline together): processes that share a pipe (torchrun's ranks on
one stderr) keep a write of up to 4 KiB whole, so their lines never interleave; ``print`` writes the newline
separately, and two processes' events could share one line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import structlog


def uses_json(fmt: str) -> bool:
    """Whether ``--log-format fmt`` means JSON lines (``auto``: when stdout is not a TTY)."""
    return fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())


def stamp() -> list[structlog.types.Processor]:
    """The processors that give every event its level and an ISO UTC time."""
    return [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]


def renderer(use_json: bool) -> structlog.types.Processor:
    """JSON lines, or readable uncoloured console lines."""
    return structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)


def configure_structlog(
    stream: TextIO,
    use_json: bool,
    level: int = logging.INFO,
    before: Sequence[structlog.types.Processor] = (),
    after: Sequence[structlog.types.Processor] = (),
) -> None:
    """Configure structlog for the process: events of ``level`` and above, through ``before``, ``stamp()``,
    ``after`` and ``renderer(use_json)``, to ``stream`` one write per line. Calling it again replaces the
    setup."""
    structlog.configure(
        processors=[*before, *stamp(), *after, renderer(use_json)],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # text and newline in one write
        cache_logger_on_first_use=False,
    )


def write_line(stream: TextIO, text: str) -> None:
    """``text`` and its newline in one write, flushed: whole even when other processes share ``stream``."""
    stream.write(text + "\n")
    stream.flush()
