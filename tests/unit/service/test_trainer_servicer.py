"""TrainerService.Attach without a socket: the real servicer, runtime, core and journal, driven with an async
iterator of requests and a ServicerContext double (harness.py)."""

from __future__ import annotations

import math
from pathlib import Path

import grpc

from governor_daemon.core import Limits
from governor_daemon.core.state import MAX_SEQ_JUMP
from governor_daemon.service.codec import incarnation_digest
from tests.unit.service.harness import (
    CALLER,
    Daemon,
    Trainer,
    aborted_with,
    attach,
    finish,
    hello,
    kinds,
    on_daemon,
    validation,
    vitals,
)
from tolaria.governor.v1 import common_pb2


def test_hello_records_and_finish_are_answered_in_order(tmp_path: Path) -> None:
    """Welcome, an Ack of the batch, a Verdict and Ack of the validation record, an Ack of the Finish; the call
    ends without a status, the run is FINISHED and the rank detached."""

    async def scenario(daemon: Daemon) -> None:
        call = await attach(
            daemon, [hello(), vitals(1, [1, 2, 3], [2.3, 2.2, 2.1]), validation(4, 3, 2.0, epoch=1), finish(5)]
        )
        call.context.abort.assert_not_awaited()
        assert kinds(call.responses) == ["welcome", "ack", "verdict", "ack", "ack"]
        first, ack, verdict = call.responses[0].welcome, call.responses[1].ack, call.responses[2]
        assert (first.generation, first.last_durable_seq, first.timeline) == (1, 0, 0)
        assert first.run_state == common_pb2.RUN_STATE_HEALTHY
        assert math.isclose(first.random_guess_loss, math.log(10))
        assert ack.up_to_seq == 3
        assert (verdict.verdict.seq, verdict.verdict.step, verdict.verdict.kind) == (
            4,
            3,
            common_pb2.VERDICT_KIND_HEALTHY,
        )
        assert [r.ack.up_to_seq for r in call.responses if r.HasField("ack")] == [3, 4, 5]
        run = daemon.governor.run("run-1")
        assert str(run.policy.state) == "finished"
        assert run.ranks[0].stream is None, "the stream's end detaches the rank"
        await daemon.governor.settled()
        journaled = daemon.on_disk("run-1")
        assert [e.kind for e in journaled] == ["run_created", "attach", "vitals", "decision", "finish", "detach"]
        assert journaled[1].payload["caller"] == CALLER
        assert journaled[1].payload["incarnation_id"] == incarnation_digest("inc-a"), "never the secret itself"

    on_daemon(tmp_path / "data", scenario)


def test_every_answer_arrives_after_its_entry_is_on_disk(tmp_path: Path) -> None:
    """One message at a time: when its answer reaches the trainer, the segment files already hold its entry."""

    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        assert [e.kind for e in daemon.on_disk("run-1")] == ["run_created", "attach"]
        for i in range(5):
            trainer.send(vitals(2 * i + 1, [2 * i, 2 * i + 1], [2.0, 1.9]))
            ack = (await trainer.next("ack")).ack
            assert max(e.payload.get("seq", 0) for e in daemon.on_disk("run-1")) == ack.up_to_seq == 2 * i + 2
        trainer.send(validation(11, 10, 1.8))
        verdict = (await trainer.next("verdict")).verdict
        decision = daemon.on_disk("run-1")[-1]
        assert (decision.kind, decision.payload["seqs"]) == ("decision", {"0": verdict.seq})
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_a_message_before_hello_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        before = daemon.state()
        call = await attach(daemon, [vitals(1, [1], [2.0]), hello()])
        assert call.responses == []
        assert aborted_with(call.context) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "hello: the first message must be Hello, got vitals_batch",
        )
        assert daemon.state() == before
        assert daemon.on_disk("run-1") == []

    on_daemon(tmp_path / "data", scenario)


def test_a_stream_that_ends_before_its_hello_is_refused(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        call = await attach(daemon, [])
        assert aborted_with(call.context) == (grpc.StatusCode.INVALID_ARGUMENT, "hello: no Hello within 30 s")

    on_daemon(tmp_path / "data", scenario)


def test_an_invalid_hello_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        before = daemon.state()
        call = await attach(daemon, [hello(rank=2, world_size=2)])
        assert call.responses == []
        assert aborted_with(call.context) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "hello.rank: must be < world_size 2, got 2",
        )
        assert daemon.state() == before

    on_daemon(tmp_path / "data", scenario)


def test_a_second_hello_ends_the_stream(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        trainer.send(hello())
        await trainer.close()  # ends the call also where the daemon failed to refuse it
        assert aborted_with(trainer.context) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "hello: Hello may only be the first message of a stream",
        )
        assert daemon.governor.run("run-1").ranks[0].stream is None, "a refused stream is detached"

    on_daemon(tmp_path / "data", scenario)


