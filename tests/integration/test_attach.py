"""TrainerService.Attach against a real daemon: handshake, verdicts, commands, timelines, reconnects."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import grpc
import pytest

from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.integration.conftest import warm_up
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

Connect = Callable[..., AttachClient]


def state(control: cgrpc.ControlServiceStub, run_id: str = "run-1") -> cpb.RunStatus:
    return control.GetPanicState(cpb.GetPanicStateRequest(run_id=run_id)).run


def test_handshake(connect: Connect) -> None:
    """Welcome carries generation 1, the effective policy, seq 0, timeline 0 and the RGL."""
    client = connect(overrides={"sensitivity": 5.0})
    welcome = client.welcome
    assert welcome is not None
    assert (welcome.generation, welcome.last_durable_seq, welcome.timeline) == (1, 0, 0)
    assert welcome.effective_policy.sensitivity == 5.0
    assert welcome.effective_policy.history_window == 20
    assert welcome.random_guess_loss == pytest.approx(math.log(10))
    assert welcome.run_state == common_pb2.RUN_STATE_HEALTHY


def test_verdicts_name_record_and_allow_snapshots(connect: Connect) -> None:
    """Each validation record gets a Verdict naming its (seq, timeline, step); acks follow."""
    client = connect()
    seq = client.validation(10, 2.3, epoch=1)
    verdict = client.next("verdict").verdict
    assert (verdict.seq, verdict.timeline, verdict.step) == (seq, 0, 10)
    assert verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
    assert verdict.snapshot_allowed
    assert verdict.reason == "warm-up: 1/10 losses in history"
    client.wait_ack(seq)


def test_nan_rolls_back_with_punishment(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """A NaN: PANIC verdict, then a ROLLBACK command with reward -10, on the same stream."""
    client = connect()
    step = warm_up(client)
    seq = client.validation(step + 10, math.nan)
    verdict = client.next("verdict").verdict
    assert (verdict.kind, verdict.seq, verdict.snapshot_allowed) == (common_pb2.VERDICT_KIND_PANIC, seq, False)
    command = client.next("command").command
    assert (command.type, command.punishment_reward, command.generation) == (common_pb2.COMMAND_TYPE_ROLLBACK, -10.0, 1)
    kinds = [m.WhichOneof("message") for m in client.received]
    assert kinds.index("command") > len(kinds) - 1 - kinds[::-1].index("verdict"), "Verdict precedes its Command"
    assert state(control).state == common_pb2.RUN_STATE_ROLLING_BACK
    client.wait_ack(client.result(command))
    status = state(control)
    assert (status.state, status.timeline, status.num_rollbacks) == (common_pb2.RUN_STATE_HEALTHY, 1, 1)
    assert status.total_punishment_reward == -10.0


def test_two_divergences_roll_back(connect: Connect) -> None:
    """Two consecutive divergent losses: ANOMALY then PANIC with ROLLBACK."""
    client = connect()
    step = warm_up(client)
    client.validation(step + 10, 40.0)
    assert client.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_ANOMALY
    client.validation(step + 20, 45.0)
    verdict = client.next("verdict").verdict
    assert verdict.kind == common_pb2.VERDICT_KIND_PANIC
    assert "2/2 consecutive" in verdict.reason
    assert client.next("command").command.type == common_pb2.COMMAND_TYPE_ROLLBACK


def test_train_step_nan_rolls_back(connect: Connect) -> None:
    """A non-finite grad norm in a VitalsBatch rolls back without waiting for validation."""
    client = connect()
    last = client.vitals([1, 2, 3], [2.0, 1.9, 1.8], [1.0, math.inf, 1.0])
    command = client.next("command").command
    assert command.type == common_pb2.COMMAND_TYPE_ROLLBACK
    assert "grad_norm inf at step 2" in command.reason
    client.wait_ack(last)


def test_stale_timeline_records_change_nothing(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """Records of timeline 0 arriving after the rollback are journaled as stale, never decided."""
    client = connect()
    step = warm_up(client)
    client.validation(step + 10, math.nan)
    command = client.next("command").command
    client.wait_ack(client.result(command))
    before = state(control)
    seq = client.validation(step + 20, 1000.0, timeline=0)
    last = client.vitals([step + 21], [math.nan], timeline=0)
    client.wait_ack(last)
    after = state(control)
    assert seq < last
    assert (after.timeline, after.state, after.history_size, after.consecutive_anomalies, after.num_rollbacks) == (
        before.timeline,
        before.state,
        before.history_size,
        before.consecutive_anomalies,
        before.num_rollbacks,
    )
    assert [m for m in client.received if m.WhichOneof("message") == "verdict"][-1].verdict.seq != seq


def test_one_rollback_at_a_time(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """While a ROLLBACK is open, another NaN gets a PANIC verdict but no second command."""
    client = connect()
    step = warm_up(client)
    client.validation(step + 10, math.nan)
    first = client.next("command").command
    client.validation(step + 20, math.nan)
    verdict = client.next("verdict").verdict
    assert "still open" in verdict.reason
    client.wait_ack(client.seq)
    assert [m.command.command_id for m in client.received if m.WhichOneof("message") == "command"] == [first.command_id]
    assert state(control).num_rollbacks == 1


def test_loop_breaker_halts_then_resume(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """The fourth rollback in the window becomes HALT; Resume sends RESUME and the run continues."""
    client = connect()
    step = warm_up(client)
    types = []
    for i in range(4):
        client.validation(step + 10 * (i + 1), math.nan)
        command = client.next("command").command
        types.append(command.type)
        client.wait_ack(client.result(command))
    assert types == [common_pb2.COMMAND_TYPE_ROLLBACK] * 3 + [common_pb2.COMMAND_TYPE_HALT]
    assert state(control).state == common_pb2.RUN_STATE_HALTED
    with pytest.raises(grpc.RpcError) as info:
        control.Halt(cpb.HaltRequest(run_id="run-1", reason="again"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    response = control.Resume(cpb.ResumeRequest(run_id="run-1", reason="checked the data"))
    assert response.run_state == common_pb2.RUN_STATE_ROLLING_BACK
    resume = client.next("command").command
    assert (resume.type, resume.command_id, resume.punishment_reward) == (
        common_pb2.COMMAND_TYPE_RESUME,
        response.command_id,
        0.0,
    )
    client.wait_ack(client.result(resume))
    status = state(control)
    assert (status.state, status.timeline, status.num_halts) == (common_pb2.RUN_STATE_HEALTHY, 4, 1)
    client.validation(step + 100, 0.5)
    assert client.next("verdict").verdict.kind == common_pb2.VERDICT_KIND_HEALTHY


def test_command_without_result_times_out_to_halted(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """A ROLLBACK with no CommandResult after command_timeout_s HALTs the run, and the trainer is told:
    a HALT command follows (defect 4: the run was HALTED in the daemon while the trainer kept training)."""
    client = connect(overrides={"command_timeout_s": 0.3})
    client.validation(10, math.nan)
    rollback = client.next("command").command
    halt = client.next("command").command
    assert (rollback.type, halt.type) == (common_pb2.COMMAND_TYPE_ROLLBACK, common_pb2.COMMAND_TYPE_HALT)
    assert halt.command_id > rollback.command_id
    assert halt.punishment_reward == 0.0
    assert "had no result" in halt.reason
    status = state(control)
    assert status.state == common_pb2.RUN_STATE_HALTED
    assert status.total_punishment_reward == 0.0, "no trainer executed the ROLLBACK; the timeout's HALT costs 0"


def test_reconnect_resends_after_welcome_seq_without_double_counting(
    connect: Connect, control: cgrpc.ControlServiceStub
) -> None:
    """A second attachment of the same incarnation gets the last durable seq; resent records are not recounted."""
    first = connect(incarnation_id="inc-a")
    last = first.vitals([1, 2, 3], [2.0, 1.9, 1.8])
    first.wait_ack(last)
    first.close()
    second = connect(incarnation_id="inc-a")
    assert second.welcome is not None
    assert (second.welcome.last_durable_seq, second.welcome.generation) == (3, 2)
    # The trainer resends what it still holds from seq 2 on, plus new records.
    last = second.vitals([2, 3, 4, 5], [1.9, 1.8, 1.7, 1.6], first_seq=2)
    second.wait_ack(last)
    rank = state(control).ranks[0]
    assert (rank.num_records, rank.num_record_gaps, rank.last_durable_seq, rank.latest_step) == (5, 0, 5, 5)


def test_new_incarnation_fresh_seq_keeps_history(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """A restarted trainer (new incarnation) starts at seq 0 and keeps the run's history and policy."""
    first = connect(incarnation_id="inc-a")
    warm_up(first)
    first.close()
    history = state(control).history_size
    second = connect(incarnation_id="inc-b")
    assert second.welcome is not None
    assert second.welcome.last_durable_seq == 0
    assert state(control).history_size == history == 12
    second.validation(500, 0.5)
    assert second.next("verdict").verdict.reason.startswith("normal:")


