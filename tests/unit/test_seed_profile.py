"""The seed profile's rules at and around every boundary (docs/protocol.md, "Policy")."""

from __future__ import annotations

import math

import pytest

from governor_daemon.policy import DetectorState, PolicyConfig, Rule, Verdict, seed_profile

# Ten losses with mean exactly 2.0 and population σ exactly 1.0 (sample σ would be 1.054).
WARM = DetectorState(history=(1.0,) * 5 + (3.0,) * 5)


def judge(loss: float, config: PolicyConfig | None = None, state: DetectorState = WARM, rgl: float | None = None):
    return seed_profile([loss], state, config or PolicyConfig(), rgl)


def test_absolute_gate_is_strict() -> None:
    """A loss equal to absolute_threshold is normal; just above it is an anomaly."""
    assert judge(10.0).verdict is Verdict.HEALTHY
    assert judge(math.nextafter(10.0, math.inf)).verdict is Verdict.ANOMALY
    assert judge(9.999).verdict is Verdict.HEALTHY


def test_sigma_gate_is_strict() -> None:
    """With the other gates open, mean + 6σ = 8.0 exactly: 8.0 is normal, above is an anomaly."""
    config = PolicyConfig(absolute_threshold=0.0, multiplier=1.0)
    assert judge(8.0, config).verdict is Verdict.HEALTHY
    assert judge(math.nextafter(8.0, math.inf), config).verdict is Verdict.ANOMALY
    assert judge(7.99, config).verdict is Verdict.HEALTHY


def test_multiplier_gate_is_strict() -> None:
    """With the other gates open, 3 × mean = 6.0 exactly: 6.0 is normal, above is an anomaly."""
    config = PolicyConfig(absolute_threshold=0.0, sensitivity=0.0)
    assert judge(6.0, config).verdict is Verdict.HEALTHY
    assert judge(math.nextafter(6.0, math.inf), config).verdict is Verdict.ANOMALY
    assert judge(5.99, config).verdict is Verdict.HEALTHY


def test_all_three_gates_must_open() -> None:
    """Above two gates but not the third is normal (triple gate)."""
    # Above the sigma gate (8) and multiplier gate (6) but not the absolute gate (10).
    assert judge(9.0).verdict is Verdict.HEALTHY
    # Above the absolute gate (0.5) and the sigma gate (8) but not the multiplier gate (5 × 2 = 10).
    assert judge(9.0, PolicyConfig(absolute_threshold=0.5, multiplier=5.0)).verdict is Verdict.HEALTHY


def test_population_sigma_not_sample_sigma() -> None:
    """8.1 exceeds mean + 6 × population σ (8.0) but not mean + 6 × sample σ (8.32)."""
    config = PolicyConfig(absolute_threshold=0.0, multiplier=1.0)
    result = judge(8.1, config)
    assert result.verdict is Verdict.ANOMALY, result.reason


def test_divergence_reason_names_rule_and_numbers() -> None:
    """The reason names the rule, each gate's number and the consecutive count."""
    reason = judge(31.2).reason
    assert reason == "divergence: loss 31.2 > abs 10, > mean 2 + 6σ (8), > 3×mean (6); 1/2 consecutive"


def test_warmup_boundary() -> None:
    """The 10th loss is still warm-up (appended); the 11th is judged."""
    state = DetectorState(history=(1.0,) * 9)
    tenth = judge(1000.0, state=state)
    assert (tenth.verdict, tenth.rule) == (Verdict.HEALTHY, Rule.WARMUP)
    assert tenth.appended == 1000.0
    assert len(tenth.state.history) == 10
    eleventh = judge(1000.0, state=DetectorState(history=(1.0,) * 10))
    assert eleventh.verdict is Verdict.ANOMALY


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("history_len", [0, 3, 10])
def test_non_finite_panics_at_any_time(bad: float, history_len: int) -> None:
    """NaN, +Inf and -Inf are a PANIC before and after warm-up, never appended, never counted."""
    state = DetectorState(history=(1.0,) * history_len, consecutive=1)
    result = judge(bad, state=state)
    assert (result.verdict, result.rule) == (Verdict.PANIC, Rule.NON_FINITE)
    assert result.appended is None
    assert result.state == state


