"""Every exception the daemon raises on purpose, in one place.

Each one carries a message that names the offending value and, where there is one, the fix. The gRPC
layer maps them to status codes in one helper; the CLI maps them to exit codes.
"""

from __future__ import annotations


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
