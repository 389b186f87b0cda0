"""Roles and scopes without a socket: the real AuthInterceptor (security.py) wraps the real servicers' handlers
as the server does, and each call runs in its own task (as grpc runs it, so the caller's identity stays in it).

The interceptor refuses a missing or unknown token (UNAUTHENTICATED) and a role without the method
(PERMISSION_DENIED), and journals the refusal; the servicers refuse a run outside the identity's scope
(PERMISSION_DENIED) and show a scoped identity only its runs."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from governor_daemon.security import AuthInterceptor, Scope, Tokens
from tests.unit.service.harness import (
    AttachHandler,
    Daemon,
    Trainer,
    aborted_with,
    attach,
    hello,
    on_daemon,
    servicer_context,
)
from tolaria.governor.v1 import control_service_pb2 as cpb

TOKENS = {
    "ops": ("controller", "ops-token-0000000001", ()),
    "watcher": ("viewer", "watcher-token-000001", ()),
    "team-a-ops": ("controller", "team-a-ops-token-001", ("team-a",)),
    "trainer-a": ("trainer", "trainer-a-token-0001", ("team-a",)),
    "trainer": ("trainer", "trainer-token-000001", ()),
}
CONTROL = "/tolaria.governor.v1.ControlService/"
ATTACH = "/tolaria.governor.v1.TrainerService/Attach"


@dataclass(frozen=True)
class CallDetails:
    """grpc.HandlerCallDetails of one call."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


@dataclass
class Guarded:
    """The daemon's servicers behind the AuthInterceptor of TOKENS, journaling refusals as the server does."""

    daemon: Daemon

    def __post_init__(self) -> None:
        tokens = Tokens([(name, role, token.encode(), Scope(scope)) for name, (role, token, scope) in TOKENS.items()])
        self.interceptor = AuthInterceptor(tokens, False, self.daemon.governor.auth_failure)

    async def _wrapped(self, method: str, handler: grpc.RpcMethodHandler[Any, Any], as_: str | None) -> Any:
        metadata = (("authorization", f"Bearer {TOKENS[as_][1]}"),) if as_ else ()

        async def continuation(_: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return handler

        return await self.interceptor.intercept_service(continuation, CallDetails(method, metadata))  # type: ignore[arg-type]

    async def call(self, name: str, request: Any, as_: str | None) -> tuple[Any, Any]:
        """ControlService ``name`` as identity ``as_`` (no token when None): (response or None, context)."""
        handler = grpc.unary_unary_rpc_method_handler(getattr(self.daemon.control, name))
        wrapped = await self._wrapped(CONTROL + name, handler, as_)
        context = servicer_context()

        async def run() -> Any:
            with contextlib.suppress(grpc.aio.AbortError):
                return await wrapped.unary_unary(request, context)
            return None

        return await asyncio.create_task(run()), context

    async def watch(self, as_: str, count: int) -> list[cpb.WatchEventsResponse]:
        """The first ``count`` entries WatchEvents from cursor 0 shows ``as_``."""
        handler = grpc.unary_stream_rpc_method_handler(self.daemon.control.WatchEvents)
        wrapped = await self._wrapped(CONTROL + "WatchEvents", handler, as_)

        async def run() -> list[cpb.WatchEventsResponse]:
            stream = wrapped.unary_stream(cpb.WatchEventsRequest(), servicer_context())
            async with contextlib.aclosing(stream):
                return [await anext(stream) for _ in range(count)]

        return await asyncio.create_task(run())

    async def attach_handler(self, as_: str | None) -> AttachHandler:
        """TrainerService.Attach as identity ``as_``."""
        handler = grpc.stream_stream_rpc_method_handler(self.daemon.trainers.Attach)
        wrapped = await self._wrapped(ATTACH, handler, as_)
        return wrapped.stream_stream  # type: ignore[no-any-return]


def test_a_controller_is_journaled_by_its_name(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        guarded = Guarded(daemon)
        trainer = await Trainer.attached(daemon, hello(), await guarded.attach_handler("trainer"))
        response, context = await guarded.call("Halt", cpb.HaltRequest(run_id="run-1", reason="r"), "ops")
        context.abort.assert_not_awaited()
        assert response.command_id == 1
        request = next(e for e in daemon.on_disk("run-1") if e.kind == "controller_request")
        assert request.payload["caller"] == "ops"
        attached = next(e for e in daemon.on_disk("run-1") if e.kind == "attach")
        assert attached.payload["caller"] == "trainer"
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_a_missing_or_unknown_token_is_unauthenticated_and_journaled_once(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        guarded = Guarded(daemon)
        runs = daemon.governor.core.checkpoint()
        request = cpb.ListRunsRequest()
        response, context = await guarded.call("ListRuns", request, None)
        assert response is None
        assert aborted_with(context) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token: send 'authorization: Bearer <token>' from the tokens file",
        )
        TOKENS["nobody"] = ("viewer", "not-in-the-file-0001", ())
        try:
            _, context = await guarded.call("ListRuns", request, "nobody")
        finally:
            del TOKENS["nobody"]
        assert aborted_with(context) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown token: send 'authorization: Bearer <token>' from the tokens file",
        )
        await daemon.governor.settled()
        assert daemon.governor.core.checkpoint() == runs
        refusals = [e for e in daemon.on_disk() if e.kind == "auth_failure"]
        assert [(e.run, e.payload["code"], e.payload["reason"]) for e in refusals] == [
            ("", "UNAUTHENTICATED", "missing bearer token")
        ], "one entry per client host and code per window"

    on_daemon(tmp_path / "data", scenario)


def test_a_viewer_reads_but_may_not_command(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        guarded = Guarded(daemon)
        trainer = await Trainer.attached(daemon, hello(), await guarded.attach_handler("trainer"))
        response, context = await guarded.call("GetPanicState", cpb.GetPanicStateRequest(run_id="run-1"), "watcher")
        context.abort.assert_not_awaited()
        assert response.run.run_id == "run-1"
        runs = daemon.governor.core.checkpoint()
        _, context = await guarded.call("Halt", cpb.HaltRequest(run_id="run-1", reason="r"), "watcher")
        assert aborted_with(context) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "watcher has role viewer; Halt needs controller",
        )
        assert daemon.governor.core.checkpoint() == runs
        assert trainer.received[1:] == [], "no command reached the trainer"
        call = await attach(daemon, [hello("run-2")], handler=await guarded.attach_handler("watcher"))
        assert aborted_with(call.context) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "watcher has role viewer; Attach needs trainer",
        )
        assert "run-2" not in daemon.governor.core.registry.runs
        await trainer.close()

    on_daemon(tmp_path / "data", scenario)