def test_anomaly_not_appended_and_counter_increments() -> None:
    """An anomaly increments the counter and leaves the history alone."""
    result = judge(50.0)
    assert result.state.history == WARM.history
    assert result.state.consecutive == 1
    assert result.appended is None


def test_panic_at_min_panics_before_rollback() -> None:
    """The counter reaching min_panics_before_rollback makes a PANIC."""
    assert judge(50.0, state=DetectorState(WARM.history, 1)).verdict is Verdict.PANIC
    config = PolicyConfig(min_panics_before_rollback=3)
    assert judge(50.0, config, DetectorState(WARM.history, 1)).verdict is Verdict.ANOMALY
    assert judge(50.0, config, DetectorState(WARM.history, 2)).verdict is Verdict.PANIC


def test_normal_loss_resets_counter_and_is_appended() -> None:
    """A normal loss resets the counter to 0 and enters the history (oldest dropped at the window)."""
    result = judge(2.5, state=DetectorState(WARM.history, 1))
    assert result.state.consecutive == 0
    assert result.state.history[-1] == 2.5
    full = DetectorState(history=tuple(float(i) for i in range(20)))
    assert judge(5.0, state=full).state.history == (*tuple(float(i) for i in range(1, 20)), 5.0)


class TestLobotomy:
    """Collapse to the random-guess loss, once the history is warm."""

    # History mean 0.25 < 0.5 × RGL(1.0); band half-width 0.125 (exact in binary).
    CONFIG = PolicyConfig(lobotomy_mean_ratio=0.5, lobotomy_tolerance_ratio=0.125)
    STATE = DetectorState(history=(0.25,) * 10)

    def test_inside_band_panics(self) -> None:
        """A loss within the band of a learning model is a lobotomy PANIC."""
        result = judge(1.05, self.CONFIG, self.STATE, rgl=1.0)
        assert (result.verdict, result.rule) == (Verdict.PANIC, Rule.LOBOTOMY)
        assert result.appended is None
        assert result.state == self.STATE
        assert "random-guess 1" in result.reason

    def test_band_edges_are_strict(self) -> None:
        """|loss - RGL| equal to the tolerance is outside the band."""
        assert judge(1.125, self.CONFIG, self.STATE, rgl=1.0).verdict is Verdict.HEALTHY
        assert judge(0.875, self.CONFIG, self.STATE, rgl=1.0).verdict is Verdict.HEALTHY
        assert judge(1.12, self.CONFIG, self.STATE, rgl=1.0).rule is Rule.LOBOTOMY
        assert judge(0.88, self.CONFIG, self.STATE, rgl=1.0).rule is Rule.LOBOTOMY

    def test_mean_gate_is_strict(self) -> None:
        """A history mean equal to lobotomy_mean_ratio × RGL does not enable the rule."""
        state = DetectorState(history=(0.5,) * 10)
        assert judge(1.0, self.CONFIG, state, rgl=1.0).verdict is Verdict.HEALTHY
        below = DetectorState(history=(0.49,) * 10)
        assert judge(1.0, self.CONFIG, below, rgl=1.0).rule is Rule.LOBOTOMY

    def test_not_before_warmup(self) -> None:
        """With fewer than min_history losses, a loss at RGL is warm-up."""
        state = DetectorState(history=(0.25,) * 9)
        assert judge(1.0, self.CONFIG, state, rgl=1.0).rule is Rule.WARMUP

    def test_off_without_rgl(self) -> None:
        """Without any random-guess loss the rule is off and the reason says so."""
        result = judge(1.0, self.CONFIG, self.STATE, rgl=None)
        assert result.verdict is Verdict.HEALTHY
        assert "lobotomy rule off" in result.reason

    def test_lobotomy_before_divergence(self) -> None:
        """A loss in the band is judged lobotomy even when the gates would call it divergent."""
        config = PolicyConfig(absolute_threshold=0.0, lobotomy_mean_ratio=0.5, lobotomy_tolerance_ratio=0.125)
        state = DetectorState(history=(0.25,) * 10)
        assert judge(1.0, config, state, rgl=1.0).rule is Rule.LOBOTOMY


