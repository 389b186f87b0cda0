"""tolaria.controller against a real daemon: typed state and events, the punishment of a rollback, resumption
across a daemon restart, errors, tokens, its imports, and examples/rl_controller.py."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from governor_daemon.security import Tokens
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import REPO
from tests.integration.conftest import warm_up
from tests.integration.test_security import TOKENS, write_tokens
from tolaria.controller import (
    Action,
    CommandIssued,
    CommandResult,
    CommandType,
    ControllerClient,
    Decision,
    Event,
    NotFound,
    OtherEvent,
    PermissionDenied,
    ProtocolError,
    Refused,
    RunFinished,
    RunState,
    RunStatus,
    Unauthenticated,
    Unreachable,
    VerdictKind,
)
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc


def proto_json(message: Any) -> dict[str, Any]:
    """protobuf's own JSON mapping of a message, with 64-bit integers (strings there) as numbers and without the
    clock fields that differ between two reads (seconds since progress)."""

    def convert(desc: Any, obj: dict[str, Any]) -> dict[str, Any]:
        for name, value in list(obj.items()):
            f = desc.fields_by_name[name]
            if name == "seconds_since_progress_s":
                del obj[name]
            elif f.message_type is not None:
                obj[name] = [convert(f.message_type, v) for v in value] if isinstance(value, list) else value
            elif f.cpp_type in (f.CPPTYPE_INT64, f.CPPTYPE_UINT64):
                obj[name] = int(value)
        return obj

    return convert(message.DESCRIPTOR, json_format.MessageToDict(message, preserving_proto_field_name=True))


def nan_rollback(client: AttachClient) -> int:
    """Warm up, send a NaN and execute the ROLLBACK it orders; returns the next step."""
    step = warm_up(client) + 10
    client.validation(step, math.nan, epoch=step // 10)
    client.wait_ack(client.result(client.next("command").command))
    return step


def finish(
    client: AttachClient, status: common_pb2.FinishStatus.ValueType = common_pb2.FINISH_STATUS_COMPLETED
) -> None:
    seq = client.next_seq()
    client.send(finish=trainer_service_pb2.Finish(seq=seq, status=status, epochs_completed=3))
    client.wait_ack(seq)


def read_until(stream: Any, done: Any, limit: int = 500) -> list[Event]:
    """Events of ``stream`` up to the first for which ``done`` holds."""
    events: list[Event] = []
    for event in stream:
        events.append(event)
        if done(event) or len(events) >= limit:
            break
    return events


def test_runs_and_panic_state_are_typed(daemon: InProcessDaemon, connect: Any) -> None:
    """runs/panic_state/get_policy/update_policy return typed values equal to the daemon's messages."""
    trainer = connect("typed-run")
    nan_rollback(trainer)
    with ControllerClient(daemon.address) as client:
        status = client.panic_state("typed-run")
        assert isinstance(status, RunStatus)
        assert (status.state, status.timeline, status.world_size, status.num_rollbacks) == (RunState.HEALTHY, 1, 1, 1)
        assert (status.total_punishment_reward, status.last_punishment_reward) == (-10.0, -10.0)
        assert status.last_verdict is VerdictKind.PANIC
        assert status.open_command is None
        assert status.history_mean is not None
        assert status.history_size > 0
        assert [(r.rank, r.attached) for r in status.ranks] == [(0, True)]
        assert status.last_cursor > 0
        raw = cgrpc.ControlServiceStub(trainer.channel).GetPanicState(cpb.GetPanicStateRequest(run_id="typed-run"))
        typed = status.to_dict()
        for rank in typed["ranks"]:
            rank.pop("seconds_since_progress_s", None)
        assert typed == proto_json(raw.run), "to_dict is the contract's JSON mapping"
        assert [r.run_id for r in client.runs()] == ["typed-run"]
        assert client.runs(states=[RunState.HALTED, "finished"]) == []

        trainer.validation(500, math.nan)
        command = trainer.next("command").command  # open until answered
        open_command = client.panic_state("typed-run").open_command
        assert open_command is not None
        assert (open_command.command_id, open_command.type) == (command.command_id, CommandType.ROLLBACK)
        assert client.panic_state("typed-run").state is RunState.ROLLING_BACK
        trainer.wait_ack(trainer.result(command))

        policy = client.update_policy("typed-run", sensitivity=4.5, death_penalty=2)
        assert (policy.sensitivity, policy.death_penalty, policy.profile) == (4.5, 2.0, "default")
        assert client.get_policy("typed-run") == policy
        raw_policy = cgrpc.ControlServiceStub(trainer.channel).GetPolicy(cpb.GetPolicyRequest(run_id="typed-run"))
        assert policy.to_dict() == proto_json(raw_policy.policy)
        with pytest.raises(TypeError, match="colour"):
            client.update_policy("typed-run", colour="red")
        with pytest.raises(Refused) as refused:
            client.update_policy("typed-run", sensitivity=-1.0)
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(Refused) as refused:
            client.resume("typed-run", "not halted")
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(NotFound, match="no-such-run") as missing:
            client.panic_state("no-such-run")
        assert missing.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFound):
            client.rollback("no-such-run", "why not")