def test_a_scoped_identity_reaches_only_its_runs(tmp_path: Path) -> None:
    """team-a identities: their runs only, in every call; ListRuns and WatchEvents leave the others out, and the
    daemon-wide entries too."""

    async def scenario(daemon: Daemon) -> None:
        guarded = Guarded(daemon)
        theirs = await Trainer.attached(daemon, hello("team-a-1"), await guarded.attach_handler("trainer-a"))
        other = await Trainer.attached(daemon, hello("run-1"), await guarded.attach_handler("trainer"))
        outside = "run 'run-1' is outside this identity's scope (runs starting with team-a)"
        runs = daemon.governor.core.checkpoint()
        for name, request in (
            ("GetPanicState", cpb.GetPanicStateRequest(run_id="run-1")),
            ("GetPolicy", cpb.GetPolicyRequest(run_id="run-1")),
            ("Halt", cpb.HaltRequest(run_id="run-1", reason="r")),
            ("ForgetRun", cpb.ForgetRunRequest(run_id="run-1", reason="r")),
        ):
            _, context = await guarded.call(name, request, "team-a-ops")
            assert aborted_with(context) == (grpc.StatusCode.PERMISSION_DENIED, outside), name
        assert daemon.governor.core.checkpoint() == runs
        listed, _ = await guarded.call("ListRuns", cpb.ListRunsRequest(), "team-a-ops")
        assert [r.run_id for r in listed.runs] == ["team-a-1"]
        everything, _ = await guarded.call("ListRuns", cpb.ListRunsRequest(), "ops")
        assert [r.run_id for r in everything.runs] == ["team-a-1", "run-1"]
        await daemon.governor.settled()
        assert {e.run_id for e in await guarded.watch("team-a-ops", 2)} == {"team-a-1"}
        assert "" in {e.run_id for e in await guarded.watch("ops", 2)}, "the unscoped watcher sees the daemon's start"
        call = await attach(daemon, [hello("run-9")], handler=await guarded.attach_handler("trainer-a"))
        assert aborted_with(call.context) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "run 'run-9' is outside this identity's scope (runs starting with team-a)",
        )
        await theirs.close()
        await other.close()

    on_daemon(tmp_path / "data", scenario)


def test_a_run_belongs_to_the_principal_that_created_it(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        guarded = Guarded(daemon)
        first = await attach(daemon, [hello("team-a-1")], handler=await guarded.attach_handler("trainer-a"))
        first.context.abort.assert_not_awaited()
        runs = daemon.governor.core.checkpoint()
        call = await attach(
            daemon, [hello("team-a-1", incarnation_id="inc-b")], handler=await guarded.attach_handler("trainer")
        )
        assert aborted_with(call.context) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "run team-a-1 belongs to another principal; trainer may not attach to it (use a run id of your own)",
        )
        assert daemon.governor.core.checkpoint() == runs

    on_daemon(tmp_path / "data", scenario)
