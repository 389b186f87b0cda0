"""Every exception the daemon raises on purpose, in one place.

Each one carries a message that names the offending value and, where there is one, the fix. The gRPC
layer maps them to status codes in one helper; the CLI maps them to exit codes.
"""

from __future__ import annotations

import uuid


class GovernorError(Exception):
    """Base class of the daemon's own errors."""


class PolicyConfigError(GovernorError, ValueError):
    """A policy value is impossible (a user mistake): the message names the field and the fix."""


class TraceFormatError(GovernorError, ValueError):
    """A replay trace line is malformed; ``line`` is its 1-based number."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.detail = message


class PolicyStateError(GovernorError):
    """An operation does not fit the run's current state (e.g. Resume of a run that is not HALTED)."""


class InvalidInputError(GovernorError, ValueError):
    """A field that crossed the wire is invalid; ``field`` names it. Maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(GovernorError):
    """An unknown run. Maps to NOT_FOUND."""


class AlreadyExistsError(GovernorError):
    """A (run, rank) already attached with another live incarnation. Maps to ALREADY_EXISTS."""


class ConflictError(GovernorError):
    """A request that contradicts the run (e.g. a later Hello with other overrides). FAILED_PRECONDITION."""


class PermissionDeniedError(GovernorError):
    """An authenticated caller may not touch this run (another principal owns it). PERMISSION_DENIED."""


class LimitExceededError(GovernorError):
    """Over a configured limit (active runs, records per batch). Maps to RESOURCE_EXHAUSTED."""


class InternalError(GovernorError):
    """A bug: the caller gets INTERNAL with an id to find in the daemon's log, never Python's text."""

    @classmethod
    def logged(cls, logger: object, what: str) -> InternalError:
        """Log the exception being handled under a fresh id; the error names only the id."""
        incident = uuid.uuid4().hex[:12]
        logger.exception(what, incident=incident)  # type: ignore[attr-defined]
        return cls(f"internal error {incident}; the daemon's log has the details")


class UnavailableError(GovernorError):
    """The journal failed: the daemon is going down (a restart recovers). Maps to UNAVAILABLE."""
