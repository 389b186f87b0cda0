"""What every `governor` command prints the same way: errors (JSON with --json), protobuf messages as
JSON (64-bit integers as numbers), validation summaries, and a reader that went away (`| head`).

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

from google.protobuf import descriptor, json_format, message

from governor_daemon.exit_codes import ExitCode
from governor_daemon.text import printable

_INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


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


def _command(args: argparse.Namespace) -> str:
    words = (getattr(args, name, None) for name in ("command", "audit_command", "policy_command"))
    return " ".join(w for w in words if w)


def message_to_dict(msg: message.Message) -> dict[str, Any]:
    """``MessageToDict`` with the proto field names, and 64-bit integers as JSON numbers, not strings.

    (Proto3's JSON mapping writes int64 and uint64 as strings for JavaScript's sake; every value here
    is below 2^63 and Python's and most JSON readers' integers hold it.)
    """
    return _numbers(msg.DESCRIPTOR, json_format.MessageToDict(msg, preserving_proto_field_name=True))


def _numbers(desc: Any, obj: dict[str, Any]) -> dict[str, Any]:
    for name, value in obj.items():
        field = desc.fields_by_name.get(name)
        if field is None:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            obj[name] = {k: _value(value_field, v) for k, v in value.items()}
        elif isinstance(value, list):
            obj[name] = [_value(field, v) for v in value]
        else:
            obj[name] = _value(field, value)
    return obj


def _value(field: descriptor.FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name.startswith("google.protobuf."):
            return value  # well-known types have their own JSON forms
        return _numbers(field.message_type, value)
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def _number(value: Any) -> float | None:
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
    accuracy = _number(details.get("accuracy"))
    if accuracy is not None:
        parts.append(f"acc {accuracy:.4g}")
    per_class = [_number(x) for x in details.get("per_class_accuracy") or []]
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
