"""Labels (computed from each trace) and the detector comparison, on both corpora: the epoch-level one
(build.py, index.json) and the step-level one (steps.py, steps_index.json).

Epoch-level labels (docs/protocol.md, "Benchmark budgets and corpus labels"). Catastrophic: a fault, the
run was learning before onset (last validation loss < 0.6 x RGL) and within 3 epochs of onset the
validation loss is non-finite or >= 2 x the minimum of the last 5 pre-onset losses + 0.05. Healthy: no
fault and, after epoch 5, never above 2 x its running minimum + 0.05 and never back to >= 0.9 x RGL.

Step-level labels, from the train loss. The smoothed loss at a step is the median of the last SMOOTH
train losses (a single noisy batch is no excursion); an excursion at a step against a level L is a
non-finite train loss there, or a smoothed loss >= min(2 x L, 0.9 x RGL) (doubled, or collapsed to about
random guessing). Catastrophic: a fault, the run was learning before onset (L, the median of the LEVEL
train losses before the onset step, < 0.6 x RGL) and either an excursion against L within WINDOW steps
from the onset step, or a persistent rise: the smoothed loss (a non-finite loss counting as above) >=
RISE x L for at least PERSIST consecutive steps, starting within PERSIST_WITHIN steps from the onset
step. Healthy: no fault and no excursion after step HEALTHY_AFTER (past the LR warm-up and the first
descent), each step against the median of the LEVEL train losses before its smoothing window.
A stretch of easy batches (steps.py's easy_stretch and easy_then_spike: the index's easy_start and
easy_steps) is no fault, and its losses, on other data, are no level: they are left out of every
level (the LEVEL losses are the last LEVEL outside the stretch) and its steps are not checked for
excursions. easy_stretch runs are runs without a fault.

Everything else is ambiguous: its alarms are reported, not judged. A catastrophic trace is caught iff
the first ROLLBACK or HALT comes at or after onset (earlier is an early alarm, a false one); delays are
counted from the onset step (the epoch corpus: the first step of the onset epoch) to the alarm's step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor_daemon.offline.replay import replay
from governor_daemon.offline.trace import parse_record
from governor_daemon.policy import CommandKind

HERE = Path(__file__).resolve().parent
CORPORA = {"epochs": (HERE / "index.json", HERE / "traces"), "steps": (HERE / "steps_index.json", HERE / "step_traces")}
"""Per corpus: its index and its traces folder."""
SMOOTH = 9
LEVEL = 50
WINDOW = 100
HEALTHY_AFTER = 200
RISE = 1.25
PERSIST = 100
PERSIST_WITHIN = 300
NO_FAULT = ("none", "easy_stretch")
"""Step-level runs without a fault: healthy, and easy_stretch (easy batches, then normal data again)."""


@dataclass
class Trace:
    """One corpus trace with its facts."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def val(self) -> list[tuple[int, float]]:
        return [(int(r["epoch"]), _f(r["loss"])) for r in self.records if r["kind"] == "validation"]

    @property
    def train(self) -> list[tuple[int, float]]:
        return [(int(r["epoch"]), _f(r["loss"])) for r in self.records if r["kind"] == "train"]

    @property
    def train_steps(self) -> list[tuple[int, int, float, float | None]]:
        """Train records in order: (epoch, step, loss, grad norm or None)."""
        return [
            (int(r["epoch"]), int(r["step"]), _f(r["loss"]), None if r.get("grad_norm") is None else _f(r["grad_norm"]))
            for r in self.records
            if r["kind"] == "train"
        ]

    @property
    def rgl(self) -> float:
        first = next(r for r in self.records if r["kind"] == "validation")
        return (
            float(first["random_guess_loss"]) if "random_guess_loss" in first else math.log(int(first["num_classes"]))
        )

    @property
    def onset_step(self) -> int:
        """The fault's first step: recorded (step corpus), or the first train step of the onset epoch."""
        if "onset_step" in self.meta:
            return int(self.meta["onset_step"])
        onset = int(self.meta["onset_epoch"])
        return next(step for epoch, step, _, _ in self.train_steps if epoch >= onset)


def _f(value: Any) -> float:
    """A trace loss: a number or "nan"/"inf"/"-inf" (float() reads both)."""
    return float(value)


