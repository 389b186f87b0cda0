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
from governor_daemon.policy.detectors import blown_up
from governor_daemon.policy.steps import StepState, loss_gate, verification_steps

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
    """Non-finite, or beyond the blow-up ceiling (1e15: a finite 1.7e308 once overflowed the statistics)."""
    values = st.floats(allow_nan=True, allow_infinity=True, min_value=None, max_value=None)
    losses = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    grads = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    engine = RunPolicy(PolicyConfig())
    steps = np.arange(10, 10 + n, dtype=np.int64)
    decision, _ = engine.judge_train_batch(0, 0, steps, losses, grads, 0.0)
    bad = [i for i in range(n) if blown_up(losses[i]) or blown_up(grads[i])]
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
    assert RunPolicy.from_dict(engine.to_dict()).detector_pins.step_states == {0: state}
    assert StepState.from_dict(state.as_dict()) == state
    engine.request_rollback("test", 1.0)
    decision, unchanged = engine.judge_train_batch(0, 0, steps[500:], losses[500:] * 50, grads[500:], 2.0)
    assert (decision, unchanged) == (None, None)
    assert engine.detector_pins.step_states[0] == state


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
    engine.ledger.timeline = 1  # the run moved on: a rollback to step 300, whose loss is 3 x the level at step 2000
    restored = slice(300, 1300)
    for start in range(restored.start, restored.stop, 64):
        part = slice(start, min(start + 64, restored.stop))
        decision, _ = engine.judge_train_batch(1, 0, steps[part], losses[part], grads[part], 1.0)
        assert decision is None, decision
    assert engine.detector_pins.step_states[0].timeline == 1
    for start in range(300, 1300, 64):  # a restarted trainer on the same timeline: its steps go back again
        part = slice(start, min(start + 64, 1300))
        decision, _ = engine.judge_train_batch(1, 0, steps[part], losses[part], grads[part], 2.0)
        assert decision is None, decision


def feed(
    engine: RunPolicy,
    losses: np.ndarray,
    grads: np.ndarray | None,
    *,
    first_step: int = 1,
    timeline: int = 0,
    lrs: np.ndarray | None = None,
    batch: int = 64,
    pins: tuple[int, ...] = (),
) -> tuple[int, int, Rule] | None:
    """Feed a stream to ``engine`` as a trainer sends it; (step, onset, rule) of its first command, or None."""
    steps = np.arange(first_step, first_step + len(losses), dtype=np.int64)
    for start in range(0, len(losses), batch):
        part = slice(start, start + batch)
        here = tuple(p for p in pins if steps[part][0] <= p <= steps[part][-1])
        decision, _ = engine.judge_train_batch(
            timeline,
            0,
            steps[part],
            losses[part],
            None if grads is None else grads[part],
            float(start),
            lrs=None if lrs is None else lrs[part],
            pins=here,
        )
        if decision is not None and decision.command is not None:
            assert decision.onset_step is not None
            return decision.step, decision.onset_step, decision.rule
    return None


def test_a_learning_rate_jump_no_schedule_explains_is_caught_at_its_step() -> None:
    """A warm-up (at most x2 per step), a cosine decay and a warm restart back to the peak are schedules;
    the learning rate x 30 past every peak it had is not."""
    losses, grads = stream(2000, 9, 0.1)
    t = np.arange(2000)
    lrs = np.where(t < 100, 1e-3 * (t + 1) / 100, 1e-3 * (0.55 + 0.45 * np.cos(np.pi * ((t - 100) % 600) / 600)))
    assert first_alarm_lr(losses, grads, lrs) is None
    lrs[1500:] *= 30
    assert first_alarm_lr(losses, grads, lrs) == (1501, 1501, Rule.STEP_LR_JUMP)


def first_alarm_lr(losses: np.ndarray, grads: np.ndarray, lrs: np.ndarray) -> tuple[int, int, Rule] | None:
    return feed(RunPolicy(PolicyConfig(), random_guess_loss=RGL), losses, grads, lrs=lrs)


def test_a_loss_or_grad_norm_of_exactly_zero_is_a_dead_stream() -> None:
    """Logs cannot see a zero: a frozen or zeroed network's gradients, a loss that underflowed."""
    losses, grads = stream(2000, 10, 0.1)
    grads[1200:] = 0.0
    patience = PolicyConfig().step_zero_patience
    assert first_alarm(losses, grads) == (1201 + patience - 1, 1201, Rule.STEP_ZERO)
    losses, grads = stream(2000, 10, 0.1)
    losses[1500:] = 0.0
    assert first_alarm(losses, grads) == (1501 + patience - 1, 1501, Rule.STEP_ZERO)