def test_a_record_with_seq_zero_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """The records before it stay acknowledged; the bad one and what follows it are not applied."""

    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        trainer.send(vitals(1, [1, 2], [2.0, 1.9]))
        assert (await trainer.next("ack")).ack.up_to_seq == 2
        trainer.send(validation(0, 2, math.nan))
        trainer.send(finish(3))
        await trainer.close()  # ends the call also where the daemon failed to refuse it
        assert aborted_with(trainer.context) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"validation_record.seq: must be in 1..{(1 << 62) - 1}, got 0",
        )
        run = daemon.governor.run("run-1")
        assert (run.ranks[0].last_durable_seq, run.ranks[0].num_records) == (2, 2)
        assert str(run.policy.state) == "healthy", "neither the NaN nor the Finish after it was applied"
        await daemon.governor.settled()
        assert [e.kind for e in daemon.on_disk("run-1")] == ["run_created", "attach", "vitals", "detach"]

    on_daemon(tmp_path / "data", scenario)


def test_a_seq_jump_past_the_limit_is_refused_by_the_core(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        jump = 2 + MAX_SEQ_JUMP + 1
        call = await attach(daemon, [hello(), vitals(1, [1, 2], [2.0, 1.9]), vitals(jump, [3], [1.8])])
        code, details = aborted_with(call.context)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"vitals_batch.first_seq: seq {jump} jumps more than {MAX_SEQ_JUMP}")
        run = daemon.governor.run("run-1")
        assert (run.ranks[0].last_durable_seq, run.ranks[0].num_records) == (2, 2)

    on_daemon(tmp_path / "data", scenario)


def test_resent_records_are_acknowledged_not_counted_again(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        trainer.send(vitals(1, [1, 2, 3], [2.0, 1.9, 1.8]))
        assert (await trainer.next("ack")).ack.up_to_seq == 3
        trainer.send(vitals(2, [2, 3, 4], [1.9, 1.8, 1.7]))
        assert (await trainer.next("ack")).ack.up_to_seq == 4
        await trainer.close()
        trainer.context.abort.assert_not_awaited()
        rank = daemon.governor.run("run-1").ranks[0]
        assert (rank.num_records, rank.num_gaps, rank.last_durable_seq) == (4, 0, 4)

    on_daemon(tmp_path / "data", scenario)


def test_a_nan_validation_loss_panics_then_rolls_back(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        call = await attach(daemon, [hello(), validation(1, 10, math.nan)])
        assert kinds(call.responses) == ["welcome", "verdict", "command", "ack"]
        verdict, command = call.responses[1].verdict, call.responses[2].command
        assert (verdict.kind, verdict.snapshot_allowed) == (common_pb2.VERDICT_KIND_PANIC, False)
        assert (command.type, command.punishment_reward, command.generation) == (
            common_pb2.COMMAND_TYPE_ROLLBACK,
            -10.0,
            1,
        )
        assert str(daemon.governor.run("run-1").policy.state) == "rolling_back"

    on_daemon(tmp_path / "data", scenario)


def test_a_second_live_incarnation_of_a_rank_is_already_exists(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        first = await Trainer.attached(daemon, hello(incarnation_id="inc-a"))
        before = daemon.state()
        call = await attach(daemon, [hello(incarnation_id="inc-b")])
        assert aborted_with(call.context) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "run run-1 rank 0 is attached by another live trainer process; a second trainer cannot take it over",
        )
        assert daemon.state() == before, "the refused Hello changed nothing; the first trainer keeps its rank"
        await first.close()

    on_daemon(tmp_path / "data", scenario)


def test_a_later_hello_with_other_overrides_is_failed_precondition(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        overrides = common_pb2.Policy(sensitivity=5.0)
        first = await attach(daemon, [hello(policy_overrides=overrides)])
        first.context.abort.assert_not_awaited()
        before = daemon.state()
        call = await attach(
            daemon, [hello(incarnation_id="inc-b", policy_overrides=common_pb2.Policy(sensitivity=4.0))]
        )
        code, details = aborted_with(call.context)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "a later Hello must match" in details
        assert daemon.state() == before

    on_daemon(tmp_path / "data", scenario)


def test_an_oversized_batch_is_resource_exhausted(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        call = await attach(daemon, [hello(), vitals(1, [1, 2, 3], [2.0, 1.9, 1.8])])
        assert aborted_with(call.context) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "vitals_batch: 3 records exceed the limit of 2 per batch",
        )
        assert daemon.governor.run("run-1").ranks[0].num_records == 0

    on_daemon(tmp_path / "data", scenario, limits=Limits(max_records_per_batch=2))