def load(split: str | None = None, corpus: str = "epochs") -> list[Trace]:
    """Every trace of a corpus (or of one split of it)."""
    index_path, traces = CORPORA[corpus]
    out = []
    for meta in json.loads(index_path.read_text()):
        if split is not None and meta["split"] != split:
            continue
        with gzip.open(traces / meta["file"], "rt") as f:
            out.append(Trace(meta, [json.loads(line) for line in f]))
    return out


def built(corpus: str) -> bool:
    """Whether `make corpus` has written this corpus's index."""
    return CORPORA[corpus][0].exists()


def label(trace: Trace) -> str:
    """catastrophic, healthy or ambiguous."""
    val = dict(trace.val)
    rgl = trace.rgl
    onset = int(trace.meta["onset_epoch"])
    if trace.meta["fault"] != "none":
        before = [val[e] for e in sorted(val) if e < onset]
        if not before or not before[-1] < 0.6 * rgl:
            return "ambiguous"
        bound = 2 * min(before[-5:]) + 0.05
        after = [val[e] for e in range(onset, onset + 3) if e in val]
        if any(not math.isfinite(x) or x >= bound for x in after):
            return "catastrophic"
        return "ambiguous"
    running = math.inf
    for epoch in sorted(val):
        loss = val[epoch]
        if epoch > 5 and (not math.isfinite(loss) or loss > 2 * running + 0.05 or loss >= 0.9 * rgl):
            return "ambiguous"
        running = min(running, loss)
    return "healthy"


def step_label(trace: Trace) -> str:
    """catastrophic, healthy or ambiguous, from the train loss (the step-level rule in the module docstring)."""
    losses = [loss for _, _, loss, _ in trace.train_steps]
    steps = [step for _, step, _, _ in trace.train_steps]
    rgl = trace.rgl
    easy_start = int(trace.meta.get("easy_start", 0))
    easy = range(easy_start, easy_start + int(trace.meta.get("easy_steps", 0)))

    def smoothed(i: int) -> float:
        return statistics.median(x if math.isfinite(x) else math.inf for x in losses[max(0, i - SMOOTH + 1) : i + 1])

    def excursion(i: int, level: float) -> bool:
        return not math.isfinite(losses[i]) or smoothed(i) >= min(2 * level, 0.9 * rgl)

    def level_before(i: int) -> list[float]:
        """The last LEVEL train losses before index i, outside the easy stretch."""
        if not easy:
            return losses[max(0, i - LEVEL) : i]
        return [x for j, x in enumerate(losses[:i]) if steps[j] not in easy][-LEVEL:]

    if easy:
        # Easy data that the model first finds hard (a repeated character is nothing like text: its first
        # batches cost more than the random-guess loss) is an excursion of its own, before any fault: whether a
        # detector alarms there is not judged.
        first = next((i for i, step in enumerate(steps) if step in easy), None)
        before = level_before(first) if first is not None else []
        if first is not None and before and all(math.isfinite(x) for x in before):
            level = statistics.median(before)
            if any(excursion(i, level) for i in range(first, min(first + SMOOTH * 2, len(losses)))):
                return "ambiguous"
    if trace.meta["fault"] not in NO_FAULT:
        start = steps.index(trace.onset_step)
        before = level_before(start)
        if not before or not all(math.isfinite(x) for x in before):
            return "ambiguous"
        level = statistics.median(before)
        if level >= 0.6 * rgl:
            return "ambiguous"
        if any(excursion(i, level) for i in range(start, min(start + WINDOW, len(losses)))):
            return "catastrophic"
        run = 0
        for i in range(start, len(losses)):
            if smoothed(i) >= RISE * level:
                run += 1
                if run >= PERSIST and i - run + 1 < start + PERSIST_WITHIN:
                    return "catastrophic"
            else:
                run = 0
                if i >= start + PERSIST_WITHIN:
                    break
        return "ambiguous"
    for i, step in enumerate(steps):
        if step <= HEALTHY_AFTER or step in easy:
            continue
        before = [x if math.isfinite(x) else math.inf for x in level_before(max(0, i - SMOOTH + 1))]
        if excursion(i, statistics.median(before)):
            return "ambiguous"
    return "healthy"


