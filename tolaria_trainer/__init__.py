"""Tolaria trainer: tasks, morphogenetic model, epoch loops, LKG snapshot and governor client."""
