"""What a refused or failed call raises: a ``ControllerError`` subclass named after the cause."""

from __future__ import annotations

import grpc


class ControllerError(Exception):
    """A call failed. ``code`` is the gRPC status (None when the daemon's answer itself was unusable),
    ``details`` the daemon's message, ``method`` the ControlService method."""

    def __init__(self, code: grpc.StatusCode | None, details: str, method: str, address: str) -> None:
        self.code, self.details, self.method, self.address = code, details, method, address
        super().__init__(self._describe())

    def _describe(self) -> str:
        status = self.code.name if self.code is not None else "error"
        return f"{self.method} at {self.address}: {status}: {self.details}"


class NotFound(ControllerError):
    """NOT_FOUND: no such run (never created, or forgotten, evicted or expired)."""


class Refused(ControllerError):
    """The daemon refused the request itself: invalid input (INVALID_ARGUMENT), the run's state does not allow it
    (FAILED_PRECONDITION, e.g. resuming a run that is not HALTED), or a limit (RESOURCE_EXHAUSTED)."""


class Unauthenticated(ControllerError):
    """UNAUTHENTICATED: no token, or one the daemon does not know."""


class PermissionDenied(ControllerError):
    """PERMISSION_DENIED: the token's role may not make this call (commands need ``controller``)."""


class Unreachable(ControllerError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: no daemon answered at the address within the deadline."""

    def _describe(self) -> str:
        status = self.code.name if self.code is not None else "error"
        return f"governor at {self.address} unreachable ({self.method}, {status}): {self.details}"


class ProtocolError(ControllerError):
    """A WatchEvents event this client cannot read (a payload without a field its kind always carries)."""


_ERRORS: dict[grpc.StatusCode, type[ControllerError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: Refused,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.ALREADY_EXISTS: Refused,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Refused,
    grpc.StatusCode.OUT_OF_RANGE: Refused,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unreachable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unreachable,
}


def error_from_rpc(exc: grpc.RpcError, method: str, address: str) -> ControllerError:
    code = exc.code()
    return _ERRORS.get(code, ControllerError)(code, exc.details() or "", method, address)
