"""The `tolaria-train` loop against a scripted governor: ``helpers.ScriptedGovernor`` (the real client and
protocol, no sockets) or ``FakeGovernance`` (the Governance protocol in plain types)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from tests.unit.trainer.fake_governance import FakeGovernance
from tests.unit.trainer.helpers import HELLO, UnstartedConnection, batches, governed_run, validations
from tolaria.governor.v1 import common_pb2
from tolaria_trainer.config import RunConfig
from tolaria_trainer.governance import CommandType, FinishStatus, VerdictKind
from tolaria_trainer.governed import Outcome
from tolaria_trainer.loop import GovernedRun


def test_records_before_a_mid_interval_restore_keep_their_timeline() -> None:
    """NaN steps produced on timeline 0 before a ROLLBACK at a step agreement point are sent as timeline 0."""
    run, governor = governed_run(inject=["nan@epoch=1"], epochs=1)
    run.gov.start()
    governor.command(1, common_pb2.COMMAND_TYPE_ROLLBACK, timeline=0)
    run._epoch()
    sent = governor.drain()
    nan_batches = [(b.timeline, b.step[0]) for b in batches(sent) if not all(math.isfinite(x) for x in b.loss)]
    assert nan_batches, "the NaN steps were sent"
    assert all(timeline == 0 for timeline, _ in nan_batches), f"NaN batches (timeline, first step): {nan_batches}"
    assert run.state.timeline == 1


def test_pending_snapshot_survives_verdict_latency() -> None:
    """D15: a verdict that arrives after the next validation still publishes its snapshot (the LKG
    advances), and the next one's verdict then publishes the newer snapshot."""
    run, governor = governed_run(epochs=3)
    run.gov.start()
    run._epoch()
    step_after_epoch_1 = run.state.step
    (first,) = validations(governor.drain())
    run._epoch()  # epoch 2 validates before epoch 1's verdict arrives
    (second,) = validations(governor.drain())
    governor.ack()  # the train stream vouches for both (every record judged, no command)
    governor.verdict(first.seq, first.timeline, first.step, common_pb2.VERDICT_KIND_HEALTHY, True)
    run.gov.agreement_point()
    validated = run.gov.lkg.choose()  # the newest validated snapshot (step snapshots come and go beside them)
    assert validated is not None
    assert validated.step == step_after_epoch_1
    governor.verdict(second.seq, second.timeline, second.step, common_pb2.VERDICT_KIND_HEALTHY, True)
    run.gov.agreement_point()
    validated = run.gov.lkg.choose()
    assert validated is not None
    assert validated.step == run.state.step
    published = [m.snapshot_taken.step for m in governor.drain() if m.HasField("snapshot_taken")]
    assert [s for s in published if s % 250] == [step_after_epoch_1, run.state.step]


@pytest.mark.slow
def test_panic_on_the_last_validation_trains_to_the_end_again() -> None:
    """A ROLLBACK that arrives while the trainer waits for its last verdict restores, then trains the epochs again."""
    run, governor = governed_run(epochs=2, verdict_wait_s=0.2)
    agreement_point = run.gov.agreement_point
    answered: list[int] = []
    last_validation_agreements = 0

    def late_answer() -> Outcome:
        nonlocal last_validation_agreements
        last_validation_agreements += run.state.epoch == 2
        if last_validation_agreements == 2 and not answered:  # after the last validation's own agreement point
            governor.drain()
            record = validations(governor.sent)[-1]
            answered.append(record.seq)
            governor.verdict(record.seq, record.timeline, record.step, common_pb2.VERDICT_KIND_PANIC, False)
            governor.command(1, common_pb2.COMMAND_TYPE_ROLLBACK, timeline=record.timeline)
        return agreement_point()

    run.gov.agreement_point = late_answer  # type: ignore[method-assign]
    summary = run.run()
    assert answered, "the last validation's verdict was awaited"
    assert (summary.status, summary.epochs_completed, summary.rollbacks) == ("completed", 2, 1), summary
    assert summary.timeline == 1


