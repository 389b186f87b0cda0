"""The default profile's train-stream detectors (policy/steps.py) through RunPolicy.judge_train_batch, on
synthetic streams: healthy ones (noisy, warm-up, warm restarts) never alarm; a loss spike, a gradient
blow-up and a collapse are caught within steps, with their onset."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor_daemon.policy import PolicyConfig, Rule, RunPolicy, Verdict
from governor_daemon.policy.steps import StepState, loss_gate

RGL = math.log(50)


def stream(
    n: int, seed: int, noise: float = 0.15, start: float = 3.5, end: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A decaying loss with log-normal batch noise, and a grad norm that follows it."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = end + (start - end) * np.exp(-t / 400)
    losses = level * np.exp(rng.normal(0, noise, n))
    grads = 2.0 * level * np.exp(rng.normal(0, noise, n))
    return losses, grads


def first_alarm(
    losses: np.ndarray, grads: np.ndarray | None, profile: str = "default", batch: int = 64, **policy: object
) -> tuple[int, int, Rule] | None:
    """(step, onset step, rule) of the first ROLLBACK, feeding batches as a trainer sends them."""
    engine = RunPolicy(PolicyConfig(profile=profile, **policy), random_guess_loss=RGL)  # type: ignore[arg-type]
    steps = np.arange(1, len(losses) + 1, dtype=np.int64)
    for start in range(0, len(losses), batch):
        part = slice(start, start + batch)
        decision, _ = engine.judge_train_batch(
            0, 0, steps[part], losses[part], None if grads is None else grads[part], float(start)
        )
        if decision is not None and decision.command is not None:
            assert decision.verdict is Verdict.PANIC
            assert decision.onset_step is not None
            return decision.step, decision.onset_step, decision.rule
    return None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_healthy_streams_never_alarm(seed: int, noise: float) -> None:
    """Smooth to very noisy (a log-normal σ of 1: batch-size-1 territory), with the warm-up's fast fall."""
    losses, grads = stream(4000, seed, noise)
    assert first_alarm(losses, grads) is None


def test_a_warm_restart_is_not_a_spike() -> None:
    """SGDR: the LR jumps back up every 1000 steps and the loss rises by a third for a while."""
    losses, grads = stream(4000, 1, 0.2)
    bump = np.ones(4000)
    for restart in (1000, 2000, 3000):
        bump[restart : restart + 300] = 1 + 0.33 * np.exp(-np.arange(300) / 100)
    assert first_alarm(losses * bump, grads * bump) is None


@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_a_sustained_loss_spike_is_caught_with_its_onset(batch: int) -> None:
    losses, grads = stream(3000, 2, 0.15)
    losses[1500:] *= 6  # the LR × 100: every later step is far worse
    alarm = first_alarm(losses, grads, batch=batch)
    assert alarm is not None
    step, onset, rule = alarm
    assert rule is Rule.STEP_LOSS_SPIKE
    assert onset == 1501, "steps are 1-based: record 1500 is step 1501"
    assert step == onset + PolicyConfig().step_loss_patience - 1


def test_one_bad_batch_is_noise() -> None:
    losses, grads = stream(3000, 3, 0.15)
    losses[1500] *= 20
    losses[2000:2003] *= 20  # three in a row: still fewer than step_loss_patience
    assert first_alarm(losses, grads) is None


def test_a_gradient_blow_up_is_caught_at_its_step() -> None:
    losses, grads = stream(3000, 4, 0.3)
    grads[1800] *= 1e4
    assert first_alarm(losses, grads) == (1801, 1801, Rule.STEP_GRAD_BLOWUP)


def test_a_collapse_to_the_random_guess_loss_is_caught() -> None:
    losses, grads = stream(3000, 5, 0.1)
    losses[2000:] = RGL * np.exp(np.random.default_rng(0).normal(0, 0.01, 1000))
    alarm = first_alarm(losses, grads, step_loss_ratio=100.0)  # only the collapse rule can fire
    assert alarm == (2001 + PolicyConfig().step_collapse_patience - 1, 2001, Rule.STEP_COLLAPSE)


def test_the_seed_profile_judges_only_non_finite_values() -> None:
    losses, grads = stream(3000, 6, 0.1)
    grads[1800] *= 1e4
    assert first_alarm(losses, grads, profile="seed") is None
    losses[2500] = math.nan
    assert first_alarm(losses, grads, profile="seed") == (2501, 2501, Rule.TRAIN_NON_FINITE)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_the_first_non_finite_record_panics(data: st.DataObject, n: int) -> None:
    values = st.floats(allow_nan=True, allow_infinity=True, min_value=None, max_value=None)
    losses = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    grads = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    engine = RunPolicy(PolicyConfig())
    steps = np.arange(10, 10 + n, dtype=np.int64)
    decision, _ = engine.judge_train_batch(0, 0, steps, losses, grads, 0.0)
    bad = [i for i in range(n) if not (math.isfinite(losses[i]) and math.isfinite(grads[i]))]
    if not bad:
        assert decision is None or decision.rule is not Rule.TRAIN_NON_FINITE
    else:
        assert decision is not None
        assert (decision.rule, decision.step, decision.onset_step) == (Rule.TRAIN_NON_FINITE, 10 + bad[0], 10 + bad[0])


def test_state_is_frozen_while_a_command_is_open_and_survives_the_journal() -> None:
    engine = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    losses, grads = stream(600, 7, 0.1)
    steps = np.arange(1, 601, dtype=np.int64)
    _, state = engine.judge_train_batch(0, 0, steps[:500], losses[:500], grads[:500], 0.0)
    assert state is not None
    assert state.count == 500
    assert loss_gate(state, engine.config) is not None
    assert RunPolicy.from_dict(engine.to_dict()).step_states == {0: state}
    assert StepState.from_dict(state.as_dict()) == state
    engine.request_rollback("test", 1.0)
    decision, unchanged = engine.judge_train_batch(0, 0, steps[500:], losses[500:] * 50, grads[500:], 2.0)
    assert (decision, unchanged) == (None, None)
    assert engine.step_states[0] == state


def test_a_restore_is_not_a_spike() -> None:
    """Found by the simulation (a second rollback for one fault; a rollback after a trainer restart): after a
    restore, or a restart, the loss is an older step's, well above the level the run had reached; the detectors
    start afresh on a new timeline or when a rank's steps go back."""
    engine = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    losses, grads = stream(3000, 8, 0.1)
    steps = np.arange(1, 3001, dtype=np.int64)
    for start in range(0, 2000, 64):
        part = slice(start, min(start + 64, 2000))
        decision, _ = engine.judge_train_batch(0, 0, steps[part], losses[part], grads[part], 0.0)
        assert decision is None
    engine.timeline = 1  # the run moved on: a rollback to step 300, whose loss is 3 x the level at step 2000
    restored = slice(300, 1300)
    for start in range(restored.start, restored.stop, 64):
        part = slice(start, min(start + 64, restored.stop))
        decision, _ = engine.judge_train_batch(1, 0, steps[part], losses[part], grads[part], 1.0)
        assert decision is None, decision
    assert engine.step_states[0].timeline == 1
    for start in range(300, 1300, 64):  # a restarted trainer on the same timeline: its steps go back again
        part = slice(start, min(start + 64, 1300))
        decision, _ = engine.judge_train_batch(1, 0, steps[part], losses[part], grads[part], 2.0)
        assert decision is None, decision
