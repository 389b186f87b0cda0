"""How a journal payload and a frozen dataclass map onto each other, once for every record.

A payload is a JSON object. Its record's dataclass fields are its keys, in the order the daemon writes them, so
``to_payload`` gives back the same keys in the same order with the same values: the journal's bytes do not
depend on this module. Field kinds (``dataclasses.field`` metadata, made by the helpers below):

- plain: always written, read as is (a JSON value: ints stay ints, ``None`` stays ``None``);
- ``optional()``: absent from the payload when ``None`` (the daemon writes the key only in some cases);
- ``part(cls)`` / ``parts(cls)``: a nested object (a list of them) read into ``cls``;
- ``flat(cls)``: a part whose keys sit in the payload itself (``{**source, **details}``); a key the record
  has too keeps the record's place in the payload.

Keys the record does not know are kept in ``extra`` (after the known ones), so any payload ever written reads
and writes back whole; ``more`` is the journal's own key on the entries of a multi-entry event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from tolaria.journal.kinds import EntryKind

JsonFloat = float | str
"""A float as the journal writes it: a number, or "nan", "inf", "-inf" (which ``float`` reads too)."""

_PLAIN, _PART, _PARTS, _FLAT = "plain", "part", "parts", "flat"
_OWN = frozenset({"extra", "more"})
"""Fields of every record that are not keys of its own."""


def optional(**kwargs: Any) -> Any:
    """A field whose key the payload has only when its value is not None."""
    return dataclasses.field(default=None, metadata={"optional": True}, **kwargs)


def part(cls: type[Part], *, is_optional: bool = False) -> Any:
    """A field holding a nested JSON object, read into ``cls`` (absent when None, if ``is_optional``)."""
    default: Any = None if is_optional else dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"shape": _PART, "cls": cls, "optional": is_optional})


def parts(cls: type[Part], *, is_optional: bool = False) -> Any:
    """A field holding a list of nested JSON objects, read into a tuple of ``cls``."""
    default: Any = None if is_optional else dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"shape": _PARTS, "cls": cls, "optional": is_optional})


def flat(cls: type[Part], *, is_optional: bool = False) -> Any:
    """A part spread into the payload itself; an optional one is present when the payload has a key of its own."""
    default: Any = None if is_optional else dataclasses.MISSING
    return dataclasses.field(default=default, metadata={"shape": _FLAT, "cls": cls, "optional": is_optional})


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    shape: str
    is_optional: bool
    cls: Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Part:
    """A JSON object of the journal as a frozen dataclass (see the module docstring for how fields map)."""

    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    """Keys this record does not know (a journal written by another version), kept to be written back."""

    def to_payload(self) -> dict[str, Any]:
        """The JSON object, keys in the order the daemon writes them."""
        out: dict[str, Any] = {}
        for spec in _specs(type(self)):
            value = getattr(self, spec.name)
            if value is None and spec.is_optional:
                continue
            if spec.shape == _PLAIN:
                out[spec.name] = value
            elif spec.shape == _PART:
                out[spec.name] = value.to_payload()
            elif spec.shape == _PARTS:
                out[spec.name] = [p.to_payload() for p in value]
            else:
                out.update(value.to_payload())
        out.update(self.extra)
        more = getattr(self, "more", None)
        if more is not None:
            out["more"] = more
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Self:
        """The record of a payload as journaled (an absent optional key reads as None)."""
        values: dict[str, Any] = {}
        own_keys = frozenset(s.name for s in _specs(cls) if s.shape != _FLAT)
        for spec in _specs(cls):
            if spec.shape == _FLAT:
                value = _read_flat(spec, payload, own_keys)
            elif spec.name not in payload:
                if not spec.is_optional:
                    raise KeyError(f"{cls.__name__}: the payload has no {spec.name!r}")
                value = None
            else:
                value = _read(spec, payload[spec.name])
            values[spec.name] = value
        if "more" in payload and issubclass(cls, Record):
            values["more"] = payload["more"]
        known = _known(cls)
        values["extra"] = {k: v for k, v in payload.items() if k not in known}
        return cls(**values)


def _read(spec: _Spec, value: Any) -> Any:
    if spec.shape == _PART and value is not None:
        return spec.cls.from_payload(value)
    if spec.shape == _PARTS and value is not None:
        return tuple(spec.cls.from_payload(v) for v in value)
    return value


def _read_flat(spec: _Spec, payload: Mapping[str, Any], owner_keys: frozenset[str]) -> Any:
    part_keys = _keys(spec.cls)
    if spec.is_optional and not any(k in payload for k in part_keys if k not in owner_keys):
        return None
    return spec.cls.from_payload({k: v for k, v in payload.items() if k in part_keys})


_SPECS: dict[type[Part], tuple[_Spec, ...]] = {}
_KEYS: dict[type[Part], tuple[str, ...]] = {}
_KNOWN: dict[type[Part], frozenset[str]] = {}


def _specs(cls: type[Part]) -> tuple[_Spec, ...]:
    """The record's fields as the payload has them, in order (computed once per class)."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = _SPECS[cls] = _make_specs(cls)
    return specs


def _make_specs(cls: type[Part]) -> tuple[_Spec, ...]:
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in _OWN:
            continue
        spec = _Spec(f.name, f.metadata.get("shape", _PLAIN), bool(f.metadata.get("optional")), f.metadata.get("cls"))
        specs.append(spec)
    return tuple(specs)


def _known(cls: type[Part]) -> frozenset[str]:
    """The keys that are not ``extra``: the record's own, its flat parts', and the journal's ``more``."""
    known = _KNOWN.get(cls)
    if known is None:
        known = _KNOWN[cls] = frozenset(_keys(cls)) | ({"more"} if issubclass(cls, Record) else set())
    return known


def _keys(cls: type[Part]) -> tuple[str, ...]:
    """Every payload key the record reads (its flat parts' keys included)."""
    keys = _KEYS.get(cls)
    if keys is None:
        out: list[str] = []
        for spec in _specs(cls):
            out.extend(_keys(spec.cls) if spec.shape == _FLAT else (spec.name,))
        keys = _KEYS[cls] = tuple(out)
    return keys


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record(Part):
    """The payload of one journal entry of kind ``KIND``."""

    KIND: ClassVar[EntryKind]
    more: int | None = optional()
    """Set by the journal on the entries of a multi-entry event: how many of the event's entries follow this one
    (the writer adds it; a record the daemon builds never has it)."""
