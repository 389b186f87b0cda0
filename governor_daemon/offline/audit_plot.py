"""`governor audit plot`: one run as the journal tells it, drawn so that every decision shows why it was made.

What is drawn, and where each value comes from (nothing is re-derived here):

- **Validation losses**, one point per validation decision (the largest rank's loss).
- **The gates of the run's profile**, at each decision the ones that judged it: the policy state journaled
  before the decision (an earlier entry's ``effects.policy``, or a checkpoint) is loaded with
  ``RunPolicy.from_dict``, and the thresholds come from ``policy.detectors.gates`` and ``lobotomy_band``
  and the random-guess loss from ``RunPolicy.random_guess_loss``: the functions the detectors judge with.
  So ``seed`` draws its three gates (absolute, mean + k·σ, k × mean; divergent above all three) and
  ``default`` adds its relative gate, drawn only while it is on. The profile is named in the title.
- **The lobotomy band** (|loss − RGL| < tolerance × RGL), shaded while the rule is on (history warm and its
  mean below lobotomy_mean_ratio × RGL).
- **Every decision that was not healthy**, validation or train stream, marked, numbered and listed beside
  the plot with its verdict, the rule that fired (a divergence names the gates it crossed) and the action
  ordered; every command as a vertical line, named when no drawn decision caused it.
- **The train-step stream**, when VITALS entries carry their batch summary (``train``: mean and largest
  loss per batch), and the train-stream loss gate when they carry the detector's state (``effects.steps``),
  through ``policy.steps.loss_gate``. Older journals carry neither and plot without them.

Layout: timelines side by side. After a rollback the trainer restarts from an older step on a new
timeline, so on a plain step axis the timelines overlap and no one can tell which loss belongs to which.
Here each timeline has its own band of the x axis, in the order the timelines ran, one unit per optimizer
step, with the real step numbers as tick labels and the band labelled with its timeline and step range.
This reads left to right like the run itself, keeps distances in steps true within a band and makes a
band's width the training it did (discarded steps included); an axis in journal-entry order would stretch
whatever was journaled densely (vitals batches) and squeeze the rest, and one subplot per timeline would
break the line of losses and gates across a rollback.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governor_daemon.journal.entry import Entry
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.policy.decisions import float_from_json
from governor_daemon.policy.detectors import (
    ABSOLUTE_GATE,
    MULTIPLIER_GATE,
    RELATIVE_GATE,
    SIGMA_GATE,
    LobotomyBand,
    gates,
    lobotomy_band,
)
from governor_daemon.policy.engine import RunPolicy
from governor_daemon.policy.steps import StepState, loss_gate
from tolaria.journal import (
    ENTRY_KINDS,
    Checkpoint,
    CommandIssued,
    CommandResult,
    Decision,
    EntryKind,
    Record,
    Snapshot,
    SnapshotAdopted,
    TrainSummary,
    ValidationDetails,
    Vitals,
    record_of,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Validation:
    """One validation decision and the thresholds that judged it."""

    timeline: int
    step: int
    loss: float
    """The largest rank's loss; NaN when any rank's was not finite."""
    verdict: str
    rule: str
    action: str
    ordered: bool
    """A command was sent for it (not suppressed, not shadow mode)."""
    profile: str
    gates: dict[str, float]
    band: LobotomyBand | None
    rgl: float | None


@dataclass(frozen=True)
class TrainBatch:
    """One VITALS batch of one rank: its step range, mean and largest finite loss."""

    rank: int
    timeline: int
    first_step: int
    last_step: int
    loss_mean: float
    loss_max: float
    gate: float | None
    """The train-stream loss gate after this batch, which judges the rank's next batch on this timeline
    (None during the detector's warm-up or when the journal does not carry the detector's state)."""


@dataclass(frozen=True)
class TrainAlarm:
    """A decision of the train stream: a non-finite record, or a train-stream detector that fired."""

    timeline: int
    step: int
    loss: float
    verdict: str
    rule: str
    action: str
    ordered: bool


@dataclass(frozen=True)
class Issued:
    """A command the daemon issued, whatever caused it (a decision, a controller, a timeout)."""

    kind: str
    timeline: int
    step: int
    cause: str


@dataclass(frozen=True)
class Segment:
    """One timeline's band of the x axis: x = x0 + (step - first_step), up to x0 + width."""

    timeline: int
    first_step: int
    last_step: int
    x0: float
    width: float

    def x(self, step: int) -> float:
        """Where ``step`` of this timeline sits on the x axis."""
        return self.x0 + (step - self.first_step)

    @property
    def x1(self) -> float:
        """The right edge of the band."""
        return self.x0 + self.width


