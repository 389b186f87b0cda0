"""Tolaria trainer: tasks, morphogenetic model, epoch loops, LKG snapshot and governor client."""

__version__ = "0.1.0"
