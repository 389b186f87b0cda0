"""Train-stream detectors of the default profile: a loss spike, a gradient blow-up or a collapse to the
random-guess loss, caught within steps instead of at the next validation.

Each rank's stream keeps exponentially weighted statistics of log(loss) and log(grad norm): a centre
and a scale (the mean absolute deviation from the centre), over about ``step_ema_steps`` records.
Logs make the rules scale-free (a loss of 0.1 and one of 5 are judged alike) and the scale makes them
as tolerant as the run is noisy: a batch-size-1 run, whose per-step loss varies tenfold, gets a gate
far above a smooth run's. Three rules, each judged only after ``step_warmup_steps`` records on the
timeline:

- **loss spike**: ``step_loss_patience`` consecutive records above the loss gate, which is the larger
  of ``step_loss_ratio`` × the centre's loss and the centre + ``step_loss_sigma`` scales (in log
  space). Consecutive, because one bad batch is noise; a learning rate ×100 or a run of corrupt
  batches lifts every following step. Onset: the first record of the run.
- **gradient blow-up**: one record whose grad norm is more than ``step_grad_ratio`` × the centre's
  (and above its centre + ``step_loss_sigma`` scales): one step with gradients ×1e4 wrecks the weights
  before any loss shows it. Onset: that record.
- **collapse**: ``step_collapse_patience`` consecutive records within the lobotomy band
  (|loss − RGL| < ``lobotomy_tolerance_ratio`` × RGL) while the centre was well below it
  (< ``lobotomy_mean_ratio`` × RGL). Onset: the first record of the run.

A batch is judged against the statistics from before it (so a vectorised pass needs no per-record
Python), then the statistics take in the batch's records that were not above the gate: a spike never
raises the gate that judges it. Warm-up (a falling loss) leaves the centre above the current loss,
which can only make the loss gate later, never a false alarm; an LR warm restart raises the loss a
little for many steps, which the ratio absorbs. A new timeline (after a restore), or steps that go
back (a restarted trainer), start afresh, warm-up included: the restored model's loss is that of an
older step, often well above the level the run had reached, and judging it against that level would
call the restore itself a spike (found by the simulation: a second rollback for one fault, and a
rollback after a trainer restart with none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Rule
from governor_daemon.policy.detectors import lobotomy_band_below

_TINY = 1e-12  # floor under a loss or grad norm before its log (a loss of exactly 0 stays judged)
_SCALE_FLOOR = 0.02  # floor of the log-space scale: a perfectly smooth stream still has a finite gate


@dataclass(frozen=True)
class StepState:
    """One rank's train-stream statistics on its current timeline (journaled with each batch)."""

    timeline: int = 0
    count: int = 0  # records taken into the statistics on this timeline
    loss_center: float = 0.0  # EWMA of log(loss)
    loss_scale: float = 0.0  # EWMA of |log(loss) - loss_center|
    grad_center: float = 0.0  # EWMA of log(grad norm)
    grad_scale: float = 0.0
    high_run: int = 0  # consecutive records above the loss gate, up to the last judged one
    high_since: int = -1  # the step where that run began
    collapse_run: int = 0
    collapse_since: int = -1
    last_step: int = -1  # the last record judged

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepState:
        """Inverse of ``as_dict``."""
        return cls(
            timeline=int(data["timeline"]),
            count=int(data["count"]),
            loss_center=float(data["loss_center"]),
            loss_scale=float(data["loss_scale"]),
            grad_center=float(data["grad_center"]),
            grad_scale=float(data["grad_scale"]),
            high_run=int(data["high_run"]),
            high_since=int(data["high_since"]),
            collapse_run=int(data["collapse_run"]),
            collapse_since=int(data["collapse_since"]),
            last_step=int(data.get("last_step", -1)),
        )


@dataclass(frozen=True)
class StepAlarm:
    """A train-stream detector fired at ``step``; ``onset_step`` is where it estimates the anomaly began."""

    rule: Rule
    step: int
    onset_step: int
    loss: float
    reason: str