@dataclass
class PlotData:
    """Everything drawn, read from the journal for one run."""

    run_id: str
    profiles: list[str] = field(default_factory=list)
    """The profiles that judged the run's validations, in the order they came into force."""
    validations: list[Validation] = field(default_factory=list)
    train: list[TrainBatch] = field(default_factory=list)
    alarms: list[TrainAlarm] = field(default_factory=list)
    commands: list[Issued] = field(default_factory=list)
    segments: dict[int, Segment] = field(default_factory=dict)

    def x(self, timeline: int, step: int) -> float:
        """Where ``step`` of ``timeline`` sits on the x axis."""
        return self.segments[timeline].x(step)

    def count(self, kind: str) -> int:
        """How many commands of ``kind`` (rollback, halt, resume) were issued."""
        return sum(1 for c in self.commands if c.kind == kind)


SEGMENT_GAP = 0.03
"""The gap between two timelines' bands, as a fraction of all steps drawn."""
SEGMENT_MIN_WIDTH = 0.08
"""The narrowest band, as a fraction of all steps drawn: room for its label when a timeline ran few steps."""


def collect(data_dir: Path, run_id: str) -> PlotData:
    """Read the run's decisions, batches and commands, each with the policy state in force before it.

    Raises ValueError if the journal in ``data_dir`` holds no decision of the run.
    """
    data = PlotData(run_id)
    policy: RunPolicy | None = None
    pending: list[dict[str, Any]] = []
    steps: dict[int, list[int]] = defaultdict(list)  # every step seen per timeline: the bands' extent
    command_timelines: dict[int, int] = {}
    for entry in _entries(data_dir):
        if entry.kind == EntryKind.CHECKPOINT:
            run = Checkpoint.from_payload(entry.payload).runs.get(run_id)
            if run is not None:
                policy = RunPolicy.from_dict(run["policy"])
                pending = run["pending"]["pending"]
            continue
        if entry.run != run_id:
            continue
        record = record_of(entry.kind, entry.payload) if entry.kind in ENTRY_KINDS else None
        if isinstance(record, Decision | Vitals) and record.decision is not None:
            decision = record.decision
            if decision["kind"] == "validation" and policy is None:
                # every segment opens with a checkpoint: only a damaged journal gets here
                raise ValueError(f"a decision of run {run_id!r} precedes its policy state in {data_dir}")
            _decided(data, decision, record, policy, pending, steps)
        effects = entry.payload.get("effects") or {}
        if "policy" in effects:
            policy = RunPolicy.from_dict(effects["policy"])
        if "pending" in effects:
            pending = effects["pending"]["pending"]
        _extent(data, record, effects, policy, steps, command_timelines)
    if not data.validations and not data.alarms:
        raise ValueError(f"no decisions of run {run_id!r} in {data_dir}")
    data.segments = _segments(steps)
    return data


def _decided(
    data: PlotData,
    decision: dict[str, Any],
    record: Decision | Vitals,
    policy: RunPolicy | None,
    pending: list[dict[str, Any]],
    steps: dict[int, list[int]],
) -> None:
    """A judgement: a validation decision with its thresholds, or a train-step alarm."""
    steps[int(decision["timeline"])].append(int(decision["step"]))
    if decision["kind"] != "validation":
        data.alarms.append(_alarm(decision))
        return
    assert policy is not None  # collect refuses a validation decision before any policy state
    details = record.record if isinstance(record, Decision) else None
    validation = _validation(decision, policy, _record_rgl(details, decision, pending))
    data.validations.append(validation)
    if validation.profile not in data.profiles[-1:]:
        data.profiles.append(validation.profile)


