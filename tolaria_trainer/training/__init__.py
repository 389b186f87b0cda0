"""Training: state, device-side vitals, and the epoch functions."""

from tolaria_trainer.training.epochs import (
    EpochStats,
    ValidationMetrics,
    train_epoch_blended,
    train_epoch_normal,
    train_epoch_womb_mode,
    validate_and_get_metrics,
)
from tolaria_trainer.training.state import TrainingState, adam, enable_compile
from tolaria_trainer.training.vitals import StepVitals, VitalsBuffer, VitalsChunk, record_step, step_recorder

__all__ = [
    "EpochStats",
    "StepVitals",
    "TrainingState",
    "ValidationMetrics",
    "VitalsBuffer",
    "VitalsChunk",
    "adam",
    "enable_compile",
    "record_step",
    "step_recorder",
    "train_epoch_blended",
    "train_epoch_normal",
    "train_epoch_womb_mode",
    "validate_and_get_metrics",
]