# ----------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class Alarm:
    """A detector's first ROLLBACK/HALT: the record it came on, and its own estimate of the onset (if any)."""

    epoch: int
    step: int
    onset_step: int | None = None


Detector = Callable[[Trace], Alarm | None]
TrainRule = Callable[[float, float | None], bool]
"""Fed each train record's loss and grad norm in step order (one rule per trace: some keep state); True alarms."""


def profile_detector(profile: str) -> Detector:
    """A governor profile through the replay engine (validation and train records)."""

    def detect(trace: Trace) -> Alarm | None:
        records = [parse_record(i + 1, r) for i, r in enumerate(trace.records)]
        for decision in replay(records, {"profile": profile}):
            d = decision.decision
            if d.command is not None and d.command.kind in (CommandKind.ROLLBACK, CommandKind.HALT):
                return Alarm(int(d.epoch or 0), d.step, d.onset_step)
        return None

    return detect


def train_detector(make_rule: Callable[[], TrainRule]) -> Detector:
    """A published rule on the train stream: the first train record it alarms on."""

    def detect(trace: Trace) -> Alarm | None:
        rule = make_rule()
        for epoch, step, loss, grad_norm in trace.train_steps:
            if rule(loss, grad_norm):
                return Alarm(epoch, step)
        return None

    return detect


LossRule = Callable[[list[float], float], bool]
"""A published rule on the train losses seen so far and the new one."""


def loss_rule(make_rule: Callable[[], LossRule]) -> Callable[[], TrainRule]:
    """A loss rule (made afresh per trace: some keep state) as a train rule; a non-finite loss always alarms."""

    def make() -> TrainRule:
        rule = make_rule()
        seen: list[float] = []

        def judge(loss: float, grad_norm: float | None) -> bool:
            if not math.isfinite(loss) or rule(seen, loss):
                return True
            seen.append(loss)
            return False

        return judge

    return make


def megatron(seen: list[float], loss: float) -> bool:
    """Megatron-LM: a loss above 10 x the max of the first 100 values."""
    return len(seen) >= 100 and loss > 10 * max(seen[:100])


def lightning(seen: list[float], loss: float) -> bool:
    """Lightning SpikeDetection: above 3 x the running mean of the last 10."""
    return len(seen) >= 10 and loss > 3 * statistics.fmean(seen[-10:])


def olmo(seen: list[float], loss: float) -> bool:
    """OLMo-core: above mean + 6 sigma over a 128-step window."""
    if len(seen) < 128:
        return False
    window = seen[-128:]
    return loss > statistics.fmean(window) + 6 * statistics.pstdev(window)


def foundry() -> LossRule:
    """LLM Foundry KillLossSpike: above 2 x the window (100) mean for 5 consecutive steps."""
    state = {"run": 0}

    def rule(seen: list[float], loss: float) -> bool:
        if len(seen) >= 100 and loss > 2 * statistics.fmean(seen[-100:]):
            state["run"] += 1
        else:
            state["run"] = 0
        return state["run"] >= 5

    return rule


def zclip() -> TrainRule:
    """ZClip's z-score of the grad norm as an alarm, with its published defaults (bluorion-com/ZClip:
    alpha 0.97, z_thresh 2.5, warmup_steps 25): the mean and variance of the first 25 grad norms, then
    z = (g - mean) / std alarms above 2.5, else mean and variance move by an EMA of weight 1 - alpha.
    ZClip clips there instead of alarming; a non-finite loss or grad norm alarms too."""
    warmup: list[float] = []
    state = {"mean": 0.0, "var": 0.0}

    def judge(loss: float, grad_norm: float | None) -> bool:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return True
        if grad_norm is None:
            return False
        if len(warmup) < 25:
            warmup.append(grad_norm)
            if len(warmup) == 25:
                state["mean"], state["var"] = statistics.fmean(warmup), statistics.pvariance(warmup)
            return False
        if (grad_norm - state["mean"]) / (math.sqrt(state["var"]) + 1e-6) > 2.5:
            return True
        state["mean"] = 0.97 * state["mean"] + 0.03 * grad_norm
        state["var"] = 0.97 * state["var"] + 0.03 * (grad_norm - state["mean"]) ** 2
        return False

    return judge