def test_events_are_typed_with_the_punishment_of_a_nan_rollback(daemon: InProcessDaemon, connect: Any) -> None:
    """A NaN's decision, its ROLLBACK with reward -10 and the trainer's result, a controller's HALT and the run's
    end arrive as typed events; the commands' rewards add up to the daemon's total."""
    trainer = connect("rl-run")
    step = nan_rollback(trainer)
    with ControllerClient(daemon.address) as client:
        receipt = client.halt("rl-run", "enough")
        assert receipt.run_state is RunState.HALTED
        halt = trainer.next("command").command
        assert halt.command_id == receipt.command_id
        trainer.wait_ack(trainer.result(halt))
        finish(trainer, common_pb2.FINISH_STATUS_HALTED)
        with client.events(runs=["rl-run"]) as stream:
            events = read_until(stream, lambda e: isinstance(e, RunFinished))
        assert [e.cursor for e in events] == sorted({e.cursor for e in events}), "in cursor order, each once"
        assert all(e.run_id == "rl-run" and e.ts.endswith("Z") and len(e.hash) == 64 for e in events)
        assert isinstance(events[0], OtherEvent)
        assert events[0].kind == "run_created"

        panic = next(e for e in events if isinstance(e, Decision) and e.verdict is VerdictKind.PANIC)
        assert (panic.source, panic.rule, panic.action, panic.step) == (
            "validation",
            "non_finite",
            Action.ROLLBACK,
            step,
        )
        assert math.isnan(panic.losses[0])
        assert panic.command is not None
        assert (panic.command.type, panic.punishment_reward, panic.run_state) == (
            CommandType.ROLLBACK,
            -10.0,
            RunState.ROLLING_BACK,
        )
        commands = [e for e in events if isinstance(e, CommandIssued)]
        assert [(c.command.type, c.cause, c.command.punishment_reward) for c in commands] == [
            (CommandType.ROLLBACK, "decision", -10.0),
            (CommandType.HALT, "controller", -10.0),
        ]
        assert commands[0].command.command_id == panic.command.command_id
        assert commands[1].command.reason == "halted by controller: enough"
        rollback_result = next(e for e in events if isinstance(e, CommandResult))
        assert (rollback_result.command_id, rollback_result.succeeded, rollback_result.new_timeline) == (
            panic.command.command_id,
            True,
            1,
        )
        assert rollback_result.restored_step == panic.command.step
        assert [n.kind for n in rollback_result.notices] == ["punishment_charged", "command_completed"]
        assert rollback_result.charged == -10.0, "charged when the trainer executed it"
        end = events[-1]
        assert isinstance(end, RunFinished)
        assert (end.rank, end.status, end.epochs_completed) == (0, "HALTED", 3)
        status = client.panic_state("rl-run")
        assert status.state is RunState.FINISHED
        charged = [e.charged for e in events if isinstance(e, CommandResult) and e.charged is not None]
        assert sum(charged) == status.total_punishment_reward == -20.0

        # The cursor is exclusive: events(cursor=C) starts with the first entry after C.
        middle = events[len(events) // 2]
        with client.events(cursor=middle.cursor, runs=["rl-run"]) as stream:
            assert next(stream) == events[len(events) // 2 + 1]
        with client.events(cursor=0, kinds=["command"]) as stream:
            assert [next(stream), next(stream)] == commands
            assert stream.cursor == commands[1].cursor


def test_events_resume_across_a_daemon_restart(tmp_path: Path) -> None:
    """A stream open while the daemon stops and starts again on the same port yields every entry exactly once:
    the same cursors as a fresh read of the journal from 0."""
    seen: list[Event] = []
    failure: list[BaseException] = []
    with InProcessDaemon(tmp_path / "data") as first:
        address, port = first.address, first.address.rsplit(":", 1)[1]
        client = ControllerClient(address)
        stream = client.events(reconnect_for_s=60)

        def collect() -> None:
            try:
                seen.extend(stream)
            except BaseException as exc:
                failure.append(exc)

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        trainer = AttachClient(address, "restart-run", incarnation_id="inc")
        trainer.connect()
        warm_up(trainer, [2.3, 1.9, 1.5])
        trainer.close()
    with InProcessDaemon(tmp_path / "data", listen=f"127.0.0.1:{port}") as second:
        trainer = AttachClient(second.address, "restart-run", incarnation_id="inc")
        trainer.connect()
        warm_up(trainer, [1.2, 1.0], start_step=30)
        trainer.close()
        with ControllerClient(second.address) as fresh, fresh.events() as reference:
            expected = read_until(reference, lambda e: e.kind == "decision" and e.payload["decision"]["step"] == 50)
        deadline = time.monotonic() + 30
        while (not seen or seen[-1].cursor < expected[-1].cursor) and not failure and time.monotonic() < deadline:
            time.sleep(0.05)
        stream.close()  # from another thread than the reader's
        reader.join(timeout=10)
        client.close()
    assert not failure, failure
    assert not reader.is_alive(), "close() ended the iteration"
    cursors = [e.cursor for e in seen]
    assert cursors[: len(expected)] == [e.cursor for e in expected] == list(range(1, len(expected) + 1))
    assert [e.kind for e in seen].count("daemon_start") == 2, "the stream went on across the restart"
    assert [e.hash for e in seen[: len(expected)]] == [e.hash for e in expected]


def test_tokens_and_roles(tmp_path: Path) -> None:
    """No token or an unknown one: Unauthenticated, from a call and from an event stream (no reconnecting);
    a viewer reads but may not command."""
    tokens = Tokens.load(write_tokens(tmp_path / "tokens"))
    with InProcessDaemon(tmp_path / "data", tokens=tokens) as daemon:
        for token in (None, "not-a-token"):
            with ControllerClient(daemon.address, token=token) as client:
                with pytest.raises(Unauthenticated) as info:
                    client.runs()
                assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
                assert "ListRuns" in str(info.value)
                with pytest.raises(Unauthenticated), client.events() as stream:
                    next(stream)
        with ControllerClient(daemon.address, token=TOKENS["viewer"]) as viewer:
            assert viewer.runs() == []
            with pytest.raises(PermissionDenied):
                viewer.halt("some-run", "viewers may not")
        with ControllerClient(daemon.address, token=TOKENS["controller"]) as controller, pytest.raises(NotFound):
            controller.halt("some-run", "no such run")


def test_unreachable_close_and_deadline(daemon: InProcessDaemon) -> None:
    """No daemon: Unreachable, at once for a call and after reconnect_for_s for a stream; close() from another
    thread and deadline_s end a blocked iteration quietly."""
    with ControllerClient("127.0.0.1:1", timeout_s=2) as nobody:
        with pytest.raises(Unreachable, match=r"127\.0\.0\.1:1"):
            nobody.runs()
        started = time.monotonic()
        with pytest.raises(Unreachable, match="reconnect_for_s"), nobody.events(reconnect_for_s=0.5) as stream:
            next(stream)
        assert time.monotonic() - started < 10
        with pytest.raises(Unreachable), nobody.events(reconnect_for_s=0) as stream:
            next(stream)
    with ControllerClient(daemon.address) as client:
        stream = client.events(cursor=10**9)
        threading.Timer(0.3, stream.close).start()
        assert list(stream) == []
        assert not stream.deadline_reached
        started = time.monotonic()
        with client.events(cursor=10**9, deadline_s=0.3) as stream:
            assert list(stream) == []
        assert stream.deadline_reached
        assert time.monotonic() - started < 10


class UnreadableWatch(cgrpc.ControlServiceServicer):
    """A ControlService whose one event is a ``command`` entry without its command."""

    def WatchEvents(self, request: cpb.WatchEventsRequest, context: Any) -> Iterator[cpb.WatchEventsResponse]:
        yield cpb.WatchEventsResponse(cursor=request.cursor + 1, kind="command", payload_json='{"cause": "decision"}')


def test_an_unreadable_event_is_a_protocol_error() -> None:
    """An event without a field its kind always carries raises ProtocolError naming it, and ends the stream."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    cgrpc.add_ControlServiceServicer_to_server(UnreadableWatch(), server)  # type: ignore[abstract]  # WatchEvents only
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ControllerClient(f"127.0.0.1:{port}") as client, client.events(cursor=7) as stream:
            with pytest.raises(ProtocolError, match=r"event 8 \('command'\).*KeyError") as info:
                next(stream)
            assert info.value.code is None
            assert list(stream) == []
            assert stream.cursor == 7
    finally:
        server.stop(None)


def test_importable_without_torch_numpy_structlog_or_the_daemon() -> None:
    """tolaria.controller needs only grpcio, protobuf and the generated stubs."""
    blocked = ["torch", "numpy", "structlog", "prometheus_client", "governor_daemon", "tolaria_trainer"]
    script = (
        "import sys\n"
        f"blocked = {blocked!r}\n"
        "for name in blocked:\n"
        "    sys.modules[name] = None  # importing it raises ImportError\n"
        "import tolaria.controller\n"
        "print(sorted(n for n, m in sys.modules.items() if m is not None and n.split('.')[0] in blocked))\n"
        "print('grpc' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


def test_rl_controller_example_halts_after_a_rollback(daemon: InProcessDaemon, connect: Any) -> None:
    """examples/rl_controller.py follows a run, prints each command's punishment, HALTs it after one rollback,
    and at the run's end finds its ledger equal to the daemon's."""
    trainer = connect("example-run")
    nan_rollback(trainer)
    example = [sys.executable, str(REPO / "examples/rl_controller.py"), "--address", daemon.address]
    proc = subprocess.Popen(
        [*example, "--run", "example-run", "--halt-after", "1", "--until-finished"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        halt = trainer.next("command", timeout_s=60).command
        assert halt.type == common_pb2.COMMAND_TYPE_HALT
        trainer.wait_ack(trainer.result(halt))
        finish(trainer, common_pb2.FINISH_STATUS_HALTED)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "ROLLBACK command 1 (decision), punishment reward -10 once executed" in out
    assert "command 1 succeeded on rank 0; restored step 130, timeline 1, run total -10" in out
    assert ">> halted example-run after 1 rollbacks: command 2" in out
    assert "HALT command 2 (controller), punishment reward -10 once executed" in out
    assert "command 2 succeeded on rank 0; halted, timeline 1, run total -20" in out
    assert "total reward -20 matches the daemon's -20" in out
    assert "ledger example-run: 1 rollback(s), total reward -20" in out
    short = subprocess.run([*example, "--max-events", "2"], capture_output=True, text=True, timeout=60, check=False)
    assert short.returncode == 0, short.stderr
    assert "(resume with --from " in short.stdout
