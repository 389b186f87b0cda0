"""The corpus labels (docs/protocol.md, "Benchmark budgets and corpus labels"; the step-level rule in
evaluate.py's docstring), computed from traces, never by hand; small synthetic curves, no training."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from tests.benchmarks.corpus.evaluate import (
    HEALTHY_AFTER,
    LEVEL,
    PERSIST,
    PERSIST_WITHIN,
    RISE,
    WINDOW,
    Trace,
    label,
    step_label,
)

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


# ----------------------------------------------------------------------------- step level

STEP_RGL = math.log(26)


def step_trace(losses: list[float], fault: str = "none", onset: int = 0) -> Trace:
    """Train records at steps 1.. (epochs of 50 steps) and one validation record carrying the RGL."""
    records: list[dict[str, object]] = [
        {"kind": "train", "epoch": (s - 1) // 50 + 1, "step": s, "loss": x, "grad_norm": 1.0}
        for s, x in enumerate(losses, start=1)
    ]
    records.append({"kind": "validation", "epoch": 1, "step": 50, "loss": 2.0, "random_guess_loss": STEP_RGL})
    return Trace({"trace_id": "t", "fault": fault, "onset_step": onset}, records)


def learning(steps: int = 600, floor: float = 0.3) -> list[float]:
    """A descent from about RGL to ``floor`` with +-15 % batch noise (deterministic)."""
    noise = random.Random(0)
    return [(floor + 2.9 * math.exp(-s / 60)) * noise.uniform(0.85, 1.15) for s in range(1, steps + 1)]


def with_values(losses: list[float], start: int, values: list[float]) -> list[float]:
    """``losses`` with the steps from ``start`` (1-based) replaced by ``values``."""
    out = list(losses)
    out[start - 1 : start - 1 + len(values)] = values
    return out


def test_step_healthy_despite_single_batch_spikes() -> None:
    """Spikes of 5x on fewer than half of any SMOOTH batches (a noisy small-batch run) are smoothed away: healthy."""
    losses = learning()
    for s in (250, 330, 331, 333, 335, 420, 590):
        losses[s - 1] *= 5
    assert step_label(step_trace(losses)) == "healthy"


def test_step_excursion_during_warmup_is_ignored() -> None:
    """Before HEALTHY_AFTER the loss may do anything (warm-up, first descent)."""
    assert step_label(step_trace(with_values(learning(), HEALTHY_AFTER - 20, [9.0] * 10))) == "healthy"


@pytest.mark.parametrize(
    "values",
    [[1.0] * 10, [math.nan], [0.95 * STEP_RGL] * 10],
    ids=["doubled", "non-finite", "random-guess"],
)
def test_step_excursion_after_warmup_is_ambiguous(values: list[float]) -> None:
    """A run without a fault with a sustained doubling, a non-finite loss or a collapse is not healthy."""
    assert step_label(step_trace(with_values(learning(), 400, values))) == "ambiguous"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([math.nan], "catastrophic"),
        ([0.7] * 10, "catastrophic"),  # >= 2 x the pre-onset level (about 0.3) for more than half of SMOOTH steps
        ([0.5] * 10, "ambiguous"),  # about 1.7 x
        ([3.0] * 4, "ambiguous"),  # a few bad batches
        ([0.3] * WINDOW + [3.0] * 10, "ambiguous"),  # too late
    ],
)
def test_step_fault_labels(values: list[float], expected: str) -> None:
    """Catastrophic needs a non-finite loss or an excursion of the smoothed loss within WINDOW steps of onset."""
    assert step_label(step_trace(with_values(learning(), 400, values), fault="lr_spike", onset=400)) == expected


def test_step_collapse_to_random_guess_is_catastrophic() -> None:
    """From a high level (2 x level above 0.9 x RGL) a collapse to random guessing is enough."""
    losses = with_values(learning(floor=1.6), 400, [0.92 * STEP_RGL] * 10)
    assert step_label(step_trace(losses, fault="head_collapse", onset=400)) == "catastrophic"


def test_step_fault_before_learning_is_ambiguous() -> None:
    """A fault while the train loss is still >= 0.6 x RGL says nothing about catastrophe."""
    losses = with_values(learning(), 30, [math.nan] * 10)
    assert step_label(step_trace(losses, fault="nan", onset=30)) == "ambiguous"


@pytest.mark.parametrize(
    ("start", "steps", "factor", "expected"),
    [
        (50, PERSIST + 20, 1.35, "catastrophic"),  # a moderate rise (below 2 x), long enough
        (PERSIST_WITHIN - 10, PERSIST + 5, 1.35, "catastrophic"),  # starts within PERSIST_WITHIN, ends later
        (50, PERSIST - 20, 1.35, "ambiguous"),  # too short
        (50, 2 * PERSIST, 1.15, "ambiguous"),  # too small
        (PERSIST_WITHIN + 20, PERSIST + 20, 1.35, "ambiguous"),  # starts too late
    ],
)
def test_step_persistent_rise(start: int, steps: int, factor: float, expected: str) -> None:
    """Catastrophic too: the smoothed loss >= RISE x the pre-onset level for PERSIST consecutive steps, starting
    within PERSIST_WITHIN steps of onset (a persistent LR bug that never doubles the loss)."""
    assert 1.15 < RISE < 1.35 < 2  # the factors below: one under RISE, one between RISE and 2
    onset = 300
    losses = learning(steps=900)
    level = statistics.median(losses[onset - 1 - LEVEL : onset - 1])
    noise = random.Random(1)
    rise = [factor * level * noise.uniform(0.95, 1.05) for _ in range(steps)]
    assert step_label(step_trace(with_values(losses, onset + start, rise), fault="lr_x10", onset=onset)) == expected


def easy_trace(fault: str, onset: int = 0, after: list[float] | None = None) -> Trace:
    """A learning run with 150 easy batches (loss about 0.02) from step 300, then normal data again (first
    half a dozen batches at 1.5 x the old level, as a model returning from easy data shows), then ``after``."""
    noise = random.Random(2)
    easy = [0.02 * noise.uniform(0.5, 1.5) for _ in range(150)]
    losses = with_values(learning(steps=700), 300, [*easy, *[0.45] * 6, *(after or [])])
    t = step_trace(losses, fault=fault, onset=onset)
    t.meta.update(easy_start=300, easy_steps=150)
    return t


def test_step_easy_stretch_is_no_fault_and_no_level() -> None:
    """An easy stretch is no fault: the return to normal data is measured against the level before the stretch
    (healthy), not against the easy batches' losses (which it is many times above)."""
    assert step_label(easy_trace("easy_stretch")) == "healthy"
    without_meta = easy_trace("none")
    del without_meta.meta["easy_start"]
    assert step_label(without_meta) == "ambiguous"


def test_step_fault_after_easy_stretch() -> None:
    """A fault after an easy stretch is judged against the level of normal data (the easy losses left out)."""
    onset = 300 + 150 + 30
    assert step_label(easy_trace("easy_then_spike", onset, [0.3] * 24 + [2.5] * 30)) == "catastrophic"
    assert step_label(easy_trace("easy_then_spike", onset, [0.3] * 24 + [0.35] * 30)) == "ambiguous"