def _extent(
    data: PlotData,
    record: Record | None,
    effects: dict[str, Any],
    policy: RunPolicy | None,
    steps: dict[int, list[int]],
    command_timelines: dict[int, int],
) -> None:
    """What an entry adds to the plot besides its decision: a batch, a command, the steps its timeline reached."""
    match record:
        case Vitals():
            steps[record.timeline].append(record.max_step)
            if record.train is not None:
                batch = _batch(record, record.train, effects.get("steps", {}).get(str(record.rank)), policy)
                data.train.append(batch)
                steps[batch.timeline].append(batch.first_step)
        case CommandIssued():
            command = record.command
            issued = Issued(str(command["kind"]), int(command["timeline"]), int(command["step"]), str(record.cause))
            data.commands.append(issued)
            command_timelines[int(command["command_id"])] = issued.timeline
            steps[issued.timeline].append(issued.step)
        case CommandResult(succeeded=True):
            if record.new_timeline > command_timelines.get(record.command_id, record.new_timeline):
                steps[record.new_timeline].append(record.restored_step)  # the new timeline starts there
        case Snapshot():
            steps[record.timeline].append(record.step)
        case SnapshotAdopted() if record.run_timeline is not None:  # the new timeline starts there
            steps[record.new_timeline].append(record.snapshot.step)


def _entries(data_dir: Path) -> Iterator[Entry]:
    for path in list_segments(data_dir):
        for item in read_segment(path):
            if isinstance(item, LocatedEntry):
                yield item.entry


def _record_rgl(
    record: ValidationDetails | None, decision: dict[str, Any], pending: list[dict[str, Any]]
) -> float | None:
    """The random-guess loss the validation records carried, as the daemon passed it to the policy: a
    single rank's record is in the decision entry, a multi-rank step's in the aggregator's pending group."""
    if record is not None:
        value = record.random_guess_loss
        return None if value is None else float_from_json(value)
    key = (decision["timeline"], decision["step"])
    group = next((g for g in pending if (g["timeline"], g["step"]) == key), None)
    return None if group is None or group["record_rgl"] is None else float(group["record_rgl"])


def _validation(decision: dict[str, Any], policy: RunPolicy, record_rgl: float | None) -> Validation:
    """A validation decision with the thresholds of the policy state that judged it."""
    losses = [float_from_json(x) for x in decision["losses"]]
    history = policy.validation.detector.history
    rgl = policy.random_guess_loss(record_rgl)
    return Validation(
        timeline=int(decision["timeline"]),
        step=int(decision["step"]),
        loss=max(losses) if all(math.isfinite(x) for x in losses) else math.nan,
        verdict=str(decision["verdict"]),
        rule=str(decision["rule"]),
        action=str(decision["action"]),
        ordered=decision["command"] is not None,
        profile=policy.config.profile,
        gates=gates(history, policy.config, rgl),
        band=lobotomy_band(history, policy.config, rgl),
        rgl=rgl,
    )


def _alarm(decision: dict[str, Any]) -> TrainAlarm:
    return TrainAlarm(
        timeline=int(decision["timeline"]),
        step=int(decision["step"]),
        loss=float_from_json(decision["losses"][0]),
        verdict=str(decision["verdict"]),
        rule=str(decision["rule"]),
        action=str(decision["action"]),
        ordered=decision["command"] is not None,
    )


def _batch(
    vitals: Vitals, train: TrainSummary, step_state: dict[str, Any] | None, policy: RunPolicy | None
) -> TrainBatch:
    """A VITALS entry's batch summary, with the train-stream loss gate of the detector state it journaled."""
    gate = None
    if step_state is not None and policy is not None:
        gate = loss_gate(StepState.from_dict(step_state), policy.config)
    return TrainBatch(
        rank=vitals.rank,
        timeline=vitals.timeline,
        first_step=train.first_step,
        last_step=train.last_step,
        loss_mean=float_from_json(train.loss_mean),
        loss_max=float_from_json(train.loss_max),
        gate=gate,
    )


