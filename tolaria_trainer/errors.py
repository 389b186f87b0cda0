"""Every exception the trainer raises on purpose. Messages name the value and the fix."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of the trainer's own errors."""


class DeviceError(TrainerError, ValueError):
    """A --device value that cannot be used here."""


class ScheduleError(TrainerError, ValueError):
    """A malformed seed schedule or fault-injection spec."""


class StageTransitionError(TrainerError):
    """A seed lifecycle transition that is not allowed."""


class TaskError(TrainerError, ValueError):
    """An unknown task, or task data that is missing or malformed."""


class RestoreError(TrainerError):
    """A last-known-good snapshot could not be restored (e.g. state-dict keys did not match)."""


class SnapshotError(TrainerError):
    """A snapshot could not be taken or published."""


class PeerLost(TrainerError):
    """A collective with the other ranks failed: a rank crashed, was killed, or the network between them broke.
    This rank cannot go on alone; its last-known-good stays in shared memory for the launcher's restart."""


class GovernorAddressError(TrainerError, ValueError):
    """A governor address (--address) that is malformed or whose host does not resolve."""


class GovernorUnreachable(TrainerError):
    """The governor stayed unreachable past the fail-closed deadline."""


class RollbackFailed(TrainerError):
    """A ROLLBACK or RESUME could not restore the LKG (the governor then halts the run)."""


class RunHalted(TrainerError):
    """The governor halted the run and no RESUME came within ``halt_wait_s``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"halted by the governor: {reason}")
        self.reason = reason
