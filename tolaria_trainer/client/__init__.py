"""The trainer's governor client: outbox with seqs and retention, and the background sender."""

from tolaria_trainer.client.client import ClientOptions, GovernorClient
from tolaria_trainer.client.errors import GovernorClientError, GovernorRefused
from tolaria_trainer.client.outbox import Outbox

__all__ = ["ClientOptions", "GovernorClient", "GovernorClientError", "GovernorRefused", "Outbox"]