@pytest.mark.slow
def test_trainer_welcomed_before_training_adopts_the_run_timeline() -> None:
    """A (re)started trainer welcomed on timeline 3 trains and reports on timeline 3 from its first record."""
    run, governor = governed_run(epochs=1)
    governor.welcome(timeline=3)
    summary = run.run()
    sent = governor.drain()
    timelines = {b.timeline for b in batches(sent)} | {v.timeline for v in validations(sent)}
    assert timelines == {3}
    assert summary.timeline == 3


@pytest.mark.slow
def test_resync_moves_the_trainer_to_the_run_timeline_and_counts_unjudged_records() -> None:
    """A Resync mid-run: the next agreement point adopts its timeline; the summary counts the stale records."""
    run, governor = governed_run(epochs=2)
    stale: list[int] = []

    def on_progress(event: dict[str, Any]) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            sent = governor.drain()
            stale.extend(b.first_seq + i for b in batches(sent) for i in range(len(b.step)))
            stale.extend(v.seq for v in validations(sent))
            governor.resync(timeline=2, up_to_seq=max(stale))

    run.progress = on_progress
    summary = run.run()
    later = [m for m in governor.drain() if m.WhichOneof("message") in ("vitals_batch", "validation_record")]
    assert {getattr(m, str(m.WhichOneof("message"))).timeline for m in later} == {2}
    assert (summary.timeline, summary.unjudged_records) == (2, len(stale))