def detectors() -> dict[str, Detector]:
    """Every detector of the comparison, by the name the tables print."""
    return {
        "seed profile": profile_detector("seed"),
        "default profile": profile_detector("default"),
        "Megatron-LM (10 x max of first 100)": train_detector(loss_rule(lambda: megatron)),
        "Lightning SpikeDetection (3 x mean of 10)": train_detector(loss_rule(lambda: lightning)),
        "OLMo-core (6 sigma over 128 steps)": train_detector(loss_rule(lambda: olmo)),
        "LLM Foundry KillLossSpike (2 x mean, 5 steps)": train_detector(loss_rule(foundry)),
        "ZClip z-score of the grad norm (> 2.5, EMA 0.97)": train_detector(zclip),
    }


def _p90(values: list[int]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else float(values[0])


def compare(split: str, corpus: str = "epochs") -> dict[str, Any]:
    """Per detector: caught per fault type, false rollbacks on healthy, alarms on ambiguous, early alarms, the
    delays of the caught ones (in steps; the epoch corpus also in epochs) and each trace's alarm step (for
    tuning); per trace its label and onset step."""
    traces = load(split, corpus)
    labeller = label if corpus == "epochs" else step_label
    labels = {t.meta["trace_id"]: labeller(t) for t in traces}
    results: dict[str, Any] = {
        "corpus": corpus,
        "split": split,
        "labels": {k: sum(1 for v in labels.values() if v == k) for k in ("ambiguous", "catastrophic", "healthy")},
    }
    by_fault: dict[str, int] = defaultdict(int)
    for t in traces:
        if labels[t.meta["trace_id"]] == "catastrophic":
            by_fault[t.meta["fault"]] += 1
    results["catastrophic_by_fault"] = dict(by_fault)
    results["traces"] = {
        t.meta["trace_id"]: {
            "label": labels[t.meta["trace_id"]],
            "onset_step": t.onset_step if t.meta["fault"] != "none" else None,
        }
        for t in traces
    }
    results["ambiguous_by_fault"] = {
        f: sum(1 for t in traces if t.meta["fault"] == f and labels[t.meta["trace_id"]] == "ambiguous")
        for f in sorted({t.meta["fault"] for t in traces})
    }
    for name, detect in detectors().items():
        caught: dict[str, int] = defaultdict(int)
        delays: list[int] = []
        epoch_delays: list[int] = []
        onset_errors: list[int] = []
        false_healthy, ambiguous_alarms, early = 0, 0, 0
        alarms: dict[str, int | None] = {}
        for trace in traces:
            alarm = detect(trace)
            alarms[trace.meta["trace_id"]] = None if alarm is None else alarm.step
            kind = labels[trace.meta["trace_id"]]
            if kind == "catastrophic" and alarm is not None:
                onset = trace.onset_step
                if alarm.step >= onset:
                    caught[trace.meta["fault"]] += 1
                    delays.append(alarm.step - onset)
                    if "onset_epoch" in trace.meta:
                        epoch_delays.append(alarm.epoch - int(trace.meta["onset_epoch"]))
                    if alarm.onset_step is not None:
                        onset_errors.append(abs(alarm.onset_step - onset))
                else:
                    early += 1
            elif kind == "healthy" and alarm is not None:
                false_healthy += 1
            elif kind == "ambiguous" and alarm is not None:
                ambiguous_alarms += 1
        results[name] = {
            "caught": dict(caught),
            "caught_total": sum(caught.values()),
            "false_healthy": false_healthy,
            "ambiguous_alarms": ambiguous_alarms,
            "early_alarms": early,
            "median_delay_steps": statistics.median(delays) if delays else None,
            "p90_delay_steps": _p90(delays) if delays else None,
            "median_onset_error_steps": statistics.median(onset_errors) if onset_errors else None,
            "alarm_steps": alarms,
        }
        if corpus == "epochs":
            results[name]["mean_delay_epochs"] = statistics.fmean(epoch_delays) if epoch_delays else None
    return results


def main() -> int:
    """`python -m tests.benchmarks.corpus.evaluate --corpus steps --split tuning`: the comparison as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="epochs")
    parser.add_argument("--split", choices=("tuning", "evaluation"), default="evaluation")
    args = parser.parse_args()
    print(json.dumps(compare(args.split, args.corpus), indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
