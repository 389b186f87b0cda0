"""Detector profiles: pure functions from (losses, detector state, config, RGL) to a judgement.

The ``seed`` profile is docs/protocol.md, "Policy", rule for rule. ``default`` adds a relative divergence
gate, chosen on the tuning half of the detection corpus. A detector never mutates its input state: it returns the state
to commit, and the engine decides whether to commit it (it does not while a command is open).

Every threshold has one home here (``seed_gates``, ``relative_gate``, ``lobotomy_band``, composed per
profile by ``gates``): the detectors judge with these functions and `governor audit plot` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Rule, Verdict


@dataclass(frozen=True)
class DetectorState:
    """The validation-loss history (oldest first) and the consecutive-anomaly counter."""

    history: tuple[float, ...] = ()
    consecutive: int = 0


@dataclass(frozen=True)
class Judgement:
    """What a detector concluded; ``state`` is the detector state to commit."""

    verdict: Verdict
    rule: Rule
    reason: str
    state: DetectorState
    appended: float | None


Detector = Callable[[Sequence[float], DetectorState, PolicyConfig, "float | None"], Judgement]

BLOW_UP_CEILING = 1e15
"""A loss or gradient norm whose magnitude is above this is judged as non-finite ones are: a blow-up (a PANIC
at once), never a number to average. So every statistic stays far inside a float (a history of 1.7e308
overflowed its sum, and every later validation of the run ended its stream INTERNAL)."""


def blown_up(value: float) -> bool:
    """Non-finite, or beyond ``BLOW_UP_CEILING``."""
    return not math.isfinite(value) or abs(value) > BLOW_UP_CEILING


def history_mean(values: Sequence[float]) -> float:
    """The mean of a loss history (the centre of the seed gates and of the lobotomy rule's premise)."""
    return math.fsum(values) / len(values)


def mean_and_pstdev(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (divides by n, not n - 1)."""
    mean = history_mean(values)
    variance = math.fsum((x - mean) ** 2 for x in values) / len(values)
    return mean, math.sqrt(variance)


def fmt(value: float) -> str:
    """Compact number formatting for reasons: 4 significant digits."""
    return f"{value:.4g}"


def is_warm(history: Sequence[float], config: PolicyConfig) -> bool:
    """True once the history holds ``min_history`` losses: the lobotomy and divergence rules judge from then."""
    return len(history) >= config.min_history


# Gate names: the keys of ``gates`` (and the audit plot's legend entries).
ABSOLUTE_GATE = "absolute"
SIGMA_GATE = "mean + k·σ"
MULTIPLIER_GATE = "k × mean"
RELATIVE_GATE = "relative"

GateFunction = Callable[[Sequence[float], PolicyConfig, "float | None"], dict[str, float]]


def seed_gates(history: Sequence[float], config: PolicyConfig) -> dict[str, float]:
    """The seed profile's three divergence gates for a warm ``history``: a loss is divergent above all three."""
    mean, sigma = mean_and_pstdev(history)
    return {
        ABSOLUTE_GATE: config.absolute_threshold,
        SIGMA_GATE: mean + config.sensitivity * sigma,
        MULTIPLIER_GATE: config.multiplier * mean,
    }


@dataclass(frozen=True)
class LobotomyBand:
    """The losses the lobotomy rule catches: within ``tolerance`` of the random-guess loss ``rgl``."""

    rgl: float
    tolerance: float

    def contains(self, loss: float) -> bool:
        """True if ``loss`` sits at the random guess."""
        return abs(loss - self.rgl) < self.tolerance


def lobotomy_band(history: Sequence[float], config: PolicyConfig, rgl: float | None) -> LobotomyBand | None:
    """The band the lobotomy rule judges the next validation loss against; None while the rule is off.

    The rule is on once the history is warm, the random-guess loss known and the history mean below
    ``lobotomy_mean_ratio`` × RGL (the model was learning); the band is |loss − RGL| <
    ``lobotomy_tolerance_ratio`` × RGL.
    """
    if not is_warm(history, config):
        return None
    return lobotomy_band_below(history_mean(history), config, rgl)


def lobotomy_band_below(level: float, config: PolicyConfig, rgl: float | None) -> LobotomyBand | None:
    """The lobotomy band for a run whose loss ``level`` (a history mean, or the train stream's running
    level) is below ``lobotomy_mean_ratio`` × RGL; None otherwise or without an RGL."""
    if rgl is None or not level < config.lobotomy_mean_ratio * rgl:
        return None
    return LobotomyBand(rgl, config.lobotomy_tolerance_ratio * rgl)


def seed_profile(
    losses: Sequence[float],
    state: DetectorState,
    config: PolicyConfig,
    rgl: float | None,
) -> Judgement:
    """Judge the validation losses of one step (one per rank) under the ``seed`` rules.

    Order: non-finite, lobotomy (once warm), warm-up, divergence on the maximum, normal. With several
    ranks, any non-finite loss triggers the non-finite rule, any loss in the lobotomy band the lobotomy
    rule, and only the maximum may enter the history.
    """
    if not losses:
        raise ValueError("seed_profile needs at least one loss")
    return (
        _non_finite(losses, state)
        or _lobotomy(losses, state, config, rgl)
        or _warm_up(max(losses), state, config)
        or _against_seed_gates(max(losses), state, config, rgl)
    )


def _non_finite(losses: Sequence[float], state: DetectorState) -> Judgement | None:
    """The non-finite rule: a PANIC for the first loss that is non-finite or blown up."""
    bad = [x for x in losses if blown_up(x)]
    if not bad:
        return None
    beyond = "" if not math.isfinite(bad[0]) else f" (beyond the ceiling {BLOW_UP_CEILING:g}: a blow-up)"
    return Judgement(Verdict.PANIC, Rule.NON_FINITE, f"non-finite: validation loss {bad[0]}{beyond}", state, None)


def _lobotomy(
    losses: Sequence[float], state: DetectorState, config: PolicyConfig, rgl: float | None
) -> Judgement | None:
    """The lobotomy rule: a PANIC for the first loss in the band at the random guess (``lobotomy_band``)."""
    history = state.history
    band = lobotomy_band(history, config, rgl)
    if band is None:
        return None
    loss = next((x for x in losses if band.contains(x)), None)
    if loss is None:
        return None
    reason = (
        f"lobotomy: loss {fmt(loss)} within {fmt(band.tolerance)} "
        f"of random-guess {fmt(band.rgl)}, history mean {fmt(history_mean(history))} < "
        f"{fmt(config.lobotomy_mean_ratio)}×RGL ({fmt(config.lobotomy_mean_ratio * band.rgl)})"
    )
    return Judgement(Verdict.PANIC, Rule.LOBOTOMY, reason, state, None)


def _warm_up(loss: float, state: DetectorState, config: PolicyConfig) -> Judgement | None:
    """Warm-up: while the history is short, the loss enters it unjudged."""
    if is_warm(state.history, config):
        return None
    new_history = _append(state.history, loss, config.history_window)
    reason = f"warm-up: {len(new_history)}/{config.min_history} losses in history"
    return Judgement(Verdict.HEALTHY, Rule.WARMUP, reason, DetectorState(new_history, 0), loss)


def _against_seed_gates(loss: float, state: DetectorState, config: PolicyConfig, rgl: float | None) -> Judgement:
    """A warm history: the loss is divergent above all three seed gates (an ANOMALY, a PANIC once
    ``min_panics_before_rollback`` in a row), normal otherwise (it enters the history)."""
    history = state.history
    seed = seed_gates(history, config)
    sigma_gate, mult_gate = seed[SIGMA_GATE], seed[MULTIPLIER_GATE]
    if all(loss > gate for gate in seed.values()):
        consecutive = state.consecutive + 1
        need = config.min_panics_before_rollback
        reason = (
            f"divergence: loss {fmt(loss)} > abs {fmt(config.absolute_threshold)}, "
            f"> mean {fmt(history_mean(history))} + {fmt(config.sensitivity)}σ ({fmt(sigma_gate)}), "
            f"> {fmt(config.multiplier)}×mean ({fmt(mult_gate)}); {consecutive}/{need} consecutive"
        )
        verdict = Verdict.PANIC if consecutive >= need else Verdict.ANOMALY
        return Judgement(verdict, Rule.DIVERGENCE, reason, DetectorState(history, consecutive), None)
    new_history = _append(history, loss, config.history_window)
    lobotomy_note = "" if rgl is not None else "; lobotomy rule off (no random-guess loss)"
    return Judgement(
        Verdict.HEALTHY,
        Rule.NORMAL,
        f"normal: loss {fmt(loss)} within gates (abs {fmt(config.absolute_threshold)}, "
        f"mean+{fmt(config.sensitivity)}σ {fmt(sigma_gate)}, {fmt(config.multiplier)}×mean {fmt(mult_gate)})"
        + lobotomy_note,
        DetectorState(new_history, 0),
        loss,
    )


def _append(history: tuple[float, ...], loss: float, window: int) -> tuple[float, ...]:
    return (*history, loss)[-window:]


RELATIVE_RECENT = 5
"""The relative gate compares with the minimum of this many most recent accepted losses."""
RELATIVE_RATIO = 2.0
RELATIVE_MARGIN_RGL = 0.02
"""The relative gate's margin, as a fraction of the random-guess loss (0 when the RGL is unknown)."""


def relative_baseline(history: Sequence[float]) -> float:
    """The relative gate's baseline: the minimum of the last RELATIVE_RECENT accepted losses."""
    return min(history[-RELATIVE_RECENT:])


def relative_margin(rgl: float | None) -> float:
    """The relative gate's margin: RELATIVE_MARGIN_RGL × RGL, 0 when the RGL is unknown."""
    return RELATIVE_MARGIN_RGL * rgl if rgl is not None else 0.0


def relative_gate(history: Sequence[float], rgl: float | None) -> float | None:
    """The default profile's relative gate for a warm ``history``; None while it is off.

    RELATIVE_RATIO × ``relative_baseline`` + ``relative_margin``. It judges only a fresh rise, so it is
    off while the last accepted loss is itself above it (see ``default_profile``).
    """
    gate = RELATIVE_RATIO * relative_baseline(history) + relative_margin(rgl)
    return None if history[-1] > gate else gate


def default_gates(history: Sequence[float], config: PolicyConfig, rgl: float | None) -> dict[str, float]:
    """The default profile's divergence gates for a warm ``history``: the seed's three, plus the relative
    gate while it is on (a loss is divergent above all three seed gates, or above the relative gate)."""
    result = seed_gates(history, config)
    relative = relative_gate(history, rgl)
    if relative is not None:
        result[RELATIVE_GATE] = relative
    return result


def default_profile(
    losses: Sequence[float],
    state: DetectorState,
    config: PolicyConfig,
    rgl: float | None,
) -> Judgement:
    """The default profile: the ``seed`` rules plus a relative divergence gate for moderate spikes.

    Designed on the tuning half of the detection corpus (tests/benchmarks/corpus) and evaluated on the
    other half (tests/benchmarks/RESULTS.md).

    A loss is divergent under the seed's triple gate, or when it exceeds RELATIVE_RATIO x the minimum of
    the last RELATIVE_RECENT accepted losses + RELATIVE_MARGIN_RGL x RGL: a loss at 0.1 jumping to 0.7 or
    an LM at 0.6 jumping to 2.9 is caught although it stays below the absolute gate. The relative gate
    judges only a fresh rise: when the last accepted loss is itself above the gate, the run got there
    while it was judged normal (during warm-up, say), its last-known-good snapshot is no better than
    now, and a rollback would not help; the seed's rules still judge it. Anomalies count towards
    min_panics_before_rollback exactly as in ``seed``.
    """
    judgement = seed_profile(losses, state, config, rgl)
    if judgement.rule is not Rule.NORMAL:
        return judgement
    history = state.history
    gate = relative_gate(history, rgl)
    loss = max(losses)
    if gate is None or loss <= gate:
        return judgement
    baseline, margin = relative_baseline(history), relative_margin(rgl)
    consecutive = state.consecutive + 1
    need = config.min_panics_before_rollback
    reason = (
        f"divergence: loss {fmt(loss)} > {fmt(RELATIVE_RATIO)}×recent min ({fmt(baseline)}) + "
        f"{fmt(margin)} = {fmt(gate)}; {consecutive}/{need} consecutive"
    )
    verdict = Verdict.PANIC if consecutive >= need else Verdict.ANOMALY
    return Judgement(verdict, Rule.DIVERGENCE, reason, DetectorState(history, consecutive), None)


PROFILE_DETECTORS: dict[str, Detector] = {
    "seed": seed_profile,
    "default": default_profile,
}


def detector_for(profile: str) -> Detector:
    """The detector of a profile name (already validated by PolicyConfig)."""
    return PROFILE_DETECTORS[profile]


PROFILE_GATES: dict[str, GateFunction] = {
    "seed": lambda history, config, rgl: seed_gates(history, config),
    "default": default_gates,
}


def gates(history: Sequence[float], config: PolicyConfig, rgl: float | None) -> dict[str, float]:
    """The divergence gates of ``config.profile`` that judge the next validation loss, by name ({} during
    warm-up, when no gate judges). Built from the functions the detectors judge with (``seed_gates``,
    ``relative_gate``), so that `governor audit plot` draws exactly the thresholds that were applied."""
    if not is_warm(history, config):
        return {}
    return PROFILE_GATES[config.profile](history, config, rgl)
