"""Hypothesis properties of the policy (docs/protocol.md, "Policy")."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from governor_daemon.policy import PROFILES, DetectorState, PolicyConfig, RunPolicy, Verdict, seed_profile
from governor_daemon.policy.decisions import Rule
from governor_daemon.policy.detectors import (
    ABSOLUTE_GATE,
    MULTIPLIER_GATE,
    RELATIVE_GATE,
    SIGMA_GATE,
    detector_for,
    gates,
    lobotomy_band,
)

# Losses that mix healthy values, spikes, collapses to ln(10) and non-finite values.
losses = st.one_of(
    st.floats(min_value=0.01, max_value=3.0),
    st.floats(min_value=10.0, max_value=1e4),
    st.just(math.log(10)),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
traces = st.lists(losses, min_size=1, max_size=60)


def run_trace(trace: list[float], config: PolicyConfig, num_classes: int | None = 10) -> list:
    """Feed a trace through a single-rank run, completing every command at once (as replay does)."""
    policy = RunPolicy(config, num_classes=num_classes)
    out = []
    for step, loss in enumerate(trace):
        decision = policy.judge_validation(policy.timeline, step, {0: loss}, float(step))
        out.append((decision, policy.validation.detector))
        if decision.command is not None:
            cmd = decision.command
            if cmd.kind == "halt":
                policy.on_command_result(cmd.command_id, 0, True, policy.timeline, "", float(step))
                cmd = policy.resume("test", float(step))
            policy.on_command_result(cmd.command_id, 0, True, policy.timeline + 1, "", float(step))
    return out


@settings(max_examples=300, deadline=None)
@given(trace=traces, exponent=st.integers(min_value=-8, max_value=8))
def test_scale_invariance(trace: list[float], exponent: int) -> None:
    """Scaling losses, absolute_threshold and RGL by c > 0 leaves every decision unchanged.

    c is a power of two, so scaling is exact in floating point and the property is tested without
    rounding noise at the strict comparisons.
    """
    c = 2.0**exponent
    base = PolicyConfig(random_guess_loss=math.log(10))
    scaled = PolicyConfig(absolute_threshold=base.absolute_threshold * c, random_guess_loss=math.log(10) * c)
    a = run_trace(trace, base)
    b = run_trace([x * c for x in trace], scaled)
    assert [(d.verdict, d.action, d.rule) for d, _ in a] == [(d.verdict, d.action, d.rule) for d, _ in b]


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(st.floats(min_value=0.01, max_value=50.0), min_size=10, max_size=20),
    x=st.floats(min_value=0.0, max_value=1e6),
    delta=st.floats(min_value=0.0, max_value=1e6),
)
def test_divergence_is_monotone(history: list[float], x: float, delta: float) -> None:
    """If x is a divergence anomaly, so is every x' > x."""
    state = DetectorState(tuple(history))
    first = seed_profile([x], state, PolicyConfig(), None)
    assume(first.rule is Rule.DIVERGENCE)
    assert seed_profile([x + delta], state, PolicyConfig(), None).rule is Rule.DIVERGENCE


@settings(max_examples=300, deadline=None)
@given(trace=traces, window=st.integers(min_value=10, max_value=25))
def test_history_invariants(trace: list[float], window: int) -> None:
    """The history never holds a non-finite, lobotomy or anomalous value, nor more than history_window."""
    config = PolicyConfig(history_window=window)
    for decision, detector in run_trace(trace, config):
        assert len(detector.history) <= window
        assert all(math.isfinite(x) for x in detector.history)
        if decision.verdict is not Verdict.HEALTHY:
            assert decision.appended is None
        else:
            assert decision.appended == max(decision.losses)


