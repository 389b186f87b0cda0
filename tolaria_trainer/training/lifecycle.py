"""The seed lifecycle of a `tolaria-train` run: the schedule's entries applied at epoch starts, blends
advanced after each validation, and the blend plan pruned of seeds a rollback culled."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from tolaria_trainer.distributed import Distributed
from tolaria_trainer.model.schedule import ScheduleEvent
from tolaria_trainer.model.seeds import SeedStage
from tolaria_trainer.training.state import TrainingState

log = structlog.get_logger("tolaria.lifecycle")


class SeedLifecycle:
    """Drives the seed slots of ``state``'s morphogenetic host through ``schedule``.

    ``checkpoint`` is called right after a fossilization (older snapshots no longer fit the model).
    """

    def __init__(
        self,
        schedule: list[ScheduleEvent],
        state: TrainingState,
        dist: Distributed,
        checkpoint: Callable[[str], object],
    ) -> None:
        self.schedule = schedule
        self.state = state
        self.dist = dist
        self.checkpoint = checkpoint
        self.blend_plan: dict[str, float] = {}  # slot -> alpha added per validation

    def mode(self) -> str:
        """How this epoch trains: ``womb`` (a seed in TRAINING), ``blended``, or ``normal``."""
        stages = set(self.state.host.seed_stages().values())
        if SeedStage.TRAINING in stages:
            return "womb"
        if stages & {SeedStage.BLENDING, SeedStage.PROBATIONARY}:
            return "blended"
        return "normal"

    def before_epoch(self, epoch: int) -> None:
        """Apply the schedule's entries for ``epoch``; an entry that no longer fits (its seed was culled) is
        skipped with a warning."""
        for event in [e for e in self.schedule if e.epoch == epoch]:
            slot = self.state.host.slot(event.slot)
            try:
                self._apply(event, slot.stage)
            except Exception as exc:
                log.warning(
                    "seed-schedule entry skipped",
                    action=event.action,
                    slot=event.slot,
                    epoch=epoch,
                    stage=str(slot.stage),
                    reason=str(exc),
                )

    def _apply(self, event: ScheduleEvent, stage: SeedStage) -> None:
        state = self.state
        slot = state.host.slot(event.slot)
        if event.action == "germinate":
            state.germinate(event.slot, event.blueprint)
            if slot.seed is not None:
                self.dist.broadcast_module(slot.seed)
        elif event.action == "blend":
            if stage is not SeedStage.TRAINING:
                raise ValueError(f"blend needs a TRAINING seed, the slot is {stage}")
            slot.advance(SeedStage.BLENDING)
            self.blend_plan[event.slot] = 1.0 / event.blend_epochs
            slot.set_alpha(self.blend_plan[event.slot])
        elif event.action == "fossilize":
            if stage not in (SeedStage.BLENDING, SeedStage.PROBATIONARY):
                raise ValueError(f"fossilize needs a BLENDING or PROBATIONARY seed, the slot is {stage}")
            state.fossilize(event.slot)
            self.blend_plan.pop(event.slot, None)
            self.checkpoint(f"{event.slot} fossilized")
        elif event.action == "cull":
            slot.cull("seed schedule")
            state.drop_seed_optimizer(event.slot)
        log.info("seed lifecycle", slot=event.slot, action=event.action, stage=str(slot.stage))

    def after_validation(self) -> None:
        """Advance every blending seed's alpha; a seed at alpha 1 becomes PROBATIONARY."""
        for name, step in list(self.blend_plan.items()):
            slot = self.state.host.slot(name)
            if slot.stage is not SeedStage.BLENDING:
                self.blend_plan.pop(name)
            elif slot.alpha + step >= 1.0 - 1e-9:
                slot.advance(SeedStage.PROBATIONARY)
                self.blend_plan.pop(name)
            else:
                slot.set_alpha(slot.alpha + step)

    def after_restore(self) -> None:
        """Forget the blends of seeds the rollback culled."""
        self.blend_plan = {k: v for k, v in self.blend_plan.items() if self.state.host.slot(k).is_live}
