"""The one place that maps the daemon's errors to gRPC status codes."""

from __future__ import annotations

import grpc

from governor_daemon.errors import (
    AlreadyExistsError,
    ConflictError,
    GovernorError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    PolicyConfigError,
    PolicyStateError,
    UnavailableError,
)

_CODES: tuple[tuple[type[GovernorError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (PolicyConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (PolicyStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: GovernorError) -> grpc.StatusCode:
    """The status code of a domain error (INTERNAL for one without a mapping)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
