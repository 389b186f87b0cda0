"""KEY=VALUE policy overrides, typed by the contract's Policy message: the one parser behind
`tolaria-train --policy`, the daemon's ``policy`` setting, `governor policy set` and `governor replay --policy`.

Imports only the generated contract (protobuf): the daemon uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from google.protobuf.descriptor import FieldDescriptor

from tolaria.governor.v1 import common_pb2

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
"""A bool's spellings (any case); anything else is an error, never false."""
NONE = ("none", "null", "")
"""What a nullable field takes for "not set"."""
FIELDS: tuple[str, ...] = tuple(f.name for f in common_pb2.Policy.DESCRIPTOR.fields)
"""The Policy message's fields, in the contract's order."""
NULLABLE_MEANS = {"random_guess_loss": "derive it from the task"}
"""Fields whose "not set" is a value of its own, and what it means: a KEY=none pair asks for it."""
NULLABLE = frozenset(NULLABLE_MEANS)

_KINDS = {
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_UINT32: "int",
    FieldDescriptor.TYPE_INT32: "int",
    FieldDescriptor.TYPE_UINT64: "int",
    FieldDescriptor.TYPE_INT64: "int",
    FieldDescriptor.TYPE_DOUBLE: "float",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_STRING: "str",
}

_UNSIGNED = frozenset((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64))

Problem = Literal["syntax", "unknown", "value"]


def kind(name: str) -> str:
    """The Python type a field's text parses to: "bool", "int", "float" or "str", with " | None" for a
    nullable field. Raises KeyError for a name that is not a Policy field."""
    base = _KINDS[common_pb2.Policy.DESCRIPTOR.fields_by_name[name].type]
    return f"{base} | None" if name in NULLABLE else base


class PolicyArgError(ValueError):
    """A KEY=VALUE pair that does not parse. ``problem`` says which rule it broke: "syntax" (no '=' or no
    key), "unknown" (a key that is not a Policy field) or "value" (text that is not the field's type; ``kind``
    names it). The message names the pair and, for a bad key, lists the valid ones."""

    def __init__(self, pair: str, key: str, problem: Problem, text: str = "") -> None:
        self.pair, self.key, self.problem, self.text = pair, key, problem, text
        self.kind = kind(key) if problem == "value" else ""
        if problem != "value":
            reason = f"expected KEY=VALUE with KEY one of {', '.join(FIELDS)}"
        elif self.kind == "bool":
            reason = f"{key} is true or false (also 1/0, yes/no, on/off)"
        elif self.kind == "int":
            reason = f"{key} needs a whole number{' >= 0' if _unsigned(key) else ''}"
        else:
            reason = f"{key} needs a {'finite ' if _is_float(text) else ''}number"
            if key in NULLABLE:
                reason += " (or none: " + NULLABLE_MEANS[key] + ")"
        super().__init__(f"{pair!r}: {reason}")


def _unsigned(name: str) -> bool:
    return common_pb2.Policy.DESCRIPTOR.fields_by_name[name].type in _UNSIGNED


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_value(key: str, text: str, pair: str | None = None) -> Any:
    """The typed value of one field's text (surrounding blanks ignored); raises PolicyArgError naming
    ``pair`` (default KEY=TEXT)."""
    pair = f"{key}={text}" if pair is None else pair
    if key not in FIELDS:
        raise PolicyArgError(pair, key, "unknown")
    field_kind = kind(key)
    raw = text.strip()
    lowered = raw.lower()
    if field_kind == "str":
        return raw
    if field_kind == "bool":
        if lowered in TRUE:
            return True
        if lowered in FALSE:
            return False
        raise PolicyArgError(pair, key, "value", text)
    if key in NULLABLE and lowered in NONE:
        return None
    try:
        value: int | float = int(raw) if field_kind == "int" else float(raw)
    except ValueError:
        raise PolicyArgError(pair, key, "value", text) from None
    if not math.isfinite(value) or (value < 0 and _unsigned(key)):  # the contract cannot carry it
        raise PolicyArgError(pair, key, "value", text)
    return value


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE pairs (blanks around KEY and VALUE ignored) to typed overrides; a later pair of the same
    KEY wins. Raises PolicyArgError for a pair without '=' or KEY, an unknown KEY or a bad VALUE."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PolicyArgError(pair, key, "syntax")
        out[key] = parse_value(key, text, pair)
    return out
