"""Train-stream detectors of the default profile: a loss spike, a persistent rise, a gradient blow-up, a
learning-rate jump, a dead stream and a collapse to the random-guess loss, caught within steps instead of
at the next validation.

Each rank's stream keeps exponentially weighted statistics of log(loss) and log(grad norm). Logs make
the rules scale-free (a loss of 0.1 and one of 5 are judged alike). The statistics:

- the **level**: a slow centre (over about ``step_ema_steps`` records) and a fast one (over about
  ``FAST_STEPS``); the gates stand on the lower of the two, so that the level follows a falling loss
  (early training) within tens of records instead of hundreds;
- the **scale**: the typical step-to-step change of log(loss) (the mean absolute difference between
  consecutive records, over √2), which is the batch noise and not the trend: a falling loss does not
  widen the gates, and a batch-size-1 run, whose per-step loss varies tenfold, gets gates far above a
  smooth run's;
- the **floor**: the lowest the slow centre reached, rising back by at most ``log(step_rise_ratio)``
  per ``FLOOR_RELAX_EMAS`` × ``step_ema_steps`` records (a reference that a slow rise cannot drag up);
- the highest learning rate the run used.

Rules, each judged only after ``step_warmup_steps`` records (the learning-rate rule from the first):

- **loss spike**: ``step_loss_patience`` consecutive records above the loss gate, the larger of
  ``step_loss_ratio`` × the level and the level + ``step_loss_sigma`` scales. Consecutive, because one
  bad batch is noise; a learning rate ×100 or a run of corrupt batches lifts every following step.
  Onset: the first record of the run.
- **persistent rise**: the fast centre above the rise gate (``step_rise_ratio`` × the floor, or more
  when the stream is so noisy that the fast centre itself wanders that far) for ``step_rise_patience``
  consecutive records: a learning rate ×10, a slow LR ramp or slow label noise that lifts the loss by a
  third for hundreds of steps, below every spike gate. Onset: the first record of the run, less the
  fast centre's lag (``FAST_STEPS``).
- **gradient blow-up**: one record whose grad norm is more than ``step_grad_ratio`` × its level (and
  above its level + ``step_loss_sigma`` scales): one step with gradients ×1e4 wrecks the weights before
  any loss shows it. Onset: that record.
- **learning-rate jump**: one record whose learning rate is more than ``step_lr_ratio`` × the highest
  the run used before it. Warm-ups rise by at most ×2 per step, warm restarts return to a peak already
  used, decays fall: a jump past every earlier peak is a bug (a schedule computed from the wrong step,
  a unit error). Onset: that record.
- **dead stream**: ``step_zero_patience`` consecutive records whose loss or grad norm is exactly 0 while
  its level was not: logs cannot see a zero (a frozen or zeroed network, a loss that underflows after a
  blow-up).
- **collapse**: ``step_collapse_patience`` consecutive records within the lobotomy band
  (|loss − RGL| < ``lobotomy_tolerance_ratio`` × RGL) while the level was well below it
  (< ``lobotomy_mean_ratio`` × RGL). Onset: the first record of the run.

A batch is judged against the statistics from before it (so a vectorised pass needs no per-record
Python; the fast centre of the rise rule is computed per record in closed form), then the statistics
take in the batch's records that were neither above the loss gate nor far below the level (by the same
margin): a spike never raises the gate that judges it, and a stretch of trivially easy batches (a loss far
below the level) never drags the level down and leaves the gates blind after it, nor makes the return to
the real data look like a spike. Lows that last longer than the stream is old (at least ``2 × FAST_STEPS``,
at most ``LOW_REBASE_EMAS`` × ``step_ema_steps`` records) are a new level and are taken in: a young run that
learns fast follows itself soon.

The state is journaled, and the daemon keeps it as of every snapshot a trainer may restore ("pins"): a
restore resumes the detectors from the state at the restored step (``DetectorPins.restore``), so a
fault that recurs right after a restore is caught as fast as the first time. A stream without such a
state (the initial snapshot, a restarted trainer whose steps went back) starts afresh, warm-up included.
Every rule's alarm comes at most ``verification_steps`` records after the onset it names, which is what
lets a trainer vouch for a snapshot (docs/protocol.md, "Train-stream verification").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from governor_daemon.policy.config import PolicyConfig
from governor_daemon.policy.decisions import Rule
from governor_daemon.policy.detectors import lobotomy_band_below

_TINY = 1e-12  # floor under a loss or grad norm before its log
_SCALE_FLOOR = 0.02  # floor of the log-space scale: a perfectly smooth stream still has a finite gate
_MAD_PER_DIFF = 1.0 / math.sqrt(2.0)  # E|x - y| = √2 × E|x - centre| for independent noise
FAST_STEPS = 8
"""Records the fast centre averages over: it follows a falling loss and shows a rise within tens of steps."""
_FAST_ALPHA = 1.0 / FAST_STEPS
_FAST_NOISE = math.sqrt(_FAST_ALPHA / (2.0 - _FAST_ALPHA)) * 1.25
"""The fast centre's own wander, in scales (its standard deviation over a record's, times σ per MAD)."""
FLOOR_RELAX_EMAS = 4
LOW_REBASE_EMAS = 4
EARLY_WINDOW_FRACTION = 4
"""Until a stream has seen ``EARLY_WINDOW_FRACTION`` × ``step_ema_steps`` records, its slow centre averages over
the last quarter of them."""
MATURE_EMAS = 2
"""A stream is mature after ``MATURE_EMAS`` × ``step_ema_steps`` records: its level is then the slow centre
alone. Before, it is the lower of the slow and the fast centre: early training falls fast, and the gates
follow it."""
RISE_MARGIN_RGL = 0.05
"""The rise gate is at least the floor + this fraction of the random-guess loss: a train loss of 0.03 that
climbs to 0.1 late in a run (overfitting's noise) is judged no rise."""
ZERO_LOSS_LEVEL = 1e-4
ZERO_GRAD_LEVEL = 1e-8
"""The dead-stream rule judges a zero only while its level is above these (a converged loss may reach 0)."""


@dataclass(frozen=True)
class StepState:
    """One rank's train-stream statistics (journaled with each batch, and pinned for snapshots)."""

    timeline: int = 0
    count: int = 0  # records taken into the statistics
    loss_center: float = 0.0  # slow EWMA of log(loss)
    loss_scale: float = 0.0  # EWMA of |Δ log(loss)| / √2 between consecutive kept records
    grad_center: float = 0.0  # EWMA of log(grad norm)
    grad_scale: float = 0.0
    high_run: int = 0  # consecutive records above the loss gate, up to the last judged one
    high_since: int = -1  # the step where that run began
    collapse_run: int = 0
    collapse_since: int = -1
    last_step: int = -1  # the last record judged
    loss_fast: float = 0.0  # fast EWMA of log(loss), over about FAST_STEPS records
    loss_floor: float = 0.0  # the lowest the slow centre reached, relaxing slowly
    last_kept: float | None = None  # log(loss) of the last record taken in (for the next difference)
    grad_last_kept: float | None = None
    lr_max: float = 0.0  # the highest learning rate seen (0: none yet)
    rise_run: int = 0
    rise_since: int = -1
    zero_run: int = 0
    zero_since: int = -1
    low_run: int = 0  # consecutive records far below the level, not taken in

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (journaled with every batch: built by hand, ``dataclasses.asdict`` is slow)."""
        return {name: getattr(self, name) for name in _STEP_STATE_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepState:
        """Inverse of ``as_dict`` (fields a journal written before them lacks take their defaults)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            raw = data[f.name]
            default = f.default
            if raw is None:
                values[f.name] = None
            elif isinstance(default, int) and not isinstance(default, bool):
                values[f.name] = int(raw)
            else:
                values[f.name] = float(raw)
        return cls(**values)

    def resumed(self, timeline: int, step: int) -> StepState:
        """This state (pinned at ``step``) as the start of ``timeline``: the statistics and the highest
        learning rate carry over, every run of records starts afresh."""
        return replace(
            self,
            timeline=timeline,
            last_step=step,
            high_run=0,
            high_since=-1,
            collapse_run=0,
            collapse_since=-1,
            rise_run=0,
            rise_since=-1,
            zero_run=0,
            zero_since=-1,
            low_run=0,
        )


_STEP_STATE_FIELDS = tuple(f.name for f in fields(StepState))


@dataclass(frozen=True)
class StepAlarm:
    """A train-stream detector fired at ``step``; ``onset_step`` is where it estimates the anomaly began."""

    rule: Rule
    step: int
    onset_step: int
    loss: float
    reason: str


def verification_steps(config: PolicyConfig) -> int:
    """The longest delay between an alarm's onset and the alarm (0 under the seed profile, whose only
    train rule judges each record on its own): a snapshot at step S is vouched for once the records up to
    S + this were judged without an alarm."""
    if config.profile != "default":
        return 0
    return max(
        config.step_loss_patience,
        config.step_collapse_patience,
        config.step_zero_patience,
        config.step_rise_patience + FAST_STEPS,
    )


def _warm(state: StepState, config: PolicyConfig) -> bool:
    return state.count >= config.step_warmup_steps


def _rebase_after(state: StepState, config: PolicyConfig) -> int:
    """Consecutive records far below the level after which they are the new level: as many as the stream
    has seen (at least ``2 × FAST_STEPS``, at most ``LOW_REBASE_EMAS`` × ``step_ema_steps``). A young run that
    learns fast rebases soon; a mature one keeps its level through hundreds of easy batches."""
    return int(min(LOW_REBASE_EMAS * config.step_ema_steps, max(2 * FAST_STEPS, state.count)))


def _mature(state: StepState, config: PolicyConfig) -> bool:
    return state.count >= MATURE_EMAS * config.step_ema_steps


def _level(state: StepState, config: PolicyConfig) -> float:
    """The log level the gates stand on: the slow centre of a mature stream; before, the lower of the slow
    and the fast centre (which follows a falling loss)."""
    return state.loss_center if _mature(state, config) else min(state.loss_center, state.loss_fast)


def _margin(state: StepState, config: PolicyConfig) -> float:
    return max(math.log(config.step_loss_ratio), config.step_loss_sigma * max(state.loss_scale, _SCALE_FLOOR))


def loss_gate(state: StepState, config: PolicyConfig) -> float | None:
    """The loss above which a record counts toward a spike (None during warm-up)."""
    if not _warm(state, config):
        return None
    return math.exp(_level(state, config) + _margin(state, config))


def low_gate(state: StepState, config: PolicyConfig) -> float | None:
    """The loss below which a record is far below the level and not taken into the statistics (None
    during warm-up)."""
    if not _warm(state, config):
        return None
    return math.exp(_level(state, config) - _margin(state, config))


def rise_gate(state: StepState, config: PolicyConfig, rgl: float | None = None) -> float | None:
    """The loss above which the fast centre counts toward a persistent rise (None during warm-up): the
    floor times ``step_rise_ratio`` (or more, as far as the fast centre wanders on its own), and at least the
    floor + ``RISE_MARGIN_RGL`` × RGL (a tiny loss tripling is no rise worth a rollback)."""
    if not _warm(state, config):
        return None
    wander = config.step_loss_sigma * _FAST_NOISE * max(state.loss_scale, _SCALE_FLOOR)
    gate = math.exp(state.loss_floor + max(math.log(config.step_rise_ratio), wander))
    return max(gate, math.exp(state.loss_floor) + (0.0 if rgl is None else RISE_MARGIN_RGL * rgl))


def grad_gate(state: StepState, config: PolicyConfig) -> float | None:
    """The grad norm above which one record is a blow-up (None during warm-up)."""
    if not _warm(state, config):
        return None
    scale = max(state.grad_scale, _SCALE_FLOOR)
    return math.exp(state.grad_center + max(math.log(config.step_grad_ratio), config.step_loss_sigma * scale))


def _run_lengths(flags: npt.NDArray[np.bool_], carry: int) -> npt.NDArray[np.int64]:
    """Length of the run of True ending at each index (``carry`` True records before index 0)."""
    n = len(flags)
    if not flags.any():
        return np.zeros(n, dtype=np.int64)
    index = np.arange(n)
    last_false = np.where(flags, -1, index)
    np.maximum.accumulate(last_false, out=last_false)
    runs = index - last_false
    first_false = int(np.argmin(flags)) if not flags.all() else n
    runs[:first_false] += carry
    return runs.astype(np.int64)


def _ewma_path(x: npt.NDArray[np.float64], start: float, alpha: float) -> npt.NDArray[np.float64]:
    """y_i = (1 − alpha) y_{i−1} + alpha x_i with y_{−1} = ``start``, in closed form over blocks short
    enough that the weights stay well inside float64."""
    out = np.empty(len(x), dtype=np.float64)
    decay = 1.0 - alpha
    block = 256
    powers = decay ** np.arange(1, block + 1, dtype=np.float64)  # decay^(i+1)
    inverse = decay ** -np.arange(block, dtype=np.float64)  # decay^(-j)
    prev = start
    for lo in range(0, len(x), block):
        part = x[lo : lo + block]
        n = len(part)
        acc = np.cumsum(part * inverse[:n])
        # y_i = decay^(i+1) prev + alpha Σ_{j<=i} decay^(i-j) x_j = decay^(i+1) prev + alpha decay^i Σ x_j decay^-j
        out[lo : lo + n] = powers[:n] * prev + alpha * (powers[:n] / decay) * acc
        prev = float(out[lo + n - 1])
    return out


@dataclass(frozen=True)
class _Flags:
    """Per-record facts of one batch, against the state from before it."""

    log_loss: npt.NDArray[np.float64]
    log_grad: npt.NDArray[np.float64] | None
    high: npt.NDArray[np.bool_]
    low: npt.NDArray[np.bool_]
    collapse: npt.NDArray[np.bool_]
    zero: npt.NDArray[np.bool_]
    rise: npt.NDArray[np.bool_]
    blowup: npt.NDArray[np.bool_]
    lr_jump: npt.NDArray[np.bool_]
    high_runs: npt.NDArray[np.int64]
    collapse_runs: npt.NDArray[np.int64]
    zero_runs: npt.NDArray[np.int64]
    rise_runs: npt.NDArray[np.int64]
    low_runs: npt.NDArray[np.int64]


def _flags(
    state: StepState,
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    lrs: npt.NDArray[np.float64] | None,
    config: PolicyConfig,
    rgl: float | None,
) -> _Flags:
    n = len(losses)
    none = np.zeros(n, dtype=bool)
    log_loss = np.log(np.maximum(losses, _TINY))
    log_grad = np.log(np.maximum(grads, _TINY)) if grads is not None else None
    warm = _warm(state, config)
    high = low = collapse = zero = rise = blowup = none
    if warm:
        margin = _margin(state, config)
        level = _level(state, config)
        high = log_loss > level + margin
        low = log_loss < level - margin
        band = lobotomy_band_below(math.exp(level), config, rgl)
        if band is not None:  # the validation rule's band, around the running level of the train loss
            collapse = np.abs(losses - band.rgl) < band.tolerance
        zero = (losses == 0.0) & (state.loss_center > math.log(ZERO_LOSS_LEVEL))
        if grads is not None and state.grad_center > math.log(ZERO_GRAD_LEVEL):
            zero = zero | (grads == 0.0)
        gate = rise_gate(state, config, rgl)
        assert gate is not None
        fast = _ewma_path(np.minimum(log_loss, level + margin), state.loss_fast, _FAST_ALPHA)
        rise = fast > math.log(gate)
        g_gate = grad_gate(state, config)
        if log_grad is not None and g_gate is not None:
            blowup = log_grad > math.log(g_gate)
    lr_jump = none
    if lrs is not None:
        earlier = np.maximum.accumulate(np.concatenate(([state.lr_max], lrs[:-1])))
        lr_jump = (earlier > 0) & (lrs > config.step_lr_ratio * earlier) & np.isfinite(lrs)
    return _Flags(
        log_loss,
        log_grad,
        high,
        low & ~zero,
        collapse,
        zero,
        rise,
        blowup,
        lr_jump,
        _run_lengths(high, state.high_run),
        _run_lengths(collapse, state.collapse_run),
        _run_lengths(zero, state.zero_run),
        _run_lengths(rise, state.rise_run),
        _run_lengths(low & ~zero, state.low_run),
    )


def judge_batch(
    state: StepState,
    timeline: int,
    steps: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    config: PolicyConfig,
    rgl: float | None,
    rank: int,
    lrs: npt.NDArray[np.float64] | None = None,
) -> tuple[StepState, StepAlarm | None]:
    """Judge one batch of finite records (in step order) against ``state``; returns the state after the
    batch (up to and including the alarm's record) and the first alarm, if any. Pure: ``state`` is not
    changed."""
    if timeline != state.timeline or (len(steps) and int(steps[0]) <= state.last_step):
        # A new timeline without a pinned state, or a restarted trainer (its steps went back): the level
        # left behind is not the restored model's.
        state = StepState(timeline=timeline)
    n = len(losses)
    if n == 0:
        return state, None
    f = _flags(state, losses, grads, lrs, config, rgl)
    patience = (
        (f.high_runs, config.step_loss_patience, Rule.STEP_LOSS_SPIKE),
        (f.collapse_runs, config.step_collapse_patience, Rule.STEP_COLLAPSE),
        (f.zero_runs, config.step_zero_patience, Rule.STEP_ZERO),
        (f.rise_runs, config.step_rise_patience, Rule.STEP_RISE),
    )
    candidates = [
        (int(np.argmax(f.lr_jump)), 0, Rule.STEP_LR_JUMP) if f.lr_jump.any() else None,
        (int(np.argmax(f.blowup)), 1, Rule.STEP_GRAD_BLOWUP) if f.blowup.any() else None,
        *(
            (int(np.argmax(runs >= need)), 2 + k, rule) if (runs >= need).any() else None
            for k, (runs, need, rule) in enumerate(patience)
        ),
    ]
    fired = min((c for c in candidates if c is not None), default=None)
    alarm = None
    end = n  # records taken into the state: all, or those up to and including the alarm's
    if fired is not None:
        i, _, rule = fired
        alarm = _ALARMS[rule](_Fired(i, state, steps, losses, grads, lrs, f, config, rgl, rank))
        end = i + 1
    return _updated(state, steps, f, lrs, end, config), alarm


def judge_pinned(
    state: StepState,
    timeline: int,
    steps: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grads: npt.NDArray[np.float64] | None,
    config: PolicyConfig,
    rgl: float | None,
    rank: int,
    lrs: npt.NDArray[np.float64] | None,
    pins: Sequence[int],
) -> tuple[StepState, StepAlarm | None, list[tuple[int, StepState]]]:
    """``judge_batch`` split at the ``pins`` (steps): also returns the state as of each pin (after the
    record of that step, or the state before the batch for a pin before its first record), up to the
    alarm."""
    pinned: list[tuple[int, StepState]] = []
    lo = 0
    for pin in sorted(set(pins)):
        cut = int(np.searchsorted(steps, pin, side="right"))
        if cut > lo:
            state, alarm = judge_batch(
                state,
                timeline,
                steps[lo:cut],
                losses[lo:cut],
                None if grads is None else grads[lo:cut],
                config,
                rgl,
                rank,
                None if lrs is None else lrs[lo:cut],
            )
            lo = cut
            if alarm is not None:
                return state, alarm, pinned
        pinned.append((pin, state if state.timeline == timeline else StepState(timeline=timeline)))
    if lo < len(steps):
        state, alarm = judge_batch(
            state,
            timeline,
            steps[lo:],
            losses[lo:],
            None if grads is None else grads[lo:],
            config,
            rgl,
            rank,
            None if lrs is None else lrs[lo:],
        )
        return state, alarm, pinned
    return state, None, pinned


@dataclass(frozen=True)
class _Fired:
    """A batch whose record ``i`` fired a rule: what the alarm's reason reads (the state the batch was judged
    against, its records and flags)."""

    i: int
    state: StepState
    steps: npt.NDArray[np.int64]
    losses: npt.NDArray[np.float64]
    grads: npt.NDArray[np.float64] | None
    lrs: npt.NDArray[np.float64] | None
    f: _Flags
    config: PolicyConfig
    rgl: float | None
    rank: int

    @property
    def step(self) -> int:
        return int(self.steps[self.i])

    @property
    def loss(self) -> float:
        return float(self.losses[self.i])

    def typical(self) -> float:
        """The running level of the train loss before the batch."""
        return math.exp(_level(self.state, self.config))

    def run_start(self, runs: npt.NDArray[np.int64], carried_since: int) -> int:
        """The step where the run of ``runs`` ending at the fired record began (``_run_start``)."""
        return _run_start(self.steps, runs, self.i, carried_since)


def _lr_jump_alarm(b: _Fired) -> StepAlarm:
    assert b.lrs is not None
    lr, step = float(b.lrs[b.i]), b.step
    before = max(b.state.lr_max, float(b.lrs[: b.i].max()) if b.i else 0.0)
    reason = (
        f"learning-rate jump: lr {lr:.4g} at step {step} is {lr / before:.3g} x the highest the run used "
        f"before ({before:.4g}; gate {b.config.step_lr_ratio:g} x): no schedule explains it (rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_LR_JUMP, step, step, b.loss, reason)


def _grad_blowup_alarm(b: _Fired) -> StepAlarm:
    assert b.grads is not None
    state, config, step = b.state, b.config, b.step
    grad, center = float(b.grads[b.i]), math.exp(state.grad_center)
    reason = (
        f"gradient blow-up: grad norm {grad:.4g} at step {step} is {grad / center:.3g} x its running level "
        f"{center:.4g} (gate {grad_gate(state, config):.4g}: {config.step_grad_ratio:g} x, or "
        f"+{config.step_loss_sigma:g} scales in log space) (rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_GRAD_BLOWUP, step, step, b.loss, reason)


def _loss_spike_alarm(b: _Fired) -> StepAlarm:
    state, config, step, loss = b.state, b.config, b.step, b.loss
    onset = b.run_start(b.f.high_runs, state.high_since)
    reason = (
        f"train loss spike: {int(b.f.high_runs[b.i])} consecutive steps above the gate "
        f"{loss_gate(state, config):.4g} ({config.step_loss_ratio:g} x the running level {b.typical():.4g}, or "
        f"+{config.step_loss_sigma:g} scales in log space), from step {onset} to {step}, loss now {loss:.4g} "
        f"(rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_LOSS_SPIKE, step, onset, loss, reason)


def _rise_alarm(b: _Fired) -> StepAlarm:
    state, config, step, loss = b.state, b.config, b.step, b.loss
    start = b.run_start(b.f.rise_runs, state.rise_since)
    onset = max(start - FAST_STEPS, step - verification_steps(config), 0)
    reason = (
        f"persistent rise: the short-term train loss level stayed above {rise_gate(state, config, b.rgl):.4g} "
        f"({config.step_rise_ratio:g} x the lowest level reached, {math.exp(state.loss_floor):.4g}) for "
        f"{int(b.f.rise_runs[b.i])} consecutive steps, from step {start} to {step}, loss now {loss:.4g}; "
        f"onset estimated at step {onset} (rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_RISE, step, onset, loss, reason)


def _zero_alarm(b: _Fired) -> StepAlarm:
    step, loss = b.step, b.loss
    onset = b.run_start(b.f.zero_runs, b.state.zero_since)
    what = "loss" if loss == 0.0 else "grad norm"
    reason = (
        f"dead stream: {int(b.f.zero_runs[b.i])} consecutive steps with a {what} of exactly 0 while the running "
        f"level was {b.typical():.4g}, from step {onset} to {step} (rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_ZERO, step, onset, loss, reason)


def _collapse_alarm(b: _Fired) -> StepAlarm:
    assert b.rgl is not None
    step = b.step
    onset = b.run_start(b.f.collapse_runs, b.state.collapse_since)
    reason = (
        f"collapse: {int(b.f.collapse_runs[b.i])} consecutive steps at the random-guess loss {b.rgl:.4g} "
        f"(within {b.config.lobotomy_tolerance_ratio:g} x) while the running level was {b.typical():.4g}, "
        f"from step {onset} to {step} (rank {b.rank})"
    )
    return StepAlarm(Rule.STEP_COLLAPSE, step, onset, b.loss, reason)


_ALARMS: dict[Rule, Callable[[_Fired], StepAlarm]] = {
    Rule.STEP_LR_JUMP: _lr_jump_alarm,
    Rule.STEP_GRAD_BLOWUP: _grad_blowup_alarm,
    Rule.STEP_LOSS_SPIKE: _loss_spike_alarm,
    Rule.STEP_RISE: _rise_alarm,
    Rule.STEP_ZERO: _zero_alarm,
    Rule.STEP_COLLAPSE: _collapse_alarm,
}
"""Each train-stream rule's alarm: its step, the onset it estimates and its reason."""


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
    f: _Flags,
    lrs: npt.NDArray[np.float64] | None,
    end: int,
    config: PolicyConfig,
) -> StepState:
    """The state after the first ``end`` records: runs carried over, statistics fed the records that were
    neither above the gate, far below the level nor zero (all of them before warm-up)."""
    last = end - 1
    lows = f.low[:end]
    rebase = int(f.low_runs[last]) >= _rebase_after(state, config)
    keep = ~f.high[:end] & ~f.zero[:end] & (~lows | rebase)
    values = dict(state.__dict__)  # one constructor call at the end: dataclasses.replace is slow per batch
    values.update(_runs_after(state, steps, f, last, rebase))
    if lrs is not None:
        values["lr_max"] = _lr_max_after(state.lr_max, lrs[:end], f.lr_jump[:end])
    x = f.log_loss[:end][keep]
    if len(x):
        values.update(_fed(state, x, None if f.log_grad is None else f.log_grad[:end][keep], rebase, config))
    return StepState(**values)


def _runs_after(state: StepState, steps: npt.NDArray[np.int64], f: _Flags, last: int, rebase: bool) -> dict[str, int]:
    """The rules' runs as of record ``last``, and where each began (a run may go on in the next batch)."""
    return {
        "last_step": int(steps[last]),
        "high_run": int(f.high_runs[last]),
        "high_since": _run_start(steps, f.high_runs, last, state.high_since),
        "collapse_run": int(f.collapse_runs[last]),
        "collapse_since": _run_start(steps, f.collapse_runs, last, state.collapse_since),
        "zero_run": int(f.zero_runs[last]),
        "zero_since": _run_start(steps, f.zero_runs, last, state.zero_since),
        "rise_run": int(f.rise_runs[last]),
        "rise_since": _run_start(steps, f.rise_runs, last, state.rise_since),
        "low_run": 0 if rebase else int(f.low_runs[last]),
    }


def _lr_max_after(lr_max: float, lrs: npt.NDArray[np.float64], jumps: npt.NDArray[np.bool_]) -> float:
    """The highest learning rate seen, over the finite ones that were no jump."""
    clean = lrs[~jumps & np.isfinite(lrs)]
    return max(lr_max, float(clean.max())) if len(clean) else lr_max


def _fed(
    state: StepState,
    x: npt.NDArray[np.float64],
    g: npt.NDArray[np.float64] | None,
    rebase: bool,
    config: PolicyConfig,
) -> dict[str, Any]:
    """The statistics after the kept records' log losses ``x`` (and log grad norms ``g``): the centres, the
    scales and the floor; a ``rebase`` restarts the level at the last of them."""
    # An EWMA over a window that grows with the records seen (a quarter of them: the first records set the
    # level, and a falling loss is followed closely while the run is young) up to step_ema_steps. k records
    # at once weigh as k single updates would.
    k = len(x)
    window = min(float(config.step_ema_steps), max(1.0, (state.count + k) / EARLY_WINDOW_FRACTION))
    weight = 1.0 if state.count == 0 else 1.0 - (1.0 - 1.0 / window) ** k
    fast_weight = 1.0 if state.count == 0 else 1.0 - (1.0 - 1.0 / min(window, FAST_STEPS)) ** k
    mean = float(x.mean())
    loss_center = state.loss_center + weight * (mean - state.loss_center)
    loss_fast = state.loss_fast + fast_weight * (mean - state.loss_fast)
    loss_scale, last_kept = _scale(state.loss_scale, state.last_kept, x, weight, state.count)
    grad_center, grad_scale, grad_last = state.grad_center, state.grad_scale, state.grad_last_kept
    if g is not None:
        grad_center = grad_center + weight * (float(g.mean()) - grad_center)
        grad_scale, grad_last = _scale(grad_scale, grad_last, g, weight, state.count)
    floor = _floor(state, loss_center, loss_fast, loss_scale, k, config)
    if rebase:
        loss_center, loss_fast, floor = float(x[-1]), float(x[-1]), float(x[-1])
    return {
        "count": state.count + k,
        "loss_center": loss_center,
        "loss_fast": loss_fast,
        "loss_scale": loss_scale,
        "loss_floor": floor,
        "last_kept": last_kept,
        "grad_center": grad_center,
        "grad_scale": grad_scale,
        "grad_last_kept": grad_last,
    }


def _floor(
    state: StepState, loss_center: float, loss_fast: float, loss_scale: float, k: int, config: PolicyConfig
) -> float:
    """The lowest level reached after ``k`` more records (relaxing slowly upwards): the slow centre's, or the
    fast centre's once the stream is warm (it shows the real minimum of a falling loss that the slow centre
    lags above)."""
    relax = math.log(config.step_rise_ratio) * k / (FLOOR_RELAX_EMAS * config.step_ema_steps)
    wander = config.step_loss_sigma * _FAST_NOISE * max(loss_scale, _SCALE_FLOOR)  # a dip of the fast centre
    lowest = min(loss_center, loss_fast + wander) if state.count + k >= config.step_warmup_steps else loss_center
    young = state.count == 0 or state.count + k < config.step_warmup_steps
    return lowest if young else min(lowest, state.loss_floor + relax)


def _scale(
    scale: float, last: float | None, x: npt.NDArray[np.float64], weight: float, count: int
) -> tuple[float, float]:
    """The noise scale after the kept values ``x`` (weighed as the centre is): the EWMA of their
    step-to-step differences (from the last kept value before them), and the new last kept value."""
    chain = x if last is None else np.concatenate(([last], x))
    if len(chain) < 2:
        return scale, float(x[-1])
    diffs = float(np.abs(np.diff(chain)).mean()) * _MAD_PER_DIFF
    return (diffs if count == 0 else scale + weight * (diffs - scale)), float(x[-1])


def pinned_states_to_json(pins: Sequence[tuple[int, int, StepState]]) -> list[dict[str, Any]]:
    """Pinned detector states (timeline, step, state) as journaled."""
    return [{"timeline": t, "step": s, "state": state.as_dict()} for t, s, state in pins]


def pinned_states_from_json(items: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, StepState]]:
    """Inverse of ``pinned_states_to_json``."""
    return [(int(i["timeline"]), int(i["step"]), StepState.from_dict(i["state"])) for i in items]