@settings(max_examples=200, deadline=None)
@given(
    # Within 1.5x of each other: normal under every profile (the default's relative gate is 2x the recent min).
    warm=st.lists(st.floats(min_value=1.0, max_value=1.5), min_size=10, max_size=20),
    m=st.integers(min_value=1, max_value=6),
    spike=st.floats(min_value=100.0, max_value=1e5),
)
def test_m_consecutive_anomalies_panic_at_mth(warm: list[float], m: int, spike: float) -> None:
    """After warm-up, m consecutive divergences give m-1 ANOMALY then PANIC exactly at the m-th."""
    config = PolicyConfig(min_panics_before_rollback=m)
    verdicts = [d.verdict for d, _ in run_trace([*warm, *([spike] * m)], config, num_classes=None)]
    assert verdicts[len(warm) :] == [Verdict.ANOMALY] * (m - 1) + [Verdict.PANIC]


@settings(max_examples=200, deadline=None)
@given(
    # Within 1.5x of each other: normal under every profile (the default's relative gate is 2x the recent min).
    warm=st.lists(st.floats(min_value=1.0, max_value=1.5), min_size=10, max_size=20),
    m=st.integers(min_value=2, max_value=6),
    k=st.integers(min_value=1, max_value=5),
    spike=st.floats(min_value=100.0, max_value=1e5),
)
def test_one_normal_loss_resets_counter(warm: list[float], m: int, k: int, spike: float) -> None:
    """k < m anomalies, one normal loss, then m-1 anomalies never PANIC."""
    assume(k < m)
    config = PolicyConfig(min_panics_before_rollback=m)
    trace = [*warm, *([spike] * k), 1.0, *([spike] * (m - 1))]
    results = run_trace(trace, config, num_classes=None)
    assert results[len(warm) + k][1].consecutive == 0
    assert all(d.verdict is not Verdict.PANIC for d, _ in results)


@settings(max_examples=400, deadline=None)
@given(
    history=st.lists(st.floats(min_value=0.01, max_value=3.0), min_size=10, max_size=20),
    profile=st.sampled_from(PROFILES),
    rgl=st.sampled_from([None, math.log(10)]),
    pick=st.integers(min_value=0, max_value=4),
    nudge=st.sampled_from([-1, 0, 1]),
    free=st.floats(min_value=0.01, max_value=1e4),
)
def test_gates_are_the_detectors_thresholds(
    history: list[float], profile: str, rgl: float | None, pick: int, nudge: int, free: float
) -> None:
    """``gates`` (what the audit plot draws) is exactly where each profile's detector turns divergent: a loss
    is divergent above all three seed gates, or above the default profile's relative gate while it is on.
    Losses are drawn at, just below and just above each gate, or anywhere."""
    config = PolicyConfig(profile=profile)
    thresholds = gates(history, config, rgl)
    expected = {ABSOLUTE_GATE, SIGMA_GATE, MULTIPLIER_GATE}
    assert set(thresholds) - {RELATIVE_GATE} == expected
    assert profile == "default" or RELATIVE_GATE not in thresholds
    values = sorted(thresholds.values())
    if pick < len(values):
        loss = math.nextafter(values[pick], nudge * math.inf) if nudge else values[pick]
    else:
        loss = free
    band = lobotomy_band(history, config, rgl)
    assume(loss > 0 and (band is None or not band.contains(loss)))
    judgement = detector_for(profile)([loss], DetectorState(tuple(history)), config, rgl)
    seed = [thresholds[name] for name in expected]
    divergent = all(loss > x for x in seed) or loss > thresholds.get(RELATIVE_GATE, math.inf)
    assert (judgement.rule is Rule.DIVERGENCE) == divergent, (thresholds, loss, judgement.reason)


def test_no_gates_during_warm_up() -> None:
    """Before min_history losses no divergence gate judges (the detectors answer warm-up)."""
    config = PolicyConfig()
    assert gates([0.5] * (config.min_history - 1), config, math.log(10)) == {}
    assert lobotomy_band([0.5] * (config.min_history - 1), config, math.log(10)) is None