def test_live_duplicate_hello_is_refused(connect: Connect) -> None:
    """A Hello for a (run, rank) attached by another live incarnation gets ALREADY_EXISTS."""
    connect(incarnation_id="inc-a")
    with pytest.raises(grpc.RpcError) as info:
        connect(incarnation_id="inc-b")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_later_hello_with_other_overrides_is_refused(connect: Connect) -> None:
    """A later Hello must match the run's overrides: FAILED_PRECONDITION."""
    connect(incarnation_id="inc-a", overrides={"sensitivity": 5.0}).close()
    with pytest.raises(grpc.RpcError) as info:
        connect(incarnation_id="inc-b", overrides={"sensitivity": 4.0})
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "must match" in (info.value.details() or "")


def test_two_ranks_same_verdict_and_command(connect: Connect) -> None:
    """Both ranks get the same verdict and the same command id; the max is judged."""
    r0 = connect(rank=0, world_size=2)
    r1 = connect(rank=1, world_size=2)
    r0.validation(10, 2.0)
    r1.validation(10, 2.2)
    v0, v1 = r0.next("verdict").verdict, r1.next("verdict").verdict
    assert (v0.kind, v0.reason) == (v1.kind, v1.reason)
    assert "1/10" in v0.reason
    r0.validation(20, 1.0)
    r1.validation(20, math.nan)
    c0, c1 = r0.next("command").command, r1.next("command").command
    assert c0.command_id == c1.command_id
    assert c0.type == c1.type == common_pb2.COMMAND_TYPE_ROLLBACK


