"""The daemon's deterministic core: events in, effects out (docs/protocol.md).

No grpc, protobuf, asyncio, file or clock access anywhere in this package (a test checks it). It writes the
journal's records (``tolaria.journal``: the contract of every entry, plain data that imports nothing).
"""

from governor_daemon.core.effects import Effects, Outbound, Send
from governor_daemon.core.machine import Binding, CommandReply, CoreOptions, GovernorCore, Limits
from governor_daemon.core.registry import RankState, Registry, Run, RunMeta

__all__ = [
    "Binding",
    "CommandReply",
    "CoreOptions",
    "Effects",
    "GovernorCore",
    "Limits",
    "Outbound",
    "RankState",
    "Registry",
    "Run",
    "RunMeta",
    "Send",
]
