"""The trainer's governor client: the sans-IO protocol, its outbox, and the grpc sender thread around them."""

from tolaria_trainer.client.client import ClientOptions, GovernorClient
from tolaria_trainer.client.errors import GovernorClientError, GovernorRefused
from tolaria_trainer.client.outbox import Outbox
from tolaria_trainer.client.protocol import (
    EndKind,
    ProtocolOptions,
    StreamOutcome,
    TrainerProtocol,
    timeline_after,
)
from tolaria_trainer.governance import VitalsColumns, VitalsSource

__all__ = [
    "ClientOptions",
    "EndKind",
    "GovernorClient",
    "GovernorClientError",
    "GovernorRefused",
    "Outbox",
    "ProtocolOptions",
    "StreamOutcome",
    "TrainerProtocol",
    "VitalsColumns",
    "VitalsSource",
    "timeline_after",
]
