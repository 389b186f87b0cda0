"""The per-step train records a `vitals` journal entry may keep, for `governor audit export`.

Each `vitals` entry summarises its batch (``train``: step range, mean and largest loss, largest grad norm).
While a run has sent fewer than ``Limits.journal_train_records`` records (`governor serve
--journal-train-records`, 10 000 by default; 0: never), the entry also keeps the batch's records one by
one, under ``records``: the exact values the detectors judged, so an export of the run replays them
exactly. Arrays are base64 of little-endian 8-byte values (int64 steps, float64 losses, grad norms and
learning rates): exact, including NaN and infinities, and about 4x cheaper to encode than JSON numbers
(a daemon judges hundreds of thousands of records a second). A field the trainer did not send is absent.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ENCODING = "base64-le8"
"""The ``encoding`` field of a ``records`` object: base64 of little-endian int64 / float64 arrays."""


def encode(
    steps: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    lrs: npt.NDArray[np.float64] | None,
) -> dict[str, Any]:
    """The ``records`` object of a vitals entry."""
    out: dict[str, Any] = {
        "encoding": ENCODING,
        "step": _b64(np.asarray(steps, dtype="<i8")),
        "loss": _b64(np.asarray(losses, dtype="<f8")),
    }
    if grads is not None:
        out["grad_norm"] = _b64(np.asarray(grads, dtype="<f8"))
    if lrs is not None:
        out["lr"] = _b64(np.asarray(lrs, dtype="<f8"))
    return out


def _b64(array: npt.NDArray[Any]) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


@dataclass(frozen=True)
class TrainRecords:
    """A vitals entry's records, decoded."""

    steps: tuple[int, ...]
    losses: tuple[float, ...]
    grad_norms: tuple[float, ...] | None
    lrs: tuple[float, ...] | None


def decode(records: Mapping[str, Any]) -> TrainRecords:
    """Inverse of ``encode``; raises ValueError for an object it does not understand."""
    if records.get("encoding") != ENCODING:
        raise ValueError(f"unknown train-records encoding {records.get('encoding')!r}")
    steps = _array(records, "step", "<i8")
    assert steps is not None
    n = len(steps)
    arrays = {name: _array(records, name, "<f8") for name in ("loss", "grad_norm", "lr")}
    for name, array in arrays.items():
        if array is not None and len(array) != n:
            raise ValueError(f"train records: {len(array)} {name} values for {n} steps")
    losses = arrays["loss"]
    if losses is None:
        raise ValueError("train records without losses")
    grads, lrs = arrays["grad_norm"], arrays["lr"]
    return TrainRecords(
        tuple(int(s) for s in steps),
        tuple(float(x) for x in losses),
        None if grads is None else tuple(float(x) for x in grads),
        None if lrs is None else tuple(float(x) for x in lrs),
    )


def _array(records: Mapping[str, Any], name: str, dtype: str) -> npt.NDArray[Any] | None:
    text = records.get(name)
    if text is None:
        if name == "step":
            raise ValueError("train records without steps")
        return None
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"train records: {name} is not base64") from None
    if len(raw) % 8:
        raise ValueError(f"train records: {name} is not a whole number of 8-byte values")
    return np.frombuffer(raw, dtype=dtype)