def test_missing_rank_becomes_stalled_after_deadline(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """With one of two ranks silent, the step is decided after rank_deadline_s and the rank is STALLED."""
    r0 = connect(rank=0, world_size=2, overrides={"rank_deadline_s": 0.3})
    connect(rank=1, world_size=2, overrides={"rank_deadline_s": 0.3})
    start = time.monotonic()
    r0.validation(10, 2.0)
    verdict = r0.next("verdict").verdict
    assert time.monotonic() - start >= 0.25
    assert verdict.kind == common_pb2.VERDICT_KIND_HEALTHY
    status = state(control)
    assert status.state == common_pb2.RUN_STATE_STALLED
    assert [r.stalled for r in status.ranks] == [False, True]


def test_bad_input_is_refused_and_changes_nothing(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """A batch with unequal columns ends the stream with INVALID_ARGUMENT naming the field; state unchanged."""
    client = connect()
    last = client.vitals([1, 2], [2.0, 1.9])
    client.wait_ack(last)
    before = state(control)
    client.send(vitals_batch={"first_seq": 3, "step": [3, 4], "loss": [1.0]})
    with pytest.raises(grpc.RpcError) as info:
        client.next("ack")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vitals_batch.loss" in (info.value.details() or "")
    after = state(control)
    assert (after.ranks[0].num_records, after.ranks[0].last_durable_seq) == (
        before.ranks[0].num_records,
        before.ranks[0].last_durable_seq,
    )


def test_finish_and_list_runs(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """Finish makes the run FINISHED; ListRuns filters by state."""
    client = connect()
    seq = client.next_seq()
    client.send(finish={"seq": seq, "status": common_pb2.FINISH_STATUS_COMPLETED, "epochs_completed": 3})
    client.wait_ack(seq)
    assert state(control).state == common_pb2.RUN_STATE_FINISHED
    finished = control.ListRuns(cpb.ListRunsRequest(states=[common_pb2.RUN_STATE_FINISHED])).runs
    assert [r.run_id for r in finished] == ["run-1"]
    assert not control.ListRuns(cpb.ListRunsRequest(states=[common_pb2.RUN_STATE_HEALTHY])).runs
    with pytest.raises(grpc.RpcError) as info:
        state(control, "nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_policy_and_request_rollback(connect: Connect, control: cgrpc.ControlServiceStub) -> None:
    """UpdatePolicy changes the effective policy; RequestRollback sends a command to the trainer."""
    client = connect()
    warm_up(client)
    updated = control.UpdatePolicy(
        cpb.UpdatePolicyRequest(run_id="run-1", changes=common_pb2.Policy(absolute_threshold=1.0))
    )
    assert updated.policy.absolute_threshold == 1.0
    assert control.GetPolicy(cpb.GetPolicyRequest(run_id="run-1")).policy.absolute_threshold == 1.0
    with pytest.raises(grpc.RpcError) as info:
        control.UpdatePolicy(cpb.UpdatePolicyRequest(run_id="run-1", changes=common_pb2.Policy(recovery_lr_scale=2.0)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    response = control.RequestRollback(cpb.RequestRollbackRequest(run_id="run-1", reason="operator saw a bad batch"))
    command = client.next("command").command
    assert (command.command_id, command.type) == (response.command_id, common_pb2.COMMAND_TYPE_ROLLBACK)
    assert "operator saw a bad batch" in command.reason


def test_open_command_resent_on_reattach(daemon: InProcessDaemon) -> None:
    """A trainer that reconnects while a command is open receives it again with the new generation."""
    client = AttachClient(daemon.address, "run-r", incarnation_id="inc")
    client.connect()
    client.validation(10, math.nan)
    first = client.next("command").command
    client.close()
    again = AttachClient(daemon.address, "run-r", incarnation_id="inc")
    again.connect()
    resent = again.next("command").command
    assert (resent.command_id, resent.generation) == (first.command_id, 2)
    again.close()


def test_list_runs_with_an_unknown_state_is_invalid_argument(
    connect: Connect, control: cgrpc.ControlServiceStub
) -> None:
    """Review finding: an unknown state filter returned every run."""
    connect()
    with pytest.raises(grpc.RpcError) as info:
        control.ListRuns(cpb.ListRunsRequest(states=[99]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown run states [99]" in (info.value.details() or "")


def test_an_internal_error_names_an_incident_not_python_text() -> None:
    import structlog

    from governor_daemon.errors import InternalError

    try:
        raise KeyError("secret internals")
    except KeyError:
        error = InternalError.logged(structlog.get_logger("test"), "failed")
    assert "secret" not in str(error)
    assert str(error).startswith("internal error ")


def test_a_trainer_that_half_closes_then_cancels_is_always_detached(
    daemon: InProcessDaemon, control: cgrpc.ControlServiceStub
) -> None:
    """AttachClient.close() half-closes, then closes its channel (cancelling the call). When the cancel landed
    while the handler was waiting for its reader to end, the handler stopped before detaching: the rank
    stayed attached for good (about 1 stream in 40), and its restarted trainer got ALREADY_EXISTS."""
    runs = [f"detach-{i}" for i in range(200)]
    for run in runs:
        client = AttachClient(daemon.address, run)
        client.connect()
        client.validation(step=1, loss=0.5)
        client.next("verdict")
        client.close()
    deadline = time.monotonic() + 5
    while attached := [
        run.run_id for run in control.ListRuns(cpb.ListRunsRequest()).runs if any(r.attached for r in run.ranks)
    ]:
        assert time.monotonic() < deadline, f"{len(attached)} of {len(runs)} closed ranks still attached: {attached}"
        time.sleep(0.05)
    restarted = AttachClient(daemon.address, runs[-1], incarnation_id="restarted")
    restarted.connect()  # welcomed, not ALREADY_EXISTS
    restarted.close()