def loss_gate(state: StepState, config: PolicyConfig) -> float | None:
    """The loss above which a record counts toward a spike (None during warm-up)."""
    if state.count < config.step_warmup_steps:
        return None
    scale = max(state.loss_scale, _SCALE_FLOOR)
    return math.exp(state.loss_center + max(math.log(config.step_loss_ratio), config.step_loss_sigma * scale))


def grad_gate(state: StepState, config: PolicyConfig) -> float | None:
    """The grad norm above which one record is a blow-up (None during warm-up)."""
    if state.count < config.step_warmup_steps:
        return None
    scale = max(state.grad_scale, _SCALE_FLOOR)
    return math.exp(state.grad_center + max(math.log(config.step_grad_ratio), config.step_loss_sigma * scale))


def _run_lengths(flags: npt.NDArray[np.bool_], carry: int) -> npt.NDArray[np.int64]:
    """Length of the run of True ending at each index (``carry`` True records before index 0)."""
    n = len(flags)
    index = np.arange(n)
    last_false = np.where(flags, -1, index)
    np.maximum.accumulate(last_false, out=last_false)
    runs = index - last_false
    first_false = int(np.argmin(flags)) if not flags.all() else n
    runs[:first_false] += carry
    return runs.astype(np.int64)


def judge_batch(
    state: StepState,
    timeline: int,
    steps: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    config: PolicyConfig,
    rgl: float | None,
    rank: int,
) -> tuple[StepState, StepAlarm | None]:
    """Judge one batch of finite records (in step order) against ``state``; returns the state after the
    batch and the first alarm, if any. Pure: ``state`` is not changed."""
    if timeline != state.timeline or (len(steps) and int(steps[0]) <= state.last_step):
        # A restore (a new timeline) or a restarted trainer (its steps went back): the level left behind
        # is not the restored model's.
        state = StepState(timeline=timeline)
    n = len(losses)
    if n == 0:
        return state, None
    log_loss = np.log(np.maximum(losses, _TINY))
    log_grad = np.log(np.maximum(grads, _TINY)) if grads is not None and len(grads) == n else None
    warm = state.count >= config.step_warmup_steps
    gate = loss_gate(state, config)
    high = log_loss > math.log(gate) if gate is not None else np.zeros(n, dtype=bool)
    high_runs = _run_lengths(high, state.high_run)
    collapse = np.zeros(n, dtype=bool)
    band = lobotomy_band_below(math.exp(state.loss_center), config, rgl) if warm else None
    if band is not None:  # the validation rule's band, around the running level of the train loss
        collapse = np.abs(losses - band.rgl) < band.tolerance
    collapse_runs = _run_lengths(collapse, state.collapse_run)
    blowup = np.zeros(n, dtype=bool)
    g_gate = grad_gate(state, config)
    if log_grad is not None and g_gate is not None:
        blowup = log_grad > math.log(g_gate)

    candidates = [
        (int(np.argmax(blowup)), Rule.STEP_GRAD_BLOWUP) if blowup.any() else None,
        (int(np.argmax(high_runs >= config.step_loss_patience)), Rule.STEP_LOSS_SPIKE)
        if warm and (high_runs >= config.step_loss_patience).any()
        else None,
        (int(np.argmax(collapse_runs >= config.step_collapse_patience)), Rule.STEP_COLLAPSE)
        if (collapse_runs >= config.step_collapse_patience).any()
        else None,
    ]
    fired = min((c for c in candidates if c is not None), default=None)
    alarm = None
    end = n  # records taken into the state: all, or those up to and including the alarm's
    if fired is not None:
        i, rule = fired
        alarm = _alarm(rule, i, state, steps, losses, grads, high_runs, collapse_runs, config, rgl, rank)
        end = i + 1
    return _updated(state, steps, log_loss, log_grad, high, high_runs, collapse, collapse_runs, end, config), alarm


