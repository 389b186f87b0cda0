"""A typed Python client of the governor's ControlService, for controllers: RL agents, schedulers, scripts.

It imports only grpcio, protobuf, the generated stubs and the standard library (no torch, none of the daemon's
dependencies), so a controller installs light. Calls return frozen dataclasses, not protobuf messages; a refused
or failed call raises a ``ControllerError`` subclass named after the cause; and ``events`` follows the journal
across daemon restarts, resuming after the last event it yielded (none twice, none lost)::

    with ControllerClient("127.0.0.1:50051", token=token) as client:
        with client.events(runs=["run-1"], kinds=["command"]) as stream:
            for event in stream:
                if isinstance(event, CommandIssued):
                    print(event.command.type, event.command.punishment_reward)

Unary calls are never retried (a ROLLBACK sent twice is two rollbacks); only the event stream reconnects.
"""

from __future__ import annotations

from tolaria.channel import TlsConfig
from tolaria.controller.client import ControllerClient, EventStream
from tolaria.controller.errors import (
    ControllerError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Refused,
    Unauthenticated,
    Unreachable,
)
from tolaria.controller.events import (
    Command,
    CommandIssued,
    CommandResult,
    Decision,
    Event,
    Notice,
    OtherEvent,
    RunFinished,
)
from tolaria.controller.status import CommandReceipt, OpenCommand, Policy, RankStatus, RunStatus
from tolaria.vocabulary import Action, CommandType, RunState, VerdictKind

__all__ = [
    "Action",
    "Command",
    "CommandIssued",
    "CommandReceipt",
    "CommandResult",
    "CommandType",
    "ControllerClient",
    "ControllerError",
    "Decision",
    "Event",
    "EventStream",
    "NotFound",
    "Notice",
    "OpenCommand",
    "OtherEvent",
    "PermissionDenied",
    "Policy",
    "ProtocolError",
    "RankStatus",
    "Refused",
    "RunFinished",
    "RunState",
    "RunStatus",
    "TlsConfig",
    "Unauthenticated",
    "Unreachable",
    "VerdictKind",
]