def _segments(steps: dict[int, list[int]]) -> dict[int, Segment]:
    """One band per timeline, side by side in timeline order, SEGMENT_GAP apart."""
    extents = {t: (min(s), max(s)) for t, s in sorted(steps.items())}
    total = max(1, sum(last - first for first, last in extents.values()))
    segments: dict[int, Segment] = {}
    x0 = 0.0
    for timeline, (first, last) in extents.items():
        segments[timeline] = Segment(timeline, first, last, x0, max(last - first, SEGMENT_MIN_WIDTH * total))
        x0 = segments[timeline].x1 + max(1.0, SEGMENT_GAP * total)
    return segments


GATE_STYLES = {
    ABSOLUTE_GATE: ("tab:gray", ":"),
    SIGMA_GATE: ("tab:purple", "--"),
    MULTIPLIER_GATE: ("tab:olive", "--"),
    RELATIVE_GATE: ("tab:red", "-."),
}
DIVERGENCE_TEXT = {
    "seed": "divergent above all three seed gates",
    "default": "divergent above all three seed gates, or above the relative gate",
}
"""What the gates mean, per profile (policy.detectors: seed_profile, default_profile)."""


def draw(data: PlotData) -> Figure:
    """The figure of ``data`` (a Figure, not pyplot: no global state, no backend to choose)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 7), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    top = _top(data)
    for i, segment in enumerate(data.segments.values()):
        _draw_timeline(ax, data, segment, top, first=i == 0)
    _draw_markers(ax, data, top)
    _draw_commands(ax, data, top)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 4)  # room for the timeline labels above the non-finite losses
    _step_ticks(ax, data)
    ax.set_xlabel("optimizer step (one band per timeline, in the order they ran: a rollback restarts an older step)")
    ax.set_ylabel("loss (log scale)")
    profiles = " → ".join(data.profiles) or "unknown"
    ax.set_title(
        f"governor audit of run {data.run_id}, profile {profiles}: {len(data.validations)} validations, "
        f"{data.count('rollback')} rollback(s), {data.count('halt')} halt(s)"
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="; ".join(DIVERGENCE_TEXT.get(p, p) for p in data.profiles),
        title_fontsize=8,
    )
    return fig


def _top(data: PlotData) -> float:
    """Twice the largest finite value drawn: the top of the axis, where non-finite losses are marked."""
    values = [v.loss for v in data.validations] + [b.loss_max for b in data.train]
    values += [g for v in data.validations for g in v.gates.values()]
    values += [v.band.rgl + v.band.tolerance for v in data.validations if v.band is not None]
    values += [b.gate for b in data.train if b.gate is not None]
    finite = [x for x in values if math.isfinite(x) and x > 0]
    return 2 * max(finite) if finite else 10.0


def _draw_timeline(ax: Axes, data: PlotData, segment: Segment, top: float, first: bool) -> None:
    """One timeline: its band and label, its validations with their gates, band and RGL, its train stream."""
    _draw_timeline_band(ax, segment)
    _draw_train(ax, data, segment, first)
    validations = [v for v in data.validations if v.timeline == segment.timeline]
    if not validations:
        return
    xs = [segment.x(v.step) for v in validations]
    # The thresholds of a decision were in force from the previous decision (or the timeline's start) up to
    # it: a step line drawn backwards from each decision, starting at the band's left edge.
    edges = [segment.x0, *xs]
    _draw_gates(ax, validations, edges, first)
    _draw_rgl(ax, validations, edges, first)
    ax.plot(
        xs,
        [v.loss for v in validations],
        "-o",
        color="tab:blue",
        markersize=3.5,
        linewidth=1.4,
        label=_label("validation loss (largest rank)", first),
        gid="validation loss",
    )


def _draw_timeline_band(ax: Axes, segment: Segment) -> None:
    """The timeline's band (shaded on odd timelines) and its label above everything drawn."""
    if segment.timeline % 2:
        ax.axvspan(segment.x0, segment.x1, color="tab:blue", alpha=0.05, linewidth=0)
    ax.text(
        (segment.x0 + segment.x1) / 2,
        0.985,
        f"timeline {segment.timeline}\n"
        + (
            f"steps {segment.first_step}–{segment.last_step}"
            if segment.last_step > segment.first_step
            else f"step {segment.first_step}"
        ),
        transform=ax.get_xaxis_transform(),  # x in data, y in axes fractions: above everything drawn
        ha="center",
        va="top",
        fontsize=8,
        gid=f"timeline {segment.timeline}",
    )