def test_healthy_verdicts_publish_every_epoch_and_the_end_does_not_wait() -> None:
    """Verdicts that arrive at once publish each epoch's snapshot; the last one is not waited for again."""
    run, governor = governed_run(epochs=3, verdict_wait_s=60.0)

    def answer(event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            governor.drain()
            governor.ack()
            record = validations(governor.sent)[-1]
            governor.verdict(record.seq, record.timeline, record.step, common_pb2.VERDICT_KIND_HEALTHY, True)

    run.progress = answer
    summary = run.run()
    governor.drain()
    snapshots = [m.snapshot_taken.step for m in governor.sent if m.HasField("snapshot_taken")]
    assert snapshots == [0, 128, 256, 384], "the initial LKG and one per epoch"
    assert summary.duration_s < 60.0, "the last verdict had arrived: no --verdict-wait-s at the end"


def test_rollback_culls_the_live_seed_and_the_run_trains_its_epochs_again() -> None:
    """With a scripted Governance in plain types: a PANIC and a ROLLBACK after epoch 2 cull the seed germinated
    at epoch 2, restore the LKG of epoch 1, and the run still ends with every epoch done."""
    fake = FakeGovernance(auto_verdict=True)
    run = GovernedRun(
        RunConfig(task="synthetic", epochs=3, batch_size=8, agree_every_steps=10, seed_schedule="germinate:residual@2"),
        governance=fake,
    )

    def rollback_once(event: dict[str, Any]) -> None:
        if event["event"] == "epoch" and event["epoch"] == 2 and not fake.results:
            fake.verdict_on(max(fake.validations), VerdictKind.PANIC, allowed=False)
            fake.order(CommandType.ROLLBACK, skip=3)

    run.progress = rollback_once
    summary = run.run()
    assert (summary.status, summary.exit_code, summary.rollbacks, summary.epochs_completed) == ("completed", 0, 1, 3)
    (result,) = fake.results
    assert (result.num_culled_seeds, result.restored_step, result.succeeded) == (1, 128, True), "the LKG of epoch 1"
    assert summary.epochs_run == 4, "epochs 1, 2, then 2 and 3 again"
    assert fake.finish is not None
    assert fake.finish.status is FinishStatus.COMPLETED
    assert summary.final_validation_loss is not None, "validated again after the restore"
    assert {timeline for timeline, _, _ in fake.steps} == {0, 1}


def test_halt_without_resume_ends_the_run_halted() -> None:
    fake = FakeGovernance(auto_verdict=True)
    run = GovernedRun(
        RunConfig(task="synthetic", epochs=3, batch_size=8, agree_every_steps=10, halt_wait_s=0.0), governance=fake
    )
    fake.order(CommandType.HALT)
    summary = run.run()
    assert (summary.status, summary.exit_code, summary.epochs_completed) == ("halted", 3, 0)
    assert fake.finish is not None
    assert fake.finish.status is FinishStatus.HALTED
    assert [r.command.type for r in fake.results] == [CommandType.HALT]


def test_a_governor_that_never_judged_a_record_is_not_claimed() -> None:
    """Hardening 2, defect 4: with --governor naming a dead port, tolaria-train exited 0 with "governed": true,
    unjudged_records 0 and an empty message. A run whose governor never acknowledged a record is ungoverned and
    says so, naming the governor; every record it sent counts as never judged."""
    connection = UnstartedConnection("127.0.0.1:1", HELLO)  # never welcomed: nothing listens there
    config = RunConfig(task="synthetic", epochs=2, batch_size=8, agree_every_steps=10, final_flush_s=0.0)
    run = GovernedRun(RunConfig(**{**config.__dict__, "verdict_wait_s": 0.0}), governance=connection)
    summary = run.run()
    assert (summary.status, summary.exit_code, summary.epochs_completed) == ("completed", 0, 2)
    assert summary.governed is False
    assert summary.governor == "127.0.0.1:1"
    assert summary.message.startswith("ungoverned: the governor at 127.0.0.1:1 never judged a record (")
    assert summary.never_judged_records == run.state.step + 2, "every train step and both validations"
    assert summary.seconds_without_governor > 0


def test_a_governor_lost_mid_run_is_reported_with_what_it_never_judged() -> None:
    """The daemon killed mid-run (hardening 2, defect 4): the records it acknowledged were judged, the ones after
    its stream was lost never were. The summary stays governed, counts them, and the message names the
    governor, the seconds without it and the lost stream."""
    run, governor = governed_run(epochs=3)
    acked: list[int] = []

    def on_progress(event: dict[str, Any]) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            governor.drain()
            governor.ack()
            acked.append(run.state.step + 1)  # the steps and the one validation so far
            governor.protocol.connection_lost(time.monotonic(), "UNAVAILABLE", "daemon killed")

    run.progress = on_progress
    summary = run.run()
    assert (summary.status, summary.epochs_completed, summary.governed) == ("completed", 3, True)
    assert summary.never_judged_records == run.state.step + 3 - acked[0]
    assert summary.message.startswith(
        f"partly governed: {summary.never_judged_records} record(s) never judged by the governor at unused, "
    )
    assert summary.message.endswith("without it, its stream lost 1 time(s)")


def test_settle_waits_for_a_reconnecting_governor_when_a_command_is_known_to_be_coming() -> None:
    """Hardening 2, defect 4: a daemon killed right after journaling its ROLLBACK, and both ranks finished on the
    condemned weights: settle() did not wait while disconnected. A rank that skipped a non-finite step knows a
    command is coming; settle waits (bounded by connect_wait_s) for the governor to return and executes it."""
    run, governor = governed_run(inject=["nan@epoch=1"], epochs=1)
    run.gov.start()
    run._epoch()
    assert run.gov.condemned, "the NaN step was skipped: a ROLLBACK is on its way"
    lock = run.gov.governance._lock  # type: ignore[attr-defined]
    with lock:
        governor.protocol.connection_lost(time.monotonic(), "UNAVAILABLE", "daemon killed")

    def daemon_comes_back() -> None:
        time.sleep(0.3)
        with lock:
            governor.welcome()
            governor.command(1, common_pb2.COMMAND_TYPE_ROLLBACK, timeline=0)

    thread = threading.Thread(target=daemon_comes_back)
    thread.start()
    outcome = run.gov.settle()
    thread.join()
    assert (outcome.restored, run.state.timeline) == (True, 1), "the ROLLBACK was executed before the run ended"
