"""GovernedOptions: how one run is governed, checked once where it is made.

``GovernedTraining`` takes them as keyword arguments (``agree_every_steps=10``) or as one object
(``options=GovernedOptions(...)``); ``RunConfig.governed_options`` builds the ones of `tolaria-train` and
the framework callbacks build theirs from their keyword arguments. Plain data: no torch, no grpc.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

SNAPSHOT_LOCATIONS = ("device", "pinned", "host", "auto")

_DURATIONS = (
    "fail_closed_deadline_s",
    "halt_wait_s",
    "verdict_wait_s",
    "vitals_flush_s",
    "connect_wait_s",
    "final_flush_s",
)


@dataclass(frozen=True)
class GovernedOptions:
    """One run's governance knobs (README, "Govern your own training loop"). Invariant: every field is in
    range once constructed (``__post_init__`` raises ValueError naming the field and the value given), so
    nothing downstream checks them again. The run's objects (model, optimizers, schedulers, the governor
    itself) are not options: ``GovernedTraining`` takes them as its own arguments."""

    run_id: str | None = None  # None: ``<task>-<UTC time>-<6 hex>`` (and no snapshots in shared memory)
    task: str = "custom"
    token: str | None = field(default=None, repr=False)
    num_classes: int | None = None  # classification; or random_guess_loss (language models); not both
    random_guess_loss: float | None = None
    policy: Mapping[str, Any] | None = None  # the governor's policy overrides for this run
    snapshot_location: str = "auto"
    snapshot_shm: bool | None = None  # None: on for a governed run given a run_id
    step_snapshots: int = 1
    step_snapshot_every: int = 250
    onset_margin_steps: int = 10
    agree_every_steps: int = 50  # 0: agreement points only at validations
    guard_steps: bool = True
    fail_closed: bool = False
    fail_closed_deadline_s: float = 60.0
    halt_wait_s: float = 3600.0
    verdict_wait_s: float = 5.0
    vitals_flush_s: float = 0.1
    connect_wait_s: float = 10.0
    final_flush_s: float = 30.0
    heartbeat_s: float = 2.0
    tls_ca: bytes | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._check_steps()
        self._check_judging()
        if self.snapshot_location not in SNAPSHOT_LOCATIONS:
            choices = ", ".join(SNAPSHOT_LOCATIONS)
            raise ValueError(f"snapshot_location must be one of {choices}, got {self.snapshot_location!r}")
        for name in _DURATIONS:
            value = getattr(self, name)
            if not value >= 0:  # NaN too
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if not (math.isfinite(self.heartbeat_s) and self.heartbeat_s > 0):
            raise ValueError(f"heartbeat_s must be a positive number of seconds, got {self.heartbeat_s}")

    def _check_steps(self) -> None:
        if self.agree_every_steps < 0:
            raise ValueError(f"agree_every_steps must be >= 0 (0: only at validations), got {self.agree_every_steps}")
        if self.step_snapshot_every < 1 or self.onset_margin_steps < 0:
            raise ValueError(
                f"step_snapshot_every must be >= 1 and onset_margin_steps >= 0, got {self.step_snapshot_every} "
                f"and {self.onset_margin_steps}"
            )
        if self.step_snapshots < 0:
            raise ValueError(f"step_snapshots must be >= 0, got {self.step_snapshots}")

    def _check_judging(self) -> None:
        num_classes, random_guess_loss = self.num_classes, self.random_guess_loss
        if num_classes is not None and random_guess_loss is not None:
            raise ValueError("give num_classes (classification) or random_guess_loss (language models), not both")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if random_guess_loss is not None and not (math.isfinite(random_guess_loss) and random_guess_loss > 0):
            raise ValueError(f"random_guess_loss must be a positive finite number, got {random_guess_loss}")

    def with_knobs(self, knobs: Mapping[str, Any]) -> GovernedOptions:
        """These options with ``knobs`` (field names) replaced, checked again; these very options if none."""
        return dataclasses.replace(self, **knobs) if knobs else self

    @classmethod
    def split(cls, keywords: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``keywords`` as (the ones that are options, the others): for callers that take both in one
        ``**kwargs`` (the framework callbacks)."""
        names = {f.name for f in dataclasses.fields(cls)}
        knobs = {key: value for key, value in keywords.items() if key in names}
        return knobs, {key: value for key, value in keywords.items() if key not in names}


def default_run_id(task: str) -> str:
    """``<task>-<UTC time>-<6 hex>``: two jobs never collide by accident."""
    return f"{task}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


class GovernedKnobs(TypedDict, total=False):
    """GovernedOptions' fields as keyword arguments (``GovernedTraining(..., **knobs)``); the same names and
    types (tests/unit/trainer/test_options.py holds them equal)."""

    run_id: str | None
    task: str
    token: str | None
    num_classes: int | None
    random_guess_loss: float | None
    policy: Mapping[str, Any] | None
    snapshot_location: str
    snapshot_shm: bool | None
    step_snapshots: int
    step_snapshot_every: int
    onset_margin_steps: int
    agree_every_steps: int
    guard_steps: bool
    fail_closed: bool
    fail_closed_deadline_s: float
    halt_wait_s: float
    verdict_wait_s: float
    vitals_flush_s: float
    connect_wait_s: float
    final_flush_s: float
    heartbeat_s: float
    tls_ca: bytes | None
    tls_cert: bytes | None
    tls_key: bytes | None


__all__ = ["SNAPSHOT_LOCATIONS", "GovernedKnobs", "GovernedOptions", "default_run_id"]
