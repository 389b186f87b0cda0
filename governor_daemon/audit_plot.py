"""`governor audit plot`: one run's validation losses from the journal, with the gates in force.

The thresholds drawn at each decision are those the policy used for it (computed from the run state
journaled just before), so a reviewer sees why each point was or was not judged divergent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.policy.decisions import float_from_json


@dataclass
class PlotData:
    """Series extracted from the journal for one run."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    timelines: list[int] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    sigma_gate: list[float] = field(default_factory=list)
    mult_gate: list[float] = field(default_factory=list)
    abs_gate: list[float] = field(default_factory=list)
    rgl: float | None = None
    rollback_steps: list[int] = field(default_factory=list)
    halt_steps: list[int] = field(default_factory=list)


def collect(data_dir: Path, run_id: str) -> PlotData:
    """Read the run's decisions and the state before each one."""
    data = PlotData()
    before: dict[str, Any] | None = None
    for path in list_segments(data_dir):
        for item in read_segment(path):
            if not isinstance(item, LocatedEntry):
                continue
            entry = item.entry
            if entry.kind == "checkpoint":
                run = entry.payload.get("runs", {}).get(run_id)
                if run is not None:
                    before = run["policy"]
                continue
            if entry.run != run_id:
                continue
            decision = entry.payload.get("decision")
            effects = entry.payload.get("effects", {})
            if decision is not None:
                command = decision.get("command")
                if command is not None:
                    (data.halt_steps if command["kind"] == "halt" else data.rollback_steps).append(decision["step"])
            if decision is not None and decision.get("kind") == "validation":
                losses = [float_from_json(x) for x in decision["losses"]]
                data.steps.append(int(decision["step"]))
                data.losses.append(max(losses) if all(math.isfinite(x) for x in losses) else math.nan)
                data.timelines.append(int(decision["timeline"]))
                data.verdicts.append(str(decision["verdict"]))
                _gates(data, before)
            if "policy" in effects:
                before = effects["policy"]
            if data.rgl is None and before is not None:
                data.rgl = _rgl(before)
    return data


def _rgl(state: dict[str, Any]) -> float | None:
    config = state["config"]
    if config.get("random_guess_loss") is not None:
        return float(config["random_guess_loss"])
    if state.get("task_rgl") is not None:
        return float(state["task_rgl"])
    if state.get("num_classes"):
        return math.log(int(state["num_classes"]))
    return None


def _gates(data: PlotData, state: dict[str, Any] | None) -> None:
    history = [float(x) for x in (state or {}).get("history", [])]
    config = (state or {}).get("config", {})
    data.abs_gate.append(float(config.get("absolute_threshold", math.nan)))
    if state is None or len(history) < int(config.get("min_history", 10)):
        data.sigma_gate.append(math.nan)
        data.mult_gate.append(math.nan)
        return
    mean = math.fsum(history) / len(history)
    sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / len(history))
    data.sigma_gate.append(mean + float(config["sensitivity"]) * sigma)
    data.mult_gate.append(float(config["multiplier"]) * mean)


def plot(data_dir: Path, run_id: str, output: Path) -> PlotData:
    """Write the PNG; returns the data plotted. Raises ValueError if the run has no decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = collect(data_dir, run_id)
    if not data.steps:
        raise ValueError(f"no validation decisions of run {run_id!r} in {data_dir}")
    finite = [x for x in data.losses if math.isfinite(x)]
    top = max(finite + [g for g in data.abs_gate if math.isfinite(g)]) * 2 if finite else 10.0
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    for i, timeline in enumerate(sorted(set(data.timelines))):  # a restore breaks the line
        points = [(s, x) for s, x, t in zip(data.steps, data.losses, data.timelines, strict=True) if t == timeline]
        ax.plot(
            [p[0] for p in points],
            [p[1] if math.isfinite(p[1]) else math.nan for p in points],
            "-o",
            color="tab:blue",
            markersize=3,
            linewidth=1.2,
            label="validation loss (one segment per timeline)" if i == 0 else None,
        )
    ax.step(data.steps, data.abs_gate, where="post", color="tab:gray", linestyle=":", label="absolute threshold")
    ax.step(data.steps, data.sigma_gate, where="post", color="tab:purple", linestyle="--", label="mean + k·σ gate")
    ax.step(data.steps, data.mult_gate, where="post", color="tab:olive", linestyle="--", label="multiplier × mean gate")
    if data.rgl is not None:
        ax.axhline(data.rgl, color="tab:brown", linewidth=0.8, alpha=0.6, label=f"random-guess loss ({data.rgl:.3g})")
    for kind, color, marker, label in (("anomaly", "tab:orange", "D", "anomaly"), ("panic", "tab:red", "X", "panic")):
        xs = [s for s, v in zip(data.steps, data.verdicts, strict=True) if v == kind]
        ys = [x if math.isfinite(x) else top for x, v in zip(data.losses, data.verdicts, strict=True) if v == kind]
        if xs:
            ax.scatter(
                xs,
                ys,
                color=color,
                marker=marker,
                s=70,
                zorder=5,
                label=label + " (non-finite drawn at top)"
                if kind == "panic" and any(not math.isfinite(x) for x in data.losses)
                else label,
            )
    for i, step in enumerate(data.rollback_steps):
        ax.axvline(step, color="tab:red", alpha=0.35, linewidth=2, label="rollback" if i == 0 else None)
    for i, step in enumerate(data.halt_steps):
        ax.axvline(step, color="black", alpha=0.6, linewidth=2, label="halt" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (log scale)")
    ax.set_title(
        f"governor decisions for run {run_id}: {len(data.steps)} validations, "
        f"{len(data.rollback_steps)} rollback(s), {len(data.halt_steps)} halt(s)"
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return data
