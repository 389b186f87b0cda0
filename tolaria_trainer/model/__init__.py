"""The morphogenetic model: host network, seed slots, blueprints, lifecycle schedule, factory."""

from tolaria_trainer.model.factory import create_model
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
    "create_model",
    "parse_schedule",
]
