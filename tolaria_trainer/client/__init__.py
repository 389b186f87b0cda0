"""The trainer's governor client: ``GovernorConnection`` (the ``Governance`` over gRPC), the sans-IO
protocol it drives, its outbox, its sender thread and its protobuf translation."""

from tolaria_trainer.client.connection import GovernorConnection
from tolaria_trainer.client.errors import GovernorClientError, GovernorRefused
from tolaria_trainer.client.outbox import Outbox
from tolaria_trainer.client.protocol import (
    EndKind,
    ProtocolOptions,
    StreamOutcome,
    TrainerProtocol,
    timeline_after,
)
from tolaria_trainer.client.sender import ClientOptions
from tolaria_trainer.governance import VitalsColumns, VitalsSource

__all__ = [
    "ClientOptions",
    "EndKind",
    "GovernorClientError",
    "GovernorConnection",
    "GovernorRefused",
    "Outbox",
    "ProtocolOptions",
    "StreamOutcome",
    "TrainerProtocol",
    "VitalsColumns",
    "VitalsSource",
    "timeline_after",
]
