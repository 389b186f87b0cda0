"""What a governed step, validation or agreement point did beyond recording: ``Outcome``."""

from __future__ import annotations

from dataclasses import dataclass

from tolaria_trainer.governance import Command


@dataclass(frozen=True)
class Outcome:
    """What ``step`` or ``validate`` did beyond recording.

    ``restored``: a ROLLBACK or RESUME restored the LKG in place; the loop goes on from
    ``restored_step`` (and ``restored_epoch``) on ``timeline``, skips ``skip_batches`` batches (the
    training loop's job: ``tolaria-train`` does it), with the learning rate scaled by ``lr_scale``
    (already applied to the optimizers and schedulers). ``halted``: HALT with no RESUME within
    ``halt_wait_s``; the loop must stop (``step`` and ``validate`` raise RunHalted from then on).
    """

    restored: bool = False
    halted: bool = False
    command: Command | None = None
    restored_step: int | None = None
    restored_epoch: int | None = None
    timeline: int = 0
    skip_batches: int = 0
    lr_scale: float = 1.0
    punishment_reward: float = 0.0
    culled: tuple[str, ...] = ()
    duration_ms: float = 0.0
