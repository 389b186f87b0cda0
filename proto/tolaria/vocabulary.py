"""The contract's enums as the two client sides (the trainer's ``Governance`` port and ``tolaria.controller``)
name them: the contract's value names without their prefix, in capitals. The daemon keeps its own lower-case
spellings (``governor_daemon/policy/decisions.py``): they are the journal's, whose format does not change."""

from __future__ import annotations

import enum
from typing import Any, TypeVar


class RunState(enum.StrEnum):
    """A run's lifecycle state (``RunState`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    HEALTHY = "HEALTHY"
    ANOMALY = "ANOMALY"
    ROLLING_BACK = "ROLLING_BACK"
    HALTED = "HALTED"
    STALLED = "STALLED"
    FINISHED = "FINISHED"


class VerdictKind(enum.StrEnum):
    """The governor's judgement of a record (``VerdictKind`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    HEALTHY = "HEALTHY"
    ANOMALY = "ANOMALY"  # divergent, but not (yet) enough times in a row to act on
    PANIC = "PANIC"  # a command follows


class CommandType(enum.StrEnum):
    """What a command orders the trainer (``CommandType`` of the contract, without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    ROLLBACK = "ROLLBACK"  # cull live seeds, restore the LKG, apply the recovery recipe
    HALT = "HALT"  # stop and wait for RESUME
    RESUME = "RESUME"  # restore the LKG and continue


class Action(enum.StrEnum):
    """What a decision's rules ask for (carried out only when the decision has a ``command``)."""

    NONE = "NONE"
    ROLLBACK = "ROLLBACK"
    HALT = "HALT"


# The contract's enum value names are these prefixes plus the member's value.
_PROTO_PREFIX: dict[type[enum.StrEnum], str] = {
    RunState: "RUN_STATE_",
    VerdictKind: "VERDICT_KIND_",
    CommandType: "COMMAND_TYPE_",
}


E = TypeVar("E", bound=enum.StrEnum)


def proto_name(value: enum.StrEnum) -> str:
    """The contract's name of an enum member (its prefix and the member's value)."""
    return _PROTO_PREFIX[type(value)] + value.value


def from_proto_enum(kind: type[E], wrapper: Any, number: int) -> E:
    """A contract enum number as ``kind``; UNSPECIFIED for a number this client does not know (a newer daemon)."""
    try:
        return kind(wrapper.Name(number).removeprefix(_PROTO_PREFIX[kind]))
    except ValueError:
        return kind("UNSPECIFIED")
