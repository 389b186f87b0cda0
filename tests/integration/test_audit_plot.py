"""`governor audit plot` on a journal written by a real daemon: the figure's data, not its pixels.

One daemon run journals two runs. ``default-run`` (the default profile) trains on timeline 0 with a
train-step stream, panics on the relative gate (a loss far below every seed gate), is rolled back to an
older step, panics on the lobotomy rule on timeline 1, is rolled back again and ends on timeline 2.
``seed-run`` sees the same losses under the seed profile, where the rise is judged normal.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from governor_daemon.journal.entry import Entry
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.offline.audit_plot import PlotData, collect, draw
from governor_daemon.policy import RunPolicy
from governor_daemon.policy.decisions import Rule, float_from_json
from governor_daemon.policy.detectors import (
    ABSOLUTE_GATE,
    MULTIPLIER_GATE,
    RELATIVE_GATE,
    SIGMA_GATE,
    detector_for,
    lobotomy_band,
)
from governor_daemon.policy.steps import StepState, loss_gate
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import governor_cli
from tests.integration.conftest import HEALTHY

EVERY = 20
"""Steps between validations; each validation follows a vitals batch of these steps."""
RESTORED = (EVERY * len(HEALTHY) - 40, EVERY * len(HEALTHY))
"""The steps timelines 1 and 2 restart from: before the validations that judged timelines 0 and 1 bad."""


@dataclass
class Journal:
    data_dir: Path
    default: PlotData
    seed: PlotData


def train_loss(step: int) -> float:
    """A smooth, slightly noisy falling train loss: the train-stream detectors never fire on it."""
    return 2.0 * math.exp(-step / 60) + 0.4 + 0.02 * math.sin(step)


def advance(client: AttachClient, step: int, loss: float) -> None:
    """Train EVERY steps up to ``step``, validate there, wait for the verdict."""
    steps = list(range(step - EVERY + 1, step + 1))
    client.vitals(steps, [train_loss(s) for s in steps], [1.0 + 0.01 * (s % 7) for s in steps])
    client.validation(step, loss, epoch=step // EVERY)
    client.next("verdict")


def roll_back_to(client: AttachClient, restored_step: int) -> None:
    """Execute the next command (a rollback) as a trainer does: restore an older snapshot, new timeline."""
    command = client.next("command").command
    older = type(command)()
    older.CopyFrom(command)
    older.step = restored_step  # the result reports the step of the snapshot restored
    client.wait_ack(client.result(older))


def run_story(client: AttachClient, profile: str) -> None:
    """The story of the module docstring (under the seed profile it ends after the rise)."""
    for i, loss in enumerate(HEALTHY):
        advance(client, EVERY * (i + 1), loss)
    step = EVERY * len(HEALTHY)
    for loss in (1.5, 1.6):  # more than 2 x the recent minimum 0.55, far below 3 x mean and 10
        step += EVERY
        advance(client, step, loss)
    if profile == "seed":
        return
    step = RESTORED[0]
    roll_back_to(client, step)
    for loss in (0.52, 0.5, math.log(10) - 0.01):  # then a collapse to the random-guess loss
        step += EVERY
        advance(client, step, loss)
    step = RESTORED[1]
    roll_back_to(client, step)
    for loss in (0.5, 0.49):
        step += EVERY
        advance(client, step, loss)


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Journal:
    data_dir = tmp_path_factory.mktemp("audit-plot") / "data"
    with InProcessDaemon(data_dir) as daemon:
        for run_id, profile in (("default-run", "default"), ("seed-run", "seed")):
            client = AttachClient(daemon.address, run_id, overrides={"profile": profile})
            client.connect()
            run_story(client, profile)
            client.close()
    return Journal(data_dir, collect(data_dir, "default-run"), collect(data_dir, "seed-run"))


def entries(data_dir: Path, run_id: str) -> list[Entry]:
    located = (item for path in list_segments(data_dir) for item in read_segment(path))
    return [item.entry for item in located if isinstance(item, LocatedEntry) and item.entry.run == run_id]


def lines(fig: Figure, gid: str) -> list[Line2D]:
    return [line for line in fig.axes[0].get_lines() if line.get_gid() == gid]


def texts(fig: Figure, gid: str) -> list[str]:
    return [t.get_text() for t in fig.axes[0].findobj(Text) if t.get_gid() == gid]


def test_the_journal_tells_the_story(journal: Journal) -> None:
    """The default run panicked on the relative gate and on the lobotomy rule, the seed run on neither."""
    rules = [(v.timeline, v.verdict, v.rule) for v in journal.default.validations if v.verdict != "healthy"]
    assert rules == [(0, "anomaly", "divergence"), (0, "panic", "divergence"), (1, "panic", "lobotomy")]
    assert [v.verdict for v in journal.seed.validations] == ["healthy"] * len(journal.seed.validations)
    assert journal.default.count("rollback") == 2


def test_gates_are_the_detectors_thresholds(journal: Journal) -> None:
    """For every decision: the detector, given the policy state journaled before it, judges as the journal
    says (so the plot's state is the daemon's), and the plot's gates are where that detector turns
    divergent: a loss at the lowest effective gate is not divergent, the next float above it is."""
    before: dict[str, Any] | None = None
    judged = 0
    for run_id, data in (("default-run", journal.default), ("seed-run", journal.seed)):
        validations = iter(data.validations)
        for entry in entries(journal.data_dir, run_id):
            decision = entry.payload.get("decision")
            if decision is not None and decision["kind"] == "validation":
                plotted = next(validations)
                assert before is not None
                policy = RunPolicy.from_dict(before)
                detector = detector_for(policy.config.profile)
                rgl = policy.random_guess_loss()
                losses = [float_from_json(x) for x in decision["losses"]]
                judgement = detector(losses, policy.validation.detector, policy.config, rgl)
                assert (str(judgement.rule), plotted.rule) == (decision["rule"], decision["rule"])
                assert decision["reason"].startswith(judgement.reason)
                assert plotted.band == lobotomy_band(policy.validation.detector.history, policy.config, rgl)
                if plotted.gates:
                    seed = max(plotted.gates[g] for g in (ABSOLUTE_GATE, SIGMA_GATE, MULTIPLIER_GATE))
                    threshold = min(seed, plotted.gates.get(RELATIVE_GATE, math.inf))
                    above = math.nextafter(threshold, math.inf)
                    at = detector([threshold], policy.validation.detector, policy.config, rgl)
                    over = detector([above], policy.validation.detector, policy.config, rgl)
                    assert (at.rule, over.rule) == (Rule.NORMAL, Rule.DIVERGENCE), (plotted.gates, over.reason)
                    judged += 1
            effects = entry.payload.get("effects") or {}
            if "policy" in effects:
                before = effects["policy"]
    assert judged == 9 + 4  # the decisions after warm-up: 4 + 3 + 2 on the default run's timelines, 4 seed


def test_default_profile_draws_its_relative_gate_and_names_itself(journal: Journal) -> None:
    """Under the default profile the relative gate is drawn, with the values that judged each validation,
    and the panic it caused sits above it while below every seed gate; the title names the profile."""
    fig = draw(journal.default)
    title = fig.axes[0].get_title()
    assert "profile default" in title
    relative = lines(fig, f"gate {RELATIVE_GATE}")
    assert relative
    drawn = [y for line in relative for y in list(line.get_ydata())[1:]]
    expected = [v.gates.get(RELATIVE_GATE, math.nan) for v in journal.default.validations if v.gates]
    assert [y for y in drawn if math.isfinite(y)] == [y for y in expected if math.isfinite(y)]
    panic = next(v for v in journal.default.validations if v.verdict == "panic" and v.rule == "divergence")
    assert panic.loss > panic.gates[RELATIVE_GATE]
    assert all(panic.loss < panic.gates[g] for g in (ABSOLUTE_GATE, SIGMA_GATE, MULTIPLIER_GATE))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {f"{g} gate" for g in (ABSOLUTE_GATE, SIGMA_GATE, MULTIPLIER_GATE, RELATIVE_GATE)} <= set(labels)


def test_seed_profile_draws_only_its_three_gates(journal: Journal) -> None:
    fig = draw(journal.seed)
    assert "profile seed" in fig.axes[0].get_title()
    assert lines(fig, f"gate {RELATIVE_GATE}") == []
    assert {line.get_gid() for line in fig.axes[0].get_lines() if str(line.get_gid()).startswith("gate ")} == {
        f"gate {g}" for g in (ABSOLUTE_GATE, SIGMA_GATE, MULTIPLIER_GATE)
    }


def test_decisions_name_their_rule_and_the_lobotomy_band_is_drawn(journal: Journal) -> None:
    fig = draw(journal.default)
    assert texts(fig, "decision number") == ["1", "2", "3"]
    assert texts(fig, "decision list") == [
        f"1. anomaly · divergence above {RELATIVE_GATE} (timeline 0, step 260)\n"
        f"2. panic · divergence above {RELATIVE_GATE} → rollback (timeline 0, step 280)\n"
        "3. panic · lobotomy → rollback (timeline 1, step 260)"
    ]
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection) and c.get_gid() == "lobotomy band"]
    assert bands
    rgl, tolerance = math.log(10), 0.065 * math.log(10)
    for band in bands:
        ys = band.get_paths()[0].vertices[:, 1]
        assert (min(ys), max(ys)) == pytest.approx((rgl - tolerance, rgl + tolerance))


def test_timelines_do_not_overlap(journal: Journal) -> None:
    """Timelines 1 and 2 restart at older steps; on the x axis each has its own range, in order, and
    every point of a timeline lies in it."""
    data = journal.default
    ranges = [(s.x0, s.x1) for s in data.segments.values()]
    assert [s.timeline for s in data.segments.values()] == [0, 1, 2]
    assert [s.first_step for s in data.segments.values()][1:] == list(RESTORED)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    fig = draw(data)
    validation = lines(fig, "validation loss")
    assert len(validation) == 3
    for line, (x0, x1) in zip(validation, ranges, strict=True):
        assert all(x0 <= x <= x1 for x in line.get_xdata())
    assert texts(fig, "timeline 1") == [f"timeline 1\nsteps {RESTORED[0]}–{data.segments[1].last_step}"]


def test_train_stream_is_drawn_when_vitals_carry_it(journal: Journal) -> None:
    """Every VITALS entry that carries its batch summary is a point of the train stream (mean and max);
    the train-stream gate drawn is ``loss_gate`` of the detector state each entry journaled."""
    vitals = [e for e in entries(journal.data_dir, "default-run") if e.kind == "vitals"]
    carrying = [e for e in vitals if "train" in e.payload]
    fig = draw(journal.default)
    means = [y for line in lines(fig, "train loss mean") for y in line.get_ydata()]
    maxima = [y for line in lines(fig, "train loss max") for y in line.get_ydata()]
    assert means == [float_from_json(e.payload["train"]["loss_mean"]) for e in carrying]
    assert maxima == [float_from_json(e.payload["train"]["loss_max"]) for e in carrying]
    config = RunPolicy.from_dict(
        next(
            e.payload["effects"]["policy"] for e in entries(journal.data_dir, "default-run") if e.kind == "run_created"
        )
    ).config
    expected = [
        loss_gate(StepState.from_dict(e.payload["effects"]["steps"]["0"]), config)
        for e in carrying
        if "steps" in e.payload.get("effects", {})
    ]
    drawn = [y for line in lines(fig, "step gate") for y in line.get_ydata() if math.isfinite(y)]
    assert drawn == [g for g in expected if g is not None]
    assert carrying, "this daemon journals each batch's summary"
    assert drawn, "and the train-stream detector's state, warm after step_warmup_steps records"


def test_plot_without_train_summaries_still_draws(journal: Journal) -> None:
    """An older journal's VITALS carry no batch summary: no train stream, everything else as before."""
    data = journal.default
    older = PlotData(data.run_id, data.profiles, data.validations, [], data.alarms, data.commands, data.segments)
    fig = draw(older)
    assert lines(fig, "train loss mean") == lines(fig, "step gate") == []
    assert len(lines(fig, "validation loss")) == 3


def test_cli_writes_the_png(journal: Journal, tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    done = governor_cli(["audit", "plot", "default-run", "--data-dir", str(journal.data_dir), "-o", str(png)])
    assert done.returncode == 0, done.stderr
    assert "under profile default, 19 validations, 2 rollback(s), 0 halt(s)" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
