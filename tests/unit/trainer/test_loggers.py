"""Governor events for the user's loggers (tolaria_trainer.loggers), with a scripted Governance: which events a
command makes, at which step, with which scalars; the adapters each kind of logger gets; bad loggers refused
before anything changes; a failing logger never stops training."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.unit.trainer.fake_governance import FakeGovernance
from tests.unit.trainer.test_governed import plain_setup, train_steps
from tolaria_trainer import GovernedTraining
from tolaria_trainer.governance import CommandType
from tolaria_trainer.loggers import (
    SCALARS,
    CallableLogger,
    GovernorEvent,
    GovernorLoggers,
    MetricsLogger,
    TensorBoardLogger,
    WandbLogger,
    as_governor_logger,
)


def test_a_rollback_and_a_halt_reach_the_loggers_at_the_step_they_happened() -> None:
    """A ROLLBACK executed at step 14 is one event at step 14 (the restore rewinds the run to 10); a HALT that
    no RESUME follows is two: the order, then the stop. Counters are the run's totals."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    events: list[GovernorEvent] = []
    with GovernedTraining(
        model,
        optimizers,
        governor=fake,
        schedulers=[scheduler],
        agree_every_steps=5,
        halt_wait_s=0,
        loggers=events.append,
    ) as gov:
        train_steps(gov, 10)
        fake.verdict_on(gov.report_validation(1.0, 0.5, epoch=1))
        gov.agreement_point()
        train_steps(gov, 3)
        assert events == [], "nothing happened: nothing logged"
        fake.order(CommandType.ROLLBACK, skip=2, lr_scale=0.5, punishment=-10.0)
        train_steps(gov, 1)
        assert gov.state.step == 10
        fake.order(CommandType.HALT)
        outcome = train_steps(gov, 3)[-1]  # the first two are the batches the rollback skips
        assert outcome.halted
    assert [(e.kind, e.step) for e in events] == [("rollback", 14), ("halt", 11), ("halted", 11)]
    rollback = events[0]
    assert rollback.scalars() == {
        "governor/rollbacks": 1.0,
        "governor/restores": 1.0,
        "governor/timeline": 1.0,
        "governor/halted": 0.0,
        "governor/shed_records": 0.0,
        "governor/unjudged_records": 0.0,
        "governor/punishment": -10.0,
        "governor/lr_scale": 0.5,
        "governor/skip_batches": 2.0,
        "governor/restored_step": 10.0,
    }
    assert set(rollback.scalars()) <= set(SCALARS)
    assert rollback.text() == "rollback (command 1) at step 14: restored step 10 on timeline 1: scripted ROLLBACK"
    assert events[2].scalars()["governor/halted"] == 1.0
    assert events[2].text() == "halted (command 2) at step 11: scripted HALT"


def test_unjudged_records_are_logged_once_per_rise_at_agreement_points() -> None:
    """Records shed or never judged make a ``records`` event at the next agreement point, once; not per step."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    events: list[GovernorEvent] = []
    with GovernedTraining(
        model, optimizers, governor=fake, schedulers=[scheduler], agree_every_steps=4, loggers=[events.append]
    ) as gov:
        train_steps(gov, 2)
        fake.num_shed_records, fake.num_dropped_records = 5, 2
        train_steps(gov, 1)
        assert events == [], "between agreement points nothing is read"
        train_steps(gov, 9)  # agreement points at steps 4, 8, 12
    (event,) = events
    assert (event.kind, event.step, event.num_shed_records, event.num_unjudged_records) == ("records", 4, 5, 2)
    assert "governor/restored_step" not in event.scalars()
    assert event.text() == "records at step 4: 5 record(s) shed and 2 otherwise never judged by the governor so far"


def test_a_bad_logger_is_a_clear_error_that_changes_nothing() -> None:
    """A logger of no known kind: TypeError naming it, before the step guard wraps any optimizer."""
    model, optimizers, _ = plain_setup()
    steps = [vars(opt).get("step") for opt in optimizers]  # an LR scheduler may have wrapped one already
    with pytest.raises(TypeError, match=r"loggers: expected a TensorBoard SummaryWriter.*got int 42"):
        GovernedTraining(model, optimizers, governor=FakeGovernance(), loggers=[print, 42])
    assert [vars(opt).get("step") for opt in optimizers] == steps, "no optimizer was wrapped"


def test_a_failing_logger_is_reported_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A logger that raises gets a warning naming it; the restore stands and the next logger still gets it."""

    def broken(event: GovernorEvent) -> None:
        raise OSError("disk full")

    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    events: list[GovernorEvent] = []
    with (
        caplog.at_level(logging.WARNING, "tolaria.loggers"),
        GovernedTraining(
            model, optimizers, governor=fake, schedulers=[scheduler], loggers=[broken, events.append]
        ) as gov,
    ):
        train_steps(gov, 3)
        fake.order(CommandType.ROLLBACK)
        (outcome,) = train_steps(gov, 1)
    assert outcome.restored
    assert [e.kind for e in events] == ["rollback"]
    assert "governor logger CallableLogger(<function" in caplog.text
    assert "disk full" in caplog.text


