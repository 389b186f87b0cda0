"""The governor client's own exceptions: a user never sees a raw RpcError for an ordinary failure."""

from __future__ import annotations

from tolaria_trainer.governance.errors import GovernorClientError, GovernorRefused

__all__ = ["GovernorClientError", "GovernorRefused"]
