"""GovernorConnection, socket-free: the port's answers read from the real protocol, and its translation to
and from the contract. Its sender thread never starts; ``ScriptedGovernor`` plays the daemon through the
connection's protocol."""

from __future__ import annotations

import math

from tests.unit.trainer.helpers import HELLO, ScriptedGovernor
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria_trainer.client import GovernorConnection
from tolaria_trainer.governance import (
    CommandType,
    FinishReport,
    FinishStatus,
    SeedReport,
    ValidationReport,
    VerdictKind,
)


def _welcomed(welcome: trainer_service_pb2.Welcome | None = None) -> tuple[GovernorConnection, ScriptedGovernor]:
    connection = GovernorConnection("unused", HELLO)
    governor = ScriptedGovernor(connection.protocol)
    if welcome is None:
        governor.welcome()
    else:
        connection.protocol.connecting(0.0)
        connection.protocol.receive(trainer_service_pb2.AttachResponse(welcome=welcome), 0.0)
    return connection, governor


def test_before_a_welcome_the_port_knows_nothing_of_the_run() -> None:
    connection = GovernorConnection("unused", HELLO)
    assert (connection.connected, connection.refusal, connection.run_timeline) == (False, None, 0)
    assert (connection.train_verification_steps, connection.last_snapshot) == (None, None)
    assert connection.take_commands() == []
    assert connection.verdict(1, wait_s=0.0) is None


def test_verification_steps_of_a_daemon_from_before_the_field_follow_its_patience_rules() -> None:
    """A Welcome without ``train_verification_steps`` comes from an older daemon: the default profile judged
    the train stream with its patience rules, any other profile only non-finite records."""
    older = common_pb2.Policy(profile="default", step_loss_patience=4, step_collapse_patience=9)
    assert _welcomed(trainer_service_pb2.Welcome(generation=1, effective_policy=older))[0].train_verification_steps == 9
    other = common_pb2.Policy(profile="seed", step_loss_patience=4, step_collapse_patience=9)
    assert _welcomed(trainer_service_pb2.Welcome(generation=1, effective_policy=other))[0].train_verification_steps == 0
    named = trainer_service_pb2.Welcome(generation=1, effective_policy=older, train_verification_steps=30)
    assert _welcomed(named)[0].train_verification_steps == 30


def test_the_last_snapshot_is_named_only_with_a_digest() -> None:
    published = trainer_service_pb2.PublishedSnapshot(timeline=2, step=40, digest="ab12")
    assert _welcomed(trainer_service_pb2.Welcome(generation=1, last_snapshot=published))[0].last_snapshot == (
        2,
        40,
        "ab12",
    )
    undigested = trainer_service_pb2.PublishedSnapshot(timeline=2, step=40)
    assert _welcomed(trainer_service_pb2.Welcome(generation=1, last_snapshot=undigested))[0].last_snapshot is None


def test_commands_are_read_whole_and_unknown_types_skipped() -> None:
    connection, governor = _welcomed()
    governor.command(1, 99, timeline=0)  # a newer daemon's command type
    rollback = trainer_service_pb2.Command(
        command_id=2,
        type=common_pb2.COMMAND_TYPE_ROLLBACK,
        generation=governor.generation,
        timeline=0,
        reason="divergence",
        punishment_reward=-1.5,
        recovery_skip_batches=3,
        onset_step=17,
    )
    connection.protocol.receive(trainer_service_pb2.AttachResponse(command=rollback), 0.0)
    assert connection.commands_waiting
    (command,) = connection.take_commands()
    assert (command.command_id, command.type, command.reason) == (2, CommandType.ROLLBACK, "divergence")
    assert (command.punishment_reward, command.recovery_skip_batches, command.onset_step) == (-1.5, 3, 17)
    assert command.recovery_lr_scale == 1.0, "an unset scale is no change"
    assert (command.restore_before_step, command.skip_through_step) == (None, None), "unset fields stay unset"
    assert connection.take_commands() == [], "each command once"


def test_a_verdict_of_a_kind_this_trainer_does_not_know_reads_as_an_anomaly() -> None:
    connection, governor = _welcomed()
    seq = connection.send_validation(ValidationReport(timeline=0, step=5, epoch=0, loss=1.0))
    governor.verdict(seq, timeline=0, step=5, kind=77, snapshot_allowed=False)
    verdict = connection.verdict(seq, wait_s=0.0)
    assert verdict is not None
    assert (verdict.seq, verdict.kind, verdict.step, verdict.snapshot_allowed) == (seq, VerdictKind.ANOMALY, 5, False)


def test_a_validation_report_is_sent_as_the_contract_says() -> None:
    """A NaN loss is sent as it is (the governor must see it); a non-finite accuracy is left out and a finite
    one clamped to [0, 1]; optional values stay absent."""
    connection, governor = _welcomed()
    seed = SeedReport(slot="s0", blueprint="conv", stage="TRAINING", alpha=0.5)
    connection.send_validation(
        ValidationReport(timeline=0, step=5, epoch=0, loss=math.nan, accuracy=math.inf, seeds=(seed,))
    )
    connection.send_validation(ValidationReport(timeline=0, step=9, epoch=1, loss=0.5, accuracy=1.25, train_loss=0.4))
    first, second = (m.validation_record for m in governor.drain() if m.WhichOneof("message") == "validation_record")
    assert math.isnan(first.loss)
    assert not first.HasField("accuracy")
    assert [(s.slot, s.blueprint, s.stage, s.alpha) for s in first.seeds] == [("s0", "conv", "TRAINING", 0.5)]
    assert (second.accuracy, second.train_loss, second.HasField("perplexity")) == (1.0, 0.4, False)


def test_close_queues_the_finish_and_says_whether_it_was_flushed() -> None:
    """Without a sender nothing is acknowledged: close gives up after its bound and says so, the Finish queued."""
    connection, governor = _welcomed()
    finish = FinishReport(FinishStatus.COMPLETED, 3, 1, "done", 12.5, final_validation_accuracy=math.nan)
    assert connection.close(finish, flush_timeout_s=0.0) is False
    assert connection.pending() == 1
    (message,) = governor.drain()
    assert message.finish.status == common_pb2.FINISH_STATUS_COMPLETED
    assert (message.finish.epochs_completed, message.finish.num_rollbacks, message.finish.message) == (3, 1, "done")
    assert not message.finish.HasField("final_validation_accuracy")
