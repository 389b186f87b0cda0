"""Detector profiles: pure functions from (losses, detector state, config, RGL) to a judgement.

The ``seed`` profile is docs/protocol.md, "Policy", rule for rule. ``default`` adds a relative divergence
gate, chosen on the tuning half of the detection corpus. A detector never mutates its input state: it returns the state
to commit, and the engine decides whether to commit it (it does not while a command is open).
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


def mean_and_pstdev(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (divides by n, not n - 1)."""
    n = len(values)
    mean = math.fsum(values) / n
    variance = math.fsum((x - mean) ** 2 for x in values) / n
    return mean, math.sqrt(variance)


def fmt(value: float) -> str:
    """Compact number formatting for reasons: 4 significant digits."""
    return f"{value:.4g}"


def in_lobotomy_band(loss: float, history: Sequence[float], config: PolicyConfig, rgl: float) -> bool:
    """True if the model was learning (mean well below RGL) and ``loss`` sits at the random guess."""
    mean = math.fsum(history) / len(history)
    return mean < config.lobotomy_mean_ratio * rgl and abs(loss - rgl) < config.lobotomy_tolerance_ratio * rgl


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
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
        return Judgement(
            Verdict.PANIC,
            Rule.NON_FINITE,
            f"non-finite: validation loss {bad[0]}",
            state,
            None,
        )
    history = state.history
    warm = len(history) >= config.min_history
    if warm and rgl is not None:
        for loss in losses:
            if in_lobotomy_band(loss, history, config, rgl):
                mean = math.fsum(history) / len(history)
                return Judgement(
                    Verdict.PANIC,
                    Rule.LOBOTOMY,
                    f"lobotomy: loss {fmt(loss)} within {fmt(config.lobotomy_tolerance_ratio * rgl)} "
                    f"of random-guess {fmt(rgl)}, history mean {fmt(mean)} < "
                    f"{fmt(config.lobotomy_mean_ratio)}×RGL ({fmt(config.lobotomy_mean_ratio * rgl)})",
                    state,
                    None,
                )
    loss = max(losses)
    if not warm:
        new_history = _append(history, loss, config.history_window)
        return Judgement(
            Verdict.HEALTHY,
            Rule.WARMUP,
            f"warm-up: {len(new_history)}/{config.min_history} losses in history",
            DetectorState(new_history, 0),
            loss,
        )
    mean, sigma = mean_and_pstdev(history)
    sigma_gate = mean + config.sensitivity * sigma
    mult_gate = config.multiplier * mean
    if loss > config.absolute_threshold and loss > sigma_gate and loss > mult_gate:
        consecutive = state.consecutive + 1
        need = config.min_panics_before_rollback
        reason = (
            f"divergence: loss {fmt(loss)} > abs {fmt(config.absolute_threshold)}, "
            f"> mean {fmt(mean)} + {fmt(config.sensitivity)}σ ({fmt(sigma_gate)}), "
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
    baseline = min(history[-RELATIVE_RECENT:])
    margin = RELATIVE_MARGIN_RGL * rgl if rgl is not None else 0.0
    gate = RELATIVE_RATIO * baseline + margin
    loss = max(losses)
    if loss <= gate or history[-1] > gate:
        return judgement
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
