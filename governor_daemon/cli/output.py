"""What every `governor` command prints the same way: errors (JSON with --json), validation summaries, and
a reader that went away (`| head`). (Messages of the contract print through ``tolaria.controller``'s typed
classes' ``to_dict``; journal entries for people through ``governor_daemon/cli/entries.py``.)

With ``--json``, stdout carries only data and every error or warning is one JSON object on its own line
on stderr: ``{"error": MESSAGE, "code": CODE, "exit_code": N}`` (CODE is the gRPC status name when the
daemon refused, else the exit code's name, e.g. ``USAGE``) or ``{"warning": MESSAGE}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from governor_daemon.text import printable
from tolaria.exit_codes import ExitCode


def error(args: argparse.Namespace, message_text: str, exit_code: ExitCode, code: str | None = None) -> int:
    """Report a failure of `governor <command>` on stderr; returns ``exit_code``."""
    if getattr(args, "json", False):
        obj = {"error": message_text, "code": code or exit_code.name, "exit_code": int(exit_code)}
        print(json.dumps(obj), file=sys.stderr, flush=True)
    else:
        print(f"governor {_command(args)}: {printable(message_text)}", file=sys.stderr, flush=True)
    return exit_code


def warning(args: argparse.Namespace, message_text: str) -> None:
    """A warning on stderr (a JSON object with --json)."""
    if getattr(args, "json", False):
        print(json.dumps({"warning": message_text}), file=sys.stderr, flush=True)
    else:
        print(f"warning: {printable(message_text)}", file=sys.stderr, flush=True)


def unreachable_text(address: str, status: Any, tls: bool) -> str:
    """The one-line error for a daemon that did not answer (exit 4): where, what gRPC said, and what to check.

    ``status`` is the gRPC status code (UNAVAILABLE or DEADLINE_EXCEEDED), ``tls`` whether TLS was used.
    """
    name = getattr(status, "name", str(status))
    what = "did not answer within --timeout-s" if name == "DEADLINE_EXCEEDED" else "cannot be reached"
    tls_hint = (
        "this client uses TLS (--tls-ca): the daemon must serve TLS, with a certificate for this host name"
        if tls
        else "this client speaks plaintext: for a daemon with TLS give --tls-ca (mTLS: --tls-cert and --tls-key too)"
    )
    return (
        f"the governor at {address} {what} ({name}): is `governor serve` running there and listening on that "
        f"address (--address, GOVERNOR_ADDRESS)? {tls_hint}"
    )


def _command(args: argparse.Namespace) -> str:
    words = (getattr(args, name, None) for name in ("command", "audit_command", "policy_command"))
    return " ".join(w for w in words if w)


def json_number(value: Any) -> float | None:
    """A journaled number as a float (non-finite ones are journaled as strings); None if it is not one."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # the journal writes non-finite floats as strings
        try:
            return float(value)
        except ValueError:
            return None
    return None


def validation_summary(details: dict[str, Any], max_classes: int = 10) -> str:
    """Accuracy and per-class accuracy of a journaled validation record ('' when it carried neither)."""
    parts: list[str] = []
    accuracy = json_number(details.get("accuracy"))
    if accuracy is not None:
        parts.append(f"acc {accuracy:.4g}")
    per_class = [json_number(x) for x in details.get("per_class_accuracy") or []]
    values = [math.nan if x is None else x for x in per_class]
    if values:
        if len(values) <= max_classes:
            parts.append("per-class " + " ".join(f"{i}:{v:.3g}" for i, v in enumerate(values)))
        else:
            finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
            if finite:
                low, at = min(finite)
                mean = sum(v for v, _ in finite) / len(finite)
                parts.append(f"per-class over {len(values)} classes: min {low:.3g} (class {at}), mean {mean:.3g}")
            else:
                parts.append(f"per-class over {len(values)} classes: none finite")
    return ", ".join(parts)


def exits_quietly_on_closed_pipe(run: Callable[[], int]) -> int:
    """Run a command; if stdout's reader goes away (`governor audit show | head -1`), stop at once with 0.

    Python would otherwise print a BrokenPipeError traceback, and another one when it flushes stdout at
    exit; stdout is pointed at /dev/null so that the exit is quiet.
    """
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.OK
    return code
