"""ControlService without a socket: every RPC of the real servicer over the real runtime, core and journal, with a
ServicerContext double (harness.py). A refusal aborts with the status code of status_codes.py and the error's
text, and changes nothing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from governor_daemon.core import Limits
from governor_daemon.core import events as ev
from tests.unit.service.harness import (
    CALLER,
    Daemon,
    Trainer,
    aborted_with,
    finish,
    hello,
    on_daemon,
    servicer_context,
    validation,
)
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb


async def refused(daemon: Daemon, method: str, request: object) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` expecting a refusal; returns its (code, details), having checked it changed nothing."""
    before = daemon.state()
    context = servicer_context()
    with pytest.raises(grpc.aio.AbortError):
        await getattr(daemon.control, method)(request, context)
    assert daemon.state() == before, f"a refused {method} changed the journal or the runs"
    return aborted_with(context)


async def answered(daemon: Daemon, method: str, request: object) -> Any:
    """Call ``method`` expecting an answer (no abort)."""
    context = servicer_context()
    response = await getattr(daemon.control, method)(request, context)
    context.abort.assert_not_awaited()
    return response


# ------------------------------------------------------------------------------------ reads


def test_get_panic_state_of_an_attached_run(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        trainer.send(validation(1, 10, 2.0))
        await trainer.next("verdict")
        response = await answered(daemon, "GetPanicState", cpb.GetPanicStateRequest(run_id="run-1"))
        run = response.run
        assert (run.run_id, run.state, run.world_size, run.task, run.history_size) == (
            "run-1",
            common_pb2.RUN_STATE_HEALTHY,
            1,
            "digits",
            1,
        )
        assert [(r.rank, r.attached, r.last_durable_seq) for r in run.ranks] == [(0, True, 1)]
        assert math.isclose(run.random_guess_loss, math.log(10))
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_get_panic_state_refusals(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        assert await refused(daemon, "GetPanicState", cpb.GetPanicStateRequest(run_id="nope")) == (
            grpc.StatusCode.NOT_FOUND,
            "no run 'nope'; `governor runs` lists the known runs",
        )
        assert await refused(daemon, "GetPanicState", cpb.GetPanicStateRequest(run_id="bad id")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "run_id: must match [A-Za-z0-9._-]{1,128}, got 'bad id'",
        )

    on_daemon(tmp_path / "data", scenario)


def test_list_runs_filters_by_state(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        done = await Trainer.attached(daemon)
        done.send(finish(1))
        await done.next("ack")
        await done.close()
        live = await Trainer.attached(daemon, hello("run-2"))

        async def listed(*states: common_pb2.RunState.ValueType) -> list[str]:
            response = await answered(daemon, "ListRuns", cpb.ListRunsRequest(states=states))
            return [r.run_id for r in response.runs]

        assert await listed() == ["run-1", "run-2"]
        assert await listed(common_pb2.RUN_STATE_FINISHED) == ["run-1"]
        assert await listed(common_pb2.RUN_STATE_HEALTHY) == ["run-2"]
        assert await listed(common_pb2.RUN_STATE_HALTED) == []
        assert await refused(
            daemon,
            "ListRuns",
            cpb.ListRunsRequest(states=[common_pb2.RUN_STATE_HEALTHY, common_pb2.RunState.ValueType(99)]),
        ) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "states: unknown run states [99]",
        )
        await live.close()

    on_daemon(tmp_path / "data", scenario)


def test_get_policy_and_update_policy(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        response = await answered(
            daemon,
            "UpdatePolicy",
            cpb.UpdatePolicyRequest(run_id="run-1", changes=common_pb2.Policy(absolute_threshold=1.0)),
        )
        assert response.policy.absolute_threshold == 1.0
        policy = await answered(daemon, "GetPolicy", cpb.GetPolicyRequest(run_id="run-1"))
        assert policy.policy.absolute_threshold == 1.0
        change = daemon.on_disk("run-1")[-1]
        assert (change.kind, change.payload["caller"], change.payload["changes"]) == (
            "policy_change",
            CALLER,
            {"absolute_threshold": 1.0},
        )
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_update_policy_refusals(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        code, details = await refused(
            daemon,
            "UpdatePolicy",
            cpb.UpdatePolicyRequest(run_id="run-1", changes=common_pb2.Policy(recovery_lr_scale=2.0)),
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("changes: ")
        assert "recovery_lr_scale" in details
        assert await refused(daemon, "UpdatePolicy", cpb.UpdatePolicyRequest(run_id="run-1")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "changes: no policy field is set",
        )
        assert await refused(
            daemon, "UpdatePolicy", cpb.UpdatePolicyRequest(run_id="nope", changes=common_pb2.Policy(sensitivity=3.0))
        ) == (grpc.StatusCode.NOT_FOUND, "no run 'nope'; `governor runs` lists the known runs")
        assert await refused(daemon, "GetPolicy", cpb.GetPolicyRequest(run_id="")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "run_id: must match [A-Za-z0-9._-]{1,128}, got ''",
        )
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


# ------------------------------------------------------------------------------------ commands


def test_request_rollback_answers_once_durable_and_commands_the_trainer(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        response = await answered(
            daemon, "RequestRollback", cpb.RequestRollbackRequest(run_id="run-1", reason="operator saw a bad batch")
        )
        assert response.run_state == common_pb2.RUN_STATE_ROLLING_BACK
        request = next(e for e in daemon.on_disk("run-1") if e.kind == "controller_request")
        assert (request.payload["action"], request.payload["caller"]) == ("rollback", CALLER), "durable at the answer"
        command = (await trainer.next("command")).command
        assert (command.command_id, command.type) == (response.command_id, common_pb2.COMMAND_TYPE_ROLLBACK)
        assert "operator saw a bad batch" in command.reason
        again = cpb.RequestRollbackRequest(run_id="run-1", reason="again")
        code, details = await refused(daemon, "RequestRollback", again)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.startswith("cannot roll back now: "), details
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_halt_then_resume(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        assert await refused(daemon, "Resume", cpb.ResumeRequest(run_id="run-1", reason="early")) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "run is healthy, not halted; only a halted run can be resumed",
        )
        halted = await answered(daemon, "Halt", cpb.HaltRequest(run_id="run-1", reason="looks off"))
        assert halted.run_state == common_pb2.RUN_STATE_HALTED
        halt = (await trainer.next("command")).command
        assert (halt.type, halt.command_id) == (common_pb2.COMMAND_TYPE_HALT, halted.command_id)
        assert await refused(daemon, "Halt", cpb.HaltRequest(run_id="run-1", reason="again")) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "run is already halted; use Resume to continue it",
        )
        resumed = await answered(daemon, "Resume", cpb.ResumeRequest(run_id="run-1", reason="checked the data"))
        assert resumed.run_state == common_pb2.RUN_STATE_ROLLING_BACK
        resume = (await trainer.next("command")).command
        assert (resume.type, resume.command_id) == (common_pb2.COMMAND_TYPE_RESUME, resumed.command_id)
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_command_refusals_for_bad_input(tmp_path: Path) -> None:
    """A reason over max_string_length, a malformed or unknown run id: refused before anything is journaled."""

    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        for method, make in (
            ("RequestRollback", cpb.RequestRollbackRequest),
            ("Halt", cpb.HaltRequest),
            ("Resume", cpb.ResumeRequest),
            ("ForgetRun", cpb.ForgetRunRequest),
        ):
            assert await refused(daemon, method, make(run_id="run-1", reason="x" * 17)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "reason: longer than 16 characters (17)",
            ), method
            assert await refused(daemon, method, make(run_id="run/1", reason="why")) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "run_id: must match [A-Za-z0-9._-]{1,128}, got 'run/1'",
            ), method
            assert await refused(daemon, method, make(run_id="nope", reason="why")) == (
                grpc.StatusCode.NOT_FOUND,
                "no run 'nope'; `governor runs` lists the known runs",
            ), method
        assert trainer.received[1:] == [], "no command reached the trainer"
        await trainer.close()

    on_daemon(tmp_path / "data", scenario, limits=Limits(max_string_length=16))


def test_forget_run(tmp_path: Path) -> None:
    """Refused while a trainer is attached; once it is gone, the run leaves memory (journaled) and the answer
    carries the journal's cursor."""

    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        assert await refused(daemon, "ForgetRun", cpb.ForgetRunRequest(run_id="run-1", reason="done")) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "run run-1 has trainers attached (ranks [0]); stop them first",
        )
        await trainer.close()
        response = await answered(daemon, "ForgetRun", cpb.ForgetRunRequest(run_id="run-1", reason="done"))
        forgotten = daemon.on_disk("run-1")[-1]
        assert (forgotten.kind, forgotten.seq, forgotten.payload["caller"]) == (
            "run_forgotten",
            response.cursor,
            CALLER,
        )
        assert response.cursor == daemon.governor.committer.last_seq
        assert await refused(daemon, "GetPanicState", cpb.GetPanicStateRequest(run_id="run-1")) == (
            grpc.StatusCode.NOT_FOUND,
            "no run 'run-1'; `governor runs` lists the known runs",
        )

    on_daemon(tmp_path / "data", scenario)


# ------------------------------------------------------------------------------------ WatchEvents


def test_watch_events_sends_headers_then_the_runs_entries_then_live_ones(tmp_path: Path) -> None:
    """The journaled entries of the runs asked for (another run's interleave with them), then a live one."""

    async def scenario(daemon: Daemon) -> None:
        trainer = await Trainer.attached(daemon)
        other = await Trainer.attached(daemon, hello("run-2"))
        await trainer.close()
        await other.close()
        await daemon.governor.settled()
        journaled = daemon.on_disk("run-1")
        assert [e.kind for e in journaled] == ["run_created", "attach", "detach"]
        context = servicer_context()
        request = cpb.WatchEventsRequest(cursor=0, run_ids=["run-1"])
        watch = cast(AsyncGenerator[cpb.WatchEventsResponse], daemon.control.WatchEvents(request, context))
        async with contextlib.aclosing(watch):
            seen = [await anext(watch) for _ in journaled]
            context.send_initial_metadata.assert_awaited_once()
            await daemon.governor.call(ev.UpdatePolicy("run-1", {"sensitivity": 4.0}, CALLER, daemon.governor.now()))
            live = await anext(watch)
        context.abort.assert_not_awaited()
        assert [(m.cursor, m.run_id, m.kind) for m in seen] == [(e.seq, e.run, e.kind) for e in journaled]
        assert (live.cursor, live.kind) == (daemon.on_disk("run-1")[-1].seq, "policy_change")

    on_daemon(tmp_path / "data", scenario)


def test_watch_events_with_a_malformed_run_id_is_invalid_argument(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        context = servicer_context()
        with pytest.raises(grpc.aio.AbortError):
            async for _ in daemon.control.WatchEvents(cpb.WatchEventsRequest(run_ids=["ok", "not ok"]), context):
                pass
        assert aborted_with(context) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "run_id: must match [A-Za-z0-9._-]{1,128}, got 'not ok'",
        )
        context.send_initial_metadata.assert_not_awaited()

    on_daemon(tmp_path / "data", scenario)
