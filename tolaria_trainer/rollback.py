"""Executing ROLLBACK (and RESUME): cull live seeds, restore the LKG, move to the command's new
timeline, apply the recovery recipe. Idempotent by command id: a re-sent command is answered from the ledger."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tolaria_trainer.errors import RestoreError
from tolaria_trainer.model.seeds import LIVE_STAGES, seed_slots
from tolaria_trainer.snapshot import LastKnownGood
from tolaria_trainer.training.state import TrainingState

log = logging.getLogger("tolaria.rollback")
LEDGER_SIZE = 1024


@dataclass(frozen=True)
class RestoreOutcome:
    """What a restore did; this is what the CommandResult reports."""

    command_id: int
    succeeded: bool
    new_timeline: int
    restored_step: int
    duration_ms: float
    error: str = ""
    culled: tuple[str, ...] = field(default_factory=tuple)
    repeated: bool = False


class CommandLedger:
    """The last LEDGER_SIZE command ids executed, with their outcomes."""

    def __init__(self, size: int = LEDGER_SIZE) -> None:
        self.size = size
        self._outcomes: OrderedDict[int, RestoreOutcome] = OrderedDict()

    def get(self, command_id: int) -> RestoreOutcome | None:
        """The stored outcome of an executed command, or None."""
        return self._outcomes.get(command_id)

    def put(self, outcome: RestoreOutcome) -> None:
        """Remember an outcome (forgetting the oldest past ``size``)."""
        self._outcomes[outcome.command_id] = outcome
        while len(self._outcomes) > self.size:
            self._outcomes.popitem(last=False)


def execute_restore(
    state: TrainingState,
    lkg: LastKnownGood,
    ledger: CommandLedger,
    command_id: int,
    reason: str,
    new_timeline: int,
    recovery_lr_scale: float = 1.0,
    recovery_skip_batches: int = 0,
    onset_step: int | None = None,
    onset_margin: int = 0,
    *,
    before_step: int | None = None,
    skip_through_step: int | None = None,
) -> RestoreOutcome:
    """Cull live seeds, restore the LKG in place, move to ``new_timeline``, apply the recipe.

    ``new_timeline`` comes from the command (its timeline + 1, ``client.protocol.timeline_after``), not
    from the rank's own timeline: a rank that was behind catches up, and every rank lands on the same one.

    ``recovery_lr_scale`` compounds across rollbacks: every param group's lr and the schedulers' base
    lrs end up at the snapshot's value × (cumulative scale now / cumulative scale when the snapshot was
    taken). ``onset_step`` (a train-stream alarm's estimate) picks the newest published snapshot older
    than it by ``onset_margin`` (``LastKnownGood.choose``); without it, the newest validated one; a
    recurrence's ``before_step`` asks for one older than that too. ``skip_through_step`` adds the batches of
    the steps after the restored one through it to the batches to skip (the recurring fault's data window).
    A command id seen before returns its stored outcome without executing again.
    """
    known = ledger.get(command_id)
    if known is not None:
        return RestoreOutcome(**{**known.__dict__, "repeated": True})
    started = time.perf_counter()
    culled = _cull_live_seeds(state, f"rollback {command_id}: {reason}")
    try:
        info = lkg.restore(state, onset_step, onset_margin, before_step)
    except RestoreError as exc:
        outcome = RestoreOutcome(
            command_id,
            False,
            state.timeline,
            state.step,
            (time.perf_counter() - started) * 1000.0,
            str(exc),
            tuple(culled),
        )
        ledger.put(outcome)
        return outcome
    state.timeline = new_timeline
    state.lr_scale *= recovery_lr_scale
    _scale_lrs(state, state.lr_scale / info.lr_scale)
    window = 0 if skip_through_step is None else max(0, skip_through_step - info.step)
    state.skip_batches = window + recovery_skip_batches
    outcome = RestoreOutcome(
        command_id, True, state.timeline, info.step, (time.perf_counter() - started) * 1000.0, "", tuple(culled)
    )
    ledger.put(outcome)
    return outcome


def _cull_live_seeds(state: TrainingState, reason: str) -> list[str]:
    """Cull every live seed and drop its optimizer; returns the slots culled (a cull that fails is logged,
    never fatal, and its optimizer is dropped all the same)."""
    culled: list[str] = []
    for slot in seed_slots(state.model):
        if slot.stage not in LIVE_STAGES:
            continue
        try:
            slot.cull(reason)
            culled.append(slot.name)
        except Exception:  # a cull that fails is logged, never fatal
            log.exception("culling seed in %s failed", slot.name)
        state.drop_seed_optimizer(slot.name)
    return culled


def _scale_lrs(state: TrainingState, factor: float) -> None:
    """Multiply every param group's lr (seed optimizers' too) and the schedulers' base and last lrs by ``factor``."""
    if factor == 1.0:
        return
    for optimizer in (*state.optimizers, *state.seed_optimizers.values()):
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
    for scheduler in state.schedulers:
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        last = getattr(scheduler, "_last_lr", None)
        if last is not None:
            scheduler._last_lr = [lr * factor for lr in last]
