"""The morphogenetic model: host network, seed slots, blueprints, lifecycle schedule. It imports nothing of
the tasks or of training (a task builds its model: ``tasks.create_model``; the seeds' lifecycle over a training
state is ``training.lifecycle``)."""

from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.model.schedule import ScheduleEvent, parse_schedule
from tolaria_trainer.model.seeds import BLUEPRINTS, LIVE_STAGES, SeedSlot, SeedSlotProtocol, SeedStage

__all__ = [
    "BLUEPRINTS",
    "LIVE_STAGES",
    "MorphogeneticModel",
    "ScheduleEvent",
    "SeedSlot",
    "SeedSlotProtocol",
    "SeedStage",
    "parse_schedule",
]
