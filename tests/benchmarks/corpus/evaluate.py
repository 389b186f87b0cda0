"""Labels (computed from each trace) and the detector comparison; docs/protocol.md, "Benchmark budgets and
corpus labels".

Catastrophic: a fault, the run was learning before onset (last validation loss < 0.6 x RGL) and within 3
epochs of onset the validation loss is non-finite or >= 2 x the minimum of the last 5 pre-onset losses +
0.05; caught iff the first ROLLBACK or HALT comes at or after onset. Healthy: no fault and, after epoch 5,
never above 2 x its running minimum + 0.05 and never back to >= 0.9 x RGL. Everything else is ambiguous.
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from governor_daemon.policy import CommandKind
from governor_daemon.replay import replay
from governor_daemon.trace import parse_record

HERE = Path(__file__).resolve().parent


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
    def rgl(self) -> float:
        first = next(r for r in self.records if r["kind"] == "validation")
        return (
            float(first["random_guess_loss"]) if "random_guess_loss" in first else math.log(int(first["num_classes"]))
        )


def _f(value: Any) -> float:
    """A trace loss: a number or "nan"/"inf"/"-inf" (float() reads both)."""
    return float(value)


def load(split: str | None = None) -> list[Trace]:
    """Every trace of the corpus (or of one split)."""
    index = json.loads((HERE / "index.json").read_text())
    out = []
    for meta in index:
        if split is not None and meta["split"] != split:
            continue
        with gzip.open(HERE / "traces" / meta["file"], "rt") as f:
            out.append(Trace(meta, [json.loads(line) for line in f]))
    return out


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


# ----------------------------------------------------------------------------- detectors

Detector = Callable[[Trace], int | None]
"""Returns the epoch of the first ROLLBACK/HALT (alarm), or None."""


def profile_detector(profile: str) -> Detector:
    """A governor profile through the replay engine (validation and train records)."""

    def detect(trace: Trace) -> int | None:
        records = [parse_record(i + 1, r) for i, r in enumerate(trace.records)]
        for decision in replay(records, {"profile": profile}):
            command = decision.decision.command
            if command is not None and command.kind in (CommandKind.ROLLBACK, CommandKind.HALT):
                return int(decision.decision.epoch or 0)
        return None

    return detect


def _train_rule(rule: Callable[[list[float], float], bool]) -> Detector:
    def detect(trace: Trace) -> int | None:
        seen: list[float] = []
        for epoch, loss in trace.train:
            if not math.isfinite(loss) or rule(seen, loss):
                return epoch
            seen.append(loss)
        return None

    return detect


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


def foundry() -> Callable[[list[float], float], bool]:
    """LLM Foundry KillLossSpike: above 2 x the window (100) mean for 5 consecutive steps."""
    state = {"run": 0}

    def rule(seen: list[float], loss: float) -> bool:
        if len(seen) >= 100 and loss > 2 * statistics.fmean(seen[-100:]):
            state["run"] += 1
        else:
            state["run"] = 0
        return state["run"] >= 5

    return rule


def detectors() -> dict[str, Callable[[], Detector]]:
    """Fresh detector per name (some keep state)."""
    return {
        "seed profile": lambda: profile_detector("seed"),
        "default profile": lambda: profile_detector("default"),
        "Megatron-LM (10 x max of first 100)": lambda: _train_rule(megatron),
        "Lightning SpikeDetection (3 x mean of 10)": lambda: _train_rule(lightning),
        "OLMo-core (6 sigma over 128 steps)": lambda: _train_rule(olmo),
        "LLM Foundry KillLossSpike (2 x mean, 5 steps)": lambda: _train_rule(foundry()),
    }


def compare(split: str) -> dict[str, Any]:
    """Per detector: caught per fault type, false rollbacks on healthy, alarms on ambiguous, delays."""
    traces = load(split)
    labels = {t.meta["trace_id"]: label(t) for t in traces}
    results: dict[str, Any] = {
        "labels": dict(
            sorted(
                defaultdict(
                    int,
                    {k: sum(1 for v in labels.values() if v == k) for k in ("catastrophic", "healthy", "ambiguous")},
                ).items()
            )
        )
    }
    by_fault: dict[str, int] = defaultdict(int)
    for t in traces:
        if labels[t.meta["trace_id"]] == "catastrophic":
            by_fault[t.meta["fault"]] += 1
    results["catastrophic_by_fault"] = dict(by_fault)
    for name, make in detectors().items():
        caught: dict[str, int] = defaultdict(int)
        delays: list[int] = []
        false_healthy, ambiguous_alarms, early = 0, 0, 0
        for trace in traces:
            alarm = make()(trace)
            kind = labels[trace.meta["trace_id"]]
            if kind == "catastrophic":
                onset = int(trace.meta["onset_epoch"])
                if alarm is not None and alarm >= onset:
                    caught[trace.meta["fault"]] += 1
                    delays.append(alarm - onset)
                elif alarm is not None:
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
            "mean_delay_epochs": statistics.fmean(delays) if delays else None,
        }
    return results


if __name__ == "__main__":
    import sys

    print(json.dumps(compare(sys.argv[1] if len(sys.argv) > 1 else "evaluation"), indent=1))