def _draw_gates(ax: Axes, validations: list[Validation], edges: list[float], first: bool) -> None:
    """Each gate the validations were judged by (absolute, sigma, multiplier, relative), a step line in its style."""
    for name in sorted({name for v in validations for name in v.gates}, key=list(GATE_STYLES).index):
        values = [v.gates.get(name, math.nan) for v in validations]
        color, style = GATE_STYLES[name]
        ax.plot(
            edges,
            [values[0], *values],
            drawstyle="steps-pre",
            color=color,
            linestyle=style,
            linewidth=1.2,
            label=_label(f"{name} gate", first),
            gid=f"gate {name}",
        )


def _draw_rgl(ax: Axes, validations: list[Validation], edges: list[float], first: bool) -> None:
    """The random-guess loss the validations were judged against, and the lobotomy band around it where the
    rule was on."""
    rgls = [math.nan if v.rgl is None else v.rgl for v in validations]
    ax.plot(
        edges,
        [rgls[0], *rgls],
        drawstyle="steps-pre",
        color="tab:brown",
        linewidth=0.8,
        alpha=0.7,
        label=_label("random-guess loss (RGL)", first),
        gid="random-guess loss",
    )
    banded = [(i, v.band) for i, v in enumerate(validations) if v.band is not None]
    for n, (i, band) in enumerate(banded):
        ax.fill_between(
            edges[i : i + 2],
            band.rgl - band.tolerance,
            band.rgl + band.tolerance,
            color="tab:brown",
            alpha=0.18,
            linewidth=0,
            label=_label("lobotomy band (while the rule is on)", first and n == 0),
            gid="lobotomy band",
        )


def _label(text: str, legend: bool) -> str:
    """A legend label, or the same text hidden from the legend (matplotlib skips labels starting with _)."""
    return text if legend else "_" + text


def _draw_train(ax: Axes, data: PlotData, segment: Segment, first: bool) -> None:
    """The train stream of one timeline, one line per rank at each batch's last step: the batch's mean and
    largest loss, and the loss gate after it (a step line: it judges the rank's next batch)."""
    ranks = sorted({b.rank for b in data.train if b.timeline == segment.timeline})
    for rank in ranks:
        batches = [b for b in data.train if b.timeline == segment.timeline and b.rank == rank]
        xs = [segment.x(b.last_step) for b in batches]
        legend = first and rank == ranks[0]
        ax.plot(
            xs,
            [b.loss_mean for b in batches],
            color="tab:cyan",
            linewidth=0.9,
            label=_label("train loss, batch mean", legend),
            gid="train loss mean",
        )
        ax.plot(
            xs,
            [b.loss_max for b in batches],
            color="tab:cyan",
            linewidth=0.6,
            alpha=0.5,
            linestyle="--",
            label=_label("train loss, batch max", legend),
            gid="train loss max",
        )
        gate = [math.nan if b.gate is None else b.gate for b in batches]
        if any(math.isfinite(g) for g in gate):
            ax.plot(
                xs,
                gate,
                drawstyle="steps-post",
                color="tab:pink",
                linewidth=1.0,
                label=_label("train-stream loss gate", legend),
                gid="step gate",
            )


MARKERS = {"anomaly": ("tab:orange", "D"), "panic": ("tab:red", "X")}


LISTED_DECISIONS = 20
"""At most this many decisions are listed beside the plot (the rest are counted)."""