def _alarm(
    rule: Rule,
    i: int,
    state: StepState,
    steps: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    high_runs: npt.NDArray[np.int64],
    collapse_runs: npt.NDArray[np.int64],
    config: PolicyConfig,
    rgl: float | None,
    rank: int,
) -> StepAlarm:
    step, loss = int(steps[i]), float(losses[i])
    typical = math.exp(state.loss_center)
    if rule is Rule.STEP_GRAD_BLOWUP:
        assert grads is not None
        grad, center = float(grads[i]), math.exp(state.grad_center)
        reason = (
            f"gradient blow-up: grad norm {grad:.4g} at step {step} is {grad / center:.3g} x its running level "
            f"{center:.4g} (gate {grad_gate(state, config):.4g}: {config.step_grad_ratio:g} x, or "
            f"+{config.step_loss_sigma:g} scales in log space) (rank {rank})"
        )
        return StepAlarm(rule, step, step, loss, reason)
    if rule is Rule.STEP_LOSS_SPIKE:
        onset = _run_start(steps, high_runs, i, state.high_since)
        reason = (
            f"train loss spike: {int(high_runs[i])} consecutive steps above the gate {loss_gate(state, config):.4g} "
            f"({config.step_loss_ratio:g} x the running level {typical:.4g}, or +{config.step_loss_sigma:g} scales "
            f"in log space), from step {onset} to {step}, loss now {loss:.4g} (rank {rank})"
        )
        return StepAlarm(rule, step, onset, loss, reason)
    assert rgl is not None
    onset = _run_start(steps, collapse_runs, i, state.collapse_since)
    reason = (
        f"collapse: {int(collapse_runs[i])} consecutive steps at the random-guess loss {rgl:.4g} "
        f"(within {config.lobotomy_tolerance_ratio:g} x) while the running level was {typical:.4g}, "
        f"from step {onset} to {step} (rank {rank})"
    )
    return StepAlarm(rule, step, onset, loss, reason)


def _run_start(steps: npt.NDArray[np.int64], runs: npt.NDArray[np.int64], i: int, carried_since: int) -> int:
    """The step where the run ending at index ``i`` began: in this batch, or ``carried_since`` when it began
    in an earlier one; -1 without a run."""
    run = int(runs[i])
    if run == 0:
        return -1
    return int(steps[i - run + 1]) if run <= i + 1 else carried_since


def _updated(
    state: StepState,
    steps: npt.NDArray[np.int64],
    log_loss: npt.NDArray[np.float64],
    log_grad: npt.NDArray[np.float64] | None,
    high: npt.NDArray[np.bool_],
    high_runs: npt.NDArray[np.int64],
    collapse: npt.NDArray[np.bool_],
    collapse_runs: npt.NDArray[np.int64],
    end: int,
    config: PolicyConfig,
) -> StepState:
    """The state after the first ``end`` records: runs carried over, statistics fed the records that were
    not above the gate (all of them before warm-up)."""
    last = end - 1
    keep = ~high[:end] & ~collapse[:end]
    x = log_loss[:end][keep]
    k = len(x)
    high_run = int(high_runs[last])
    collapse_run = int(collapse_runs[last])
    new = replace(
        state,
        last_step=int(steps[last]),
        high_run=high_run,
        high_since=_run_start(steps, high_runs, last, state.high_since),
        collapse_run=collapse_run,
        collapse_since=_run_start(steps, collapse_runs, last, state.collapse_since),
    )
    if k == 0:
        return new
    # Early on, a plain running mean (the first records set the level); then an EWMA over about
    # step_ema_steps records. k records at once weigh as k single updates would.
    alpha = 1.0 - (1.0 - 1.0 / config.step_ema_steps) ** k
    weight = max(alpha, k / (state.count + k))
    loss_center = state.loss_center + weight * (float(x.mean()) - state.loss_center)
    loss_scale = state.loss_scale + weight * (float(np.abs(x - loss_center).mean()) - state.loss_scale)
    grad_center, grad_scale = state.grad_center, state.grad_scale
    if log_grad is not None:
        g = log_grad[:end][keep]
        grad_center = grad_center + weight * (float(g.mean()) - grad_center)
        grad_scale = grad_scale + weight * (float(np.abs(g - grad_center).mean()) - grad_scale)
    return replace(
        new,
        count=state.count + k,
        loss_center=loss_center,
        loss_scale=loss_scale,
        grad_center=grad_center,
        grad_scale=grad_scale,
    )
