"""`tolaria-train`'s logging: one pipeline for structlog and the standard library's ``logging``, on stderr.

In JSON mode (``--log-format json``, or ``auto`` when stdout is not a TTY) every line the trainer writes
to stderr is one JSON object: structlog's events, the standard library's records (``tolaria.governed``,
``tolaria.guard``, the integrations, Python's ``warnings``) through structlog's ``ProcessorFormatter``, and
the CLI's own warnings and errors (``say``). Non-finite floats are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"``, as the run's summary and the governor's journal write them, since a bare ``NaN``
is not JSON and stops ``jq``. In console mode the same events are rendered as readable lines.

Each line is one ``write`` of the text and its newline together (``tolaria.logs``, the setup the daemon
shares): torchrun hands every rank the same stderr pipe, and a pipe keeps a write of up to 4 KiB whole, so
lines of ranks logging at the same moment never interleave.
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from typing import Any

import structlog

from tolaria import logs as shared

_HANDLER_NAME = "tolaria-train"
_state = {"json": False}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def non_finite_as_strings(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """A structlog processor: NaN and the infinities, at any depth, become "nan", "inf", "-inf"."""
    return {k: _finite(v) for k, v in event.items()}


write_line = shared.write_line
"""``text`` and its newline in one write, flushed (``tolaria.logs``)."""


def configure(fmt: str) -> None:
    """Route structlog and ``logging`` (WARNING and above, plus captured ``warnings``) to stderr, rendered
    alike. Call once, from the main thread, before training starts; calling it again replaces the setup."""
    use_json = shared.uses_json(fmt)
    _state["json"] = use_json
    shared.configure_structlog(
        sys.stderr,
        use_json,
        logging.INFO,
        after=[non_finite_as_strings, *((structlog.processors.format_exc_info,) if use_json else ())],
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            *shared.stamp(),
            non_finite_as_strings,
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, shared.renderer(use_json)],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):  # basicConfig's, or ours from an earlier call: one pipeline only
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def say(message: str, level: str = "warning", **fields: Any) -> None:
    """A message of the CLI itself: ``tolaria-train: MESSAGE`` on stderr in console mode, one JSON event with
    ``"logger": "tolaria.cli"`` in JSON mode (before ``configure``: plain text). ``exc_info=True`` adds the
    exception being handled."""
    if _state["json"]:
        getattr(structlog.get_logger(), level)(message, logger="tolaria.cli", **fields)
    else:
        if fields.get("exc_info"):
            traceback.print_exc(file=sys.stderr)
        write_line(sys.stderr, f"tolaria-train: {message}")