class TestMultiRank:
    """Aggregation of one step's losses from several ranks."""

    def test_any_non_finite(self) -> None:
        """One NaN among the ranks triggers the non-finite rule."""
        result = seed_profile([1.0, math.nan], WARM, PolicyConfig(), None)
        assert result.rule is Rule.NON_FINITE

    def test_any_in_lobotomy_band(self) -> None:
        """One rank at the random guess triggers lobotomy even if another is normal."""
        state = DetectorState(history=(0.25,) * 10)
        config = PolicyConfig(lobotomy_mean_ratio=0.5, lobotomy_tolerance_ratio=0.125)
        assert seed_profile([0.2, 1.0], state, config, 1.0).rule is Rule.LOBOTOMY

    def test_divergence_on_maximum_and_only_maximum_appended(self) -> None:
        """Divergence is judged on the max; a healthy step appends the max alone."""
        assert seed_profile([1.0, 50.0], WARM, PolicyConfig(), None).verdict is Verdict.ANOMALY
        healthy = seed_profile([1.5, 2.5], WARM, PolicyConfig(), None)
        assert healthy.appended == 2.5
        assert healthy.state.history == (*WARM.history, 2.5)


class TestDefaultProfile:
    """The default profile: the seed's rules plus the relative gate."""

    # Recent minimum 0.1 (last five of the history); gate = 2 x 0.1 + 0.02 x RGL.
    STATE = DetectorState(history=(1.0, 0.8, 0.6, 0.4, 0.3, 0.1, 0.12, 0.11, 0.1, 0.13))

    def test_moderate_spike_is_an_anomaly_that_seed_misses(self) -> None:
        """0.1 -> 0.7 stays under seed's absolute gate of 10 but crosses the relative gate."""
        from governor_daemon.policy.detectors import default_profile

        assert seed_profile([0.7], self.STATE, PolicyConfig(), 1.0).verdict is Verdict.HEALTHY
        result = default_profile([0.7], self.STATE, PolicyConfig(), 1.0)
        assert (result.verdict, result.rule) == (Verdict.ANOMALY, Rule.DIVERGENCE)
        assert result.reason == "divergence: loss 0.7 > 2×recent min (0.1) + 0.02 = 0.22; 1/2 consecutive"
        assert result.appended is None

    def test_relative_gate_is_strict_and_scaled_by_rgl(self) -> None:
        """Equal to the gate is normal; just above is an anomaly; without an RGL the margin is 0."""
        from governor_daemon.policy.detectors import default_profile

        gate = 2 * 0.1 + 0.02 * 2.0
        assert default_profile([gate], self.STATE, PolicyConfig(), 2.0).verdict is Verdict.HEALTHY
        above = math.nextafter(gate, math.inf)
        assert default_profile([above], self.STATE, PolicyConfig(), 2.0).verdict is Verdict.ANOMALY
        assert default_profile([0.2], self.STATE, PolicyConfig(), None).verdict is Verdict.HEALTHY
        assert default_profile([0.21], self.STATE, PolicyConfig(), None).verdict is Verdict.ANOMALY

    def test_second_consecutive_relative_anomaly_panics(self) -> None:
        """Relative anomalies count towards min_panics_before_rollback like the seed's."""
        from governor_daemon.policy.detectors import default_profile

        first = default_profile([0.7], self.STATE, PolicyConfig(), 1.0)
        second = default_profile([0.7], first.state, PolicyConfig(), 1.0)
        assert second.verdict is Verdict.PANIC
        assert "2/2 consecutive" in second.reason

    def test_only_a_fresh_rise_trips_the_relative_gate(self) -> None:
        """A run that climbed while judged normal (here during warm-up: 0.1 -> 2.8) has its last accepted loss
        above the gate; a rollback would restore a snapshot no better than now, so only the seed's rules judge
        it. The same loss after a low last accepted loss is an anomaly."""
        from governor_daemon.policy.detectors import default_profile

        climbed = DetectorState(history=(1.0, 0.8, 0.6, 0.4, 0.3, 0.1, 0.9, 1.6, 2.5, 2.8))
        assert default_profile([2.8], climbed, PolicyConfig(), 3.26).verdict is Verdict.HEALTHY
        assert default_profile([2.8], self.STATE, PolicyConfig(), 3.26).verdict is Verdict.ANOMALY