class Writer:
    """The two methods of a SummaryWriter the adapter uses, and what they got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.calls.append((tag, text, step))

    def flush(self) -> None:
        self.calls.append(("flush", None, -1))


class Run:
    """A wandb run's ``define_metric`` and ``log``."""

    def __init__(self) -> None:
        self.defined: list[tuple[str, str | None]] = []
        self.rows: list[tuple[dict[str, Any], bool]] = []

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, data: dict[str, Any], commit: bool = True) -> None:
        self.rows.append((data, commit))


class Metrics:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.saves = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))

    def save(self) -> None:
        self.saves += 1


EVENT = GovernorEvent(
    kind="rollback",
    step=97,
    timeline=1,
    num_rollbacks=1,
    num_restores=1,
    num_shed_records=0,
    num_unjudged_records=0,
    command_id=3,
    command_type="ROLLBACK",
    reason="non-finite train loss nan at step 97 (rank 0)",
    restored_step=72,
    punishment_reward=-1.0,
)


def test_each_kind_of_logger_gets_its_adapter() -> None:
    """SummaryWriter-like: scalars and text at the event's step, flushed; log_metrics: the scalars then save();
    a wandb run: one uncommitted row with governor/step as the x-axis; a callable: the event."""
    writer, run, metrics, seen = Writer(), Run(), Metrics(), []
    loggers = GovernorLoggers([writer, run, metrics, seen.append])
    assert [type(logger) for logger in loggers.loggers] == [
        TensorBoardLogger,
        WandbLogger,
        MetricsLogger,
        CallableLogger,
    ]
    assert run.defined == [("governor/step", None), ("governor/*", "governor/step")]
    loggers.emit(EVENT)
    assert ("governor/rollbacks", 1.0, 97) in writer.calls
    assert ("governor/decision", EVENT.text(), 97) in writer.calls
    assert writer.calls[-1][0] == "flush"
    ((row, commit),) = run.rows
    assert not commit
    assert row["governor/step"] == 97
    assert row["governor/restored_step"] == 72.0
    assert row["governor/decision"].endswith("non-finite train loss nan at step 97 (rank 0)")
    assert metrics.logged == [(EVENT.scalars(), 97)]
    assert metrics.saves == 1
    assert seen == [EVENT]
    own = CallableLogger(seen.append)
    assert as_governor_logger(own) is own, "a GovernorLogger is used as it is"
    assert not GovernorLoggers(None)
    assert not GovernorLoggers(())
    assert len(GovernorLoggers(writer)) == 1, "one logger needs no list"


@pytest.mark.parametrize("bad", ["runs/x", None, 3.5, object()])
def test_what_is_not_a_logger_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="loggers: expected"):
        GovernorLoggers([bad])


def test_a_real_summary_writer_is_recognised(tmp_path: Any) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    writer = tensorboard.SummaryWriter(str(tmp_path))
    try:
        assert isinstance(as_governor_logger(writer), TensorBoardLogger)
    finally:
        writer.close()


def test_no_event_is_built_without_loggers() -> None:
    """Without loggers a rollback builds no event (nothing to hand it to)."""
    model, optimizers, scheduler = plain_setup()
    fake = FakeGovernance()
    with GovernedTraining(model, optimizers, governor=fake, schedulers=[scheduler]) as gov:
        train_steps(gov, 2)
        fake.order(CommandType.ROLLBACK)
        (outcome,) = train_steps(gov, 1)
    assert outcome.restored
    assert gov.loggers.num_events == 0
