"""What the governor's side of the port raises: a refusal is an answer, never a raw RpcError."""

from __future__ import annotations

from tolaria_trainer.errors import TrainerError


class GovernorClientError(TrainerError):
    """Base class of governor-client errors."""


class GovernorRefused(GovernorClientError):
    """The governor refused this trainer (bad input, a live duplicate, a policy conflict). Not retried."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"the governor refused the stream ({code}): {details}")
        self.code = code
        self.details = details
