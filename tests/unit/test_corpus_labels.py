"""The corpus labels (docs/protocol.md, "Benchmark budgets and corpus labels"), computed from traces, never by hand."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks.corpus.evaluate import Trace, label

RGL = math.log(10)


def trace(losses: list[float], fault: str = "none", onset: int = 0) -> Trace:
    records = [
        {"kind": "validation", "epoch": e, "step": 10 * e, "loss": x, "num_classes": 10}
        for e, x in enumerate(losses, start=1)
    ]
    return Trace({"trace_id": "t", "fault": fault, "onset_epoch": onset}, records)


LEARNING = [2.0, 1.2, 0.8, 0.5, 0.4, 0.3, 0.25, 0.22, 0.2, 0.19, 0.18]


def test_healthy() -> None:
    """A learning run without a fault that never rises above 2 x running min + 0.05 after epoch 5."""
    assert label(trace(LEARNING)) == "healthy"


def test_bump_after_epoch_5_is_ambiguous() -> None:
    """A healthy-looking run with a late bump above 2 x running min + 0.05 is ambiguous."""
    assert label(trace([*LEARNING, 0.5, 0.2])) == "ambiguous"


def test_back_to_random_guess_is_ambiguous() -> None:
    """A run without a fault that returns to >= 0.9 x RGL after epoch 5 is ambiguous."""
    assert label(trace([*LEARNING, 0.95 * RGL])) == "ambiguous"


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ([math.nan], "catastrophic"),
        ([0.18, 0.18, 2 * 0.18 + 0.05], "catastrophic"),
        ([0.18, 0.18, 0.18, 0.9], "ambiguous"),
        ([0.3, 0.3, 0.3], "ambiguous"),
    ],
)
def test_fault_labels(after: list[float], expected: str) -> None:
    """Catastrophic needs non-finite or >= 2 x min(last 5 pre-onset) + 0.05 within 3 epochs of onset."""
    assert label(trace([*LEARNING, *after], fault="spike", onset=len(LEARNING) + 1)) == expected


def test_fault_before_learning_is_ambiguous() -> None:
    """If the run was not learning before onset (last loss >= 0.6 x RGL), the fault is ambiguous."""
    assert label(trace([2.3, 2.3, 2.2, math.nan], fault="nan", onset=4)) == "ambiguous"
