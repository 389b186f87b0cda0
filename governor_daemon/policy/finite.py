"""The non-finite rule of the train stream, under every profile: a train record whose loss or gradient norm is
non-finite or beyond ``BLOW_UP_CEILING`` (policy/detectors.py) is a PANIC at once, before any statistic sees it."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from governor_daemon.policy.detectors import BLOW_UP_CEILING, blown_up


def first_blown_up(losses: npt.NDArray[np.float64], grads: npt.NDArray[np.float64] | None) -> int | None:
    """The index of the first record whose loss or grad norm is blown up (None: all are sane). Vectorised:
    cheap enough for a shed batch."""
    finite = _sane(losses) & (_sane(grads) if grads is not None else True)
    return None if finite.all() else int(np.argmin(finite))


def non_finite_reason(step: int, rank: int, loss: float, grad_norm: float | None, shed: bool) -> str | None:
    """Why one train record is a PANIC under the rule (None: its values are sane). ``shed``: the record came in a
    shed batch, which the reason says."""
    values = [("loss", loss)] + ([("grad_norm", grad_norm)] if grad_norm is not None else [])
    bad = [(name, v) for name, v in values if blown_up(v)]
    if not bad:
        return None
    name, value = bad[0]
    beyond = "" if not math.isfinite(value) else f" (beyond the ceiling {BLOW_UP_CEILING:g}: a blow-up)"
    reason = f"non-finite train {name} {value}{beyond} at step {step} (rank {rank})"
    if shed:
        reason += "; in a shed batch: the daemon was behind, so only the statistical detectors skipped it"
    return reason


def _sane(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Finite and within the blow-up ceiling, elementwise (``blown_up``'s negation)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) <= BLOW_UP_CEILING)