def _draw_markers(ax: Axes, data: PlotData, top: float) -> None:
    """Every decision that was not healthy as a marker (non-finite losses at the top); the validation ones,
    and the train-stream ones that sent a command, numbered and listed beside the plot with their verdict,
    rule and action (a list, not labels on the markers: decisions close together would overwrite each other)."""
    shown: set[str] = set()
    listed: list[str] = []
    decisions: list[Validation | TrainAlarm] = [*data.validations, *data.alarms]
    for d in sorted((d for d in decisions if d.verdict in MARKERS), key=lambda d: data.x(d.timeline, d.step)):
        color, marker = MARKERS[d.verdict]
        validation = isinstance(d, Validation)
        x, y = data.x(d.timeline, d.step), d.loss if math.isfinite(d.loss) else top
        key = f"{d.verdict} ({'validation' if validation else 'train stream'})"
        ax.scatter(
            [x],
            [y],
            s=70,
            marker=marker,
            zorder=5,
            color=color if validation else "none",
            edgecolors=color,
            label=None if key in shown else key,
            gid="decision",
        )
        shown.add(key)
        if validation or d.ordered:  # a train-stream panic under an open command repeats the one that opened it
            listed.append(f"{len(listed) + 1}. {_decision_text(d)} (timeline {d.timeline}, step {d.step})")
            ax.annotate(
                str(len(listed)),
                (x, y),
                xytext=(5, 5),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold",
                color=color,
                gid="decision number",
            )
    if listed:
        more = len(listed) - LISTED_DECISIONS
        text = "\n".join(listed[:LISTED_DECISIONS]) + (f"\n… and {more} more" if more > 0 else "")
        ax.text(1.01, 0.0, text, transform=ax.transAxes, va="bottom", fontsize=8, gid="decision list")


COMMAND_COLORS = {"rollback": "tab:red", "halt": "black", "resume": "tab:green"}


def _draw_commands(ax: Axes, data: PlotData, top: float) -> None:
    """A vertical line per command; one that no drawn decision caused (a controller's, a timeout's) says why."""
    shown: set[str] = set()
    labelled: dict[float, int] = defaultdict(int)  # labels already at an x: the next one goes below them
    for c in data.commands:
        color = COMMAND_COLORS.get(c.kind, "tab:gray")
        x = data.x(c.timeline, c.step)
        ax.axvline(x, color=color, alpha=0.4, linewidth=2, label=None if c.kind in shown else c.kind)
        shown.add(c.kind)
        if c.cause not in ("decision", "train_step"):
            y = top / 3 ** labelled[x]
            labelled[x] += 1
            label = f" {c.kind} ({c.cause})"
            ax.text(x, y, label, rotation=90, va="top", fontsize=7.5, color=color, gid="command label")


def _decision_text(d: Validation | TrainAlarm) -> str:
    """'verdict · rule → action'; a divergence names the gates the loss was above."""
    rule = d.rule
    if isinstance(d, Validation) and d.rule == "divergence":
        rule += " above " + ", ".join(name for name, gate in d.gates.items() if d.loss > gate)
    text = f"{d.verdict} · {rule}"
    if d.action != "none":
        text += f" → {d.action}" + ("" if d.ordered else " (not sent)")
    return text


def _step_ticks(ax: Axes, data: PlotData) -> None:
    """Tick labels that give the real step numbers inside each timeline's band."""
    from matplotlib.ticker import MaxNLocator

    total = sum(s.x1 - s.x0 for s in data.segments.values()) or 1.0
    ticks: list[float] = []
    labels: list[str] = []
    for segment in data.segments.values():
        bins = max(1, round(10 * (segment.x1 - segment.x0) / total))
        for step in MaxNLocator(nbins=bins, integer=True).tick_values(segment.first_step, segment.last_step):
            x = segment.x(int(step))
            if segment.x0 <= x <= segment.x1 and (not ticks or x - ticks[-1] > 0.04 * total):
                ticks.append(x)
                labels.append(str(int(step)))
    ax.set_xticks(ticks, labels)


def plot(data_dir: Path, run_id: str, output: Path) -> PlotData:
    """Write the PNG; returns the data plotted. Raises ValueError if the run has no decisions."""
    data = collect(data_dir, run_id)
    draw(data).savefig(output)
    return data
