"""How a governed run ended, as its governor is told: ``ending`` (a ``with`` block's) and ``finish_report``.

Invariant: an ending the governor cannot act on is not told (a status of None: a lost peer's launcher restarts
the ranks, an unreachable governor cannot hear it); a FinishReport is the run's account as it stands at its end.
"""

from __future__ import annotations

import time

from tolaria_trainer.errors import GovernorUnreachable, PeerLost, RunHalted
from tolaria_trainer.governance import FinishReport, FinishStatus, ValidationReport
from tolaria_trainer.training.state import TrainingState


def ending(exc: BaseException | None) -> tuple[FinishStatus | None, str]:
    """How a ``with`` block that raised ``exc`` (None: none) ended: the status to tell the governor (None: it is
    not told; a lost peer's launcher restarts the ranks, an unreachable governor cannot hear it) and why."""
    if exc is None:
        return FinishStatus.COMPLETED, ""
    if isinstance(exc, RunHalted):
        return FinishStatus.HALTED, str(exc)
    if isinstance(exc, GovernorUnreachable | PeerLost):
        return None, str(exc)
    return FinishStatus.FAILED, f"{type(exc).__name__}: {exc}"


def finish_report(
    status: FinishStatus | None,
    message: str,
    state: TrainingState,
    num_rollbacks: int,
    started_at: float,
    last: ValidationReport | None,
) -> FinishReport | None:
    """What the governor is told of a run that ended with ``status`` (None: nothing), ``last`` the last validation
    on the current timeline (None: none since the last restore), ``started_at`` its ``time.monotonic()``."""
    if status is None:
        return None
    return FinishReport(
        status=status,
        epochs_completed=state.epoch,
        num_rollbacks=num_rollbacks,
        message=message or str(status),
        duration_s=time.monotonic() - started_at,
        final_validation_loss=last.loss if last else None,
        final_validation_accuracy=last.accuracy if last else None,
    )


__all__ = ["ending", "finish_report"]