def test_a_moderate_persistent_rise_is_caught_with_an_onset_before_it() -> None:
    """The loss at 1.4 x its level for good (an LR x 10 that does not explode): below every spike gate, caught
    by the persistent-rise rule within its patience and the fast level's lag, onset named before the alarm."""
    losses, grads = stream(3000, 11, 0.15)
    losses[1800:] *= 1.4
    alarm = first_alarm(losses, grads)
    assert alarm is not None
    step, onset, rule = alarm
    assert rule is Rule.STEP_RISE
    config = PolicyConfig()
    assert step - onset <= verification_steps(config), "within the lag a trainer waits to vouch for a snapshot"
    assert abs(onset - 1801) <= 10, "within the margin a restore keeps before the onset (onset_margin_steps)"


@pytest.mark.parametrize("seed", range(3))
def test_a_stretch_of_easy_batches_neither_alarms_nor_blinds_the_spike_gate(seed: int) -> None:
    """200 trivially easy batches (a loss 100 x below the level) are left out of the level: the return to the
    real data is no spike, and a real spike after them is caught as fast as without them."""
    losses, grads = stream(3000, seed, 0.15)
    losses[1500:1700] = 0.01 * losses[1500:1700]
    assert first_alarm(losses, grads) is None
    losses[1750:] *= 6
    alarm = first_alarm(losses, grads)
    assert alarm is not None
    assert alarm[1:] == (1751, Rule.STEP_LOSS_SPIKE)
    assert alarm[0] == 1751 + PolicyConfig().step_loss_patience - 1


def test_a_fault_in_the_first_hundred_steps_is_caught() -> None:
    """The level follows a falling loss within tens of records: an LR x 100 at step 80, while the loss still
    falls fast, is caught within its patience."""
    losses, grads = stream(1000, 12, 0.1, start=6.0, end=1.0)
    losses[79:] *= 5
    alarm = first_alarm(losses, grads)
    assert alarm is not None
    assert alarm[1:] == (80, Rule.STEP_LOSS_SPIKE)


def test_pins_keep_the_state_as_of_their_step_and_a_restore_resumes_from_it() -> None:
    """A trainer pins the steps it may stage a snapshot at; publishing one keeps the detectors' state as of it,
    and a restore to it resumes from there: a fault that recurs right after the restore is caught as fast as
    the first time (no warm-up blind window)."""
    engine = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    losses, grads = stream(3000, 13, 0.1)
    assert feed(engine, losses[:1000], grads[:1000], pins=(500, 1000)) is None
    reference = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    feed(reference, losses[:500], grads[:500])
    assert engine.detector_pins.pin(0, 0, 500) == reference.detector_pins.step_states[0], (
        "the pin is the state after the record of step 500"
    )
    bad = losses[500:1000] * 6
    first = feed(engine, bad, grads[500:1000], first_step=501 + 500)  # on to step 1500: the fault at 1001
    assert first is not None
    delay = first[0] - first[1]
    assert engine.ledger.open is not None
    engine.on_command_result(engine.ledger.open.command.command_id, 0, True, 1, "", 1.0, restored_step=500)
    resumed = engine.detector_pins.step_states[0]
    assert (resumed.timeline, resumed.last_step, resumed.count) == (
        1,
        500,
        reference.detector_pins.step_states[0].count,
    ), "resumed from the pin, not re-warming"
    again = feed(engine, bad, grads[500:1000], first_step=501, timeline=1)  # the fault recurs at once
    assert again is not None
    assert again[1] == 501
    assert again[0] - again[1] <= delay, "caught as fast as the first occurrence"
    fresh = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    fresh.detector_pins.restore(0, 500, 1)  # no pin for step 500 here: afresh, warm-up included
    assert fresh.detector_pins.step_states[0].count == 0


def test_pins_and_the_ladder_survive_the_journal() -> None:
    engine = RunPolicy(PolicyConfig(), random_guess_loss=RGL)
    losses, grads = stream(600, 14, 0.1)
    feed(engine, losses, grads, pins=(250,))
    assert engine.detector_pins.pin(0, 0, 250) is not None
    again = RunPolicy.from_dict(engine.to_dict())
    assert again.detector_pins.pins == engine.detector_pins.pins
    assert again.detector_pins.candidates == {}, "candidates are runtime only"


def test_verification_steps_cover_every_rule_and_are_zero_for_the_seed_profile() -> None:
    config = PolicyConfig()
    assert verification_steps(config) >= max(
        config.step_loss_patience, config.step_collapse_patience, config.step_zero_patience, config.step_rise_patience
    )
    assert verification_steps(PolicyConfig(profile="seed")) == 0
