"""ControlService: decode, call the Governor, encode. Domain errors become status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from governor_daemon.core import CommandReply
from governor_daemon.core import events as ev
from governor_daemon.errors import GovernorError, InternalError, InvalidInputError
from governor_daemon.policy import PolicyConfig
from governor_daemon.security import CALLER, caller_scope
from governor_daemon.service import codec
from governor_daemon.service.runtime import Governor
from governor_daemon.service.status_codes import status_for
from governor_daemon.service.validation import check_run_id, check_text
from tolaria.governor.v1 import control_service_pb2 as pb
from tolaria.governor.v1 import control_service_pb2_grpc

log = structlog.get_logger("governor.control")
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def caller_of(context: Context) -> str:
    """The caller's identity: the name the auth interceptor attached, else the peer address."""
    return CALLER.get() or f"anonymous@{context.peer()}"


def reach(run_id: str) -> str:
    """``run_id``, once it is well-formed and in the caller's scope (security.Scope); else the error."""
    check_run_id("run_id", run_id)
    caller_scope().check(run_id)
    return run_id


async def _guard(context: Context, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except GovernorError as exc:
        await context.abort(status_for(exc), str(exc))
        raise  # unreachable: abort raises
    except Exception:  # a bug: INTERNAL with an incident id, never Python's exception text
        error = InternalError.logged(log, "control call failed")
        await context.abort(status_for(error), str(error))
        raise  # unreachable: abort raises


class ControlServicer(control_service_pb2_grpc.ControlServiceServicer):
    """Adapter between controllers and the runtime."""

    def __init__(self, governor: Governor) -> None:
        self.governor = governor

    def _status(self, run_id: str) -> pb.RunStatus:
        return codec.run_status_to_proto(self.governor.run(reach(run_id)), 0.0, self.governor.now())

    async def _command(
        self, make: type[ev.RequestRollback | ev.Halt | ev.Resume], run_id: str, reason: str, context: Context
    ) -> CommandReply:
        check_text("reason", reason, self.governor.options.limits)
        reply = await self.governor.call(make(reach(run_id), reason, caller_of(context), self.governor.now()))
        assert isinstance(reply, CommandReply)
        return reply

    async def GetPanicState(self, request: pb.GetPanicStateRequest, context: Context) -> pb.GetPanicStateResponse:
        """State of one run."""

        async def call() -> pb.GetPanicStateResponse:
            return pb.GetPanicStateResponse(run=self._status(request.run_id))

        return await _guard(context, call)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        """All runs, optionally by state."""

        async def call() -> pb.ListRunsResponse:
            unknown = [s for s in request.states if s not in codec.PROTO_TO_RUN_STATE]
            if unknown:
                raise InvalidInputError("states", f"unknown run states {unknown}")
            wanted = {codec.PROTO_TO_RUN_STATE[s] for s in request.states}
            now, scope = self.governor.now(), caller_scope()
            return pb.ListRunsResponse(
                runs=[
                    codec.run_status_to_proto(run, 0.0, now)
                    for run in self.governor.runs()
                    if (not wanted or run.policy.state in wanted) and scope.allows(run.run_id)
                ]
            )

        return await _guard(context, call)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        """Journal entries after the cursor, then live. The headers go out at once, so that a client knows its
        watch is established even when no entry comes for a long time (tolaria.controller's reconnection)."""
        try:
            scope = caller_scope()
            for run_id in request.run_ids:
                reach(run_id)
            await context.send_initial_metadata(())
            async for entry in self.governor.watch(request.cursor, request.run_ids, request.kinds):
                if scope.allows(entry.run):
                    yield codec.entry_to_proto(entry)
        except GovernorError as exc:
            await context.abort(status_for(exc), str(exc))
        except Exception:  # a bug: INTERNAL with an incident id, never Python's exception text
            error = InternalError.logged(log, "WatchEvents failed")
            await context.abort(status_for(error), str(error))

    async def RequestRollback(self, request: pb.RequestRollbackRequest, context: Context) -> pb.RequestRollbackResponse:
        """A controller's ROLLBACK."""

        async def call() -> pb.RequestRollbackResponse:
            reply = await self._command(ev.RequestRollback, request.run_id, request.reason, context)
            return pb.RequestRollbackResponse(
                command_id=reply.command.command_id, run_state=codec.RUN_STATE_TO_PROTO[reply.run_state]
            )

        return await _guard(context, call)

    async def Halt(self, request: pb.HaltRequest, context: Context) -> pb.HaltResponse:
        """A controller's HALT."""

        async def call() -> pb.HaltResponse:
            reply = await self._command(ev.Halt, request.run_id, request.reason, context)
            return pb.HaltResponse(
                command_id=reply.command.command_id, run_state=codec.RUN_STATE_TO_PROTO[reply.run_state]
            )

        return await _guard(context, call)

    async def Resume(self, request: pb.ResumeRequest, context: Context) -> pb.ResumeResponse:
        """Resume a HALTED run."""

        async def call() -> pb.ResumeResponse:
            reply = await self._command(ev.Resume, request.run_id, request.reason, context)
            return pb.ResumeResponse(
                command_id=reply.command.command_id, run_state=codec.RUN_STATE_TO_PROTO[reply.run_state]
            )

        return await _guard(context, call)

    async def ForgetRun(self, request: pb.ForgetRunRequest, context: Context) -> pb.ForgetRunResponse:
        """Remove a finished or unattached run from memory (journaled)."""

        async def call() -> pb.ForgetRunResponse:
            check_text("reason", request.reason, self.governor.options.limits)
            event = ev.ForgetRun(reach(request.run_id), request.reason, caller_of(context), self.governor.now())
            await self.governor.call(event)
            return pb.ForgetRunResponse(cursor=self.governor.committer.journal.last_seq)

        return await _guard(context, call)

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Context) -> pb.GetPolicyResponse:
        """The effective policy of a run."""

        async def call() -> pb.GetPolicyResponse:
            run = self.governor.run(reach(request.run_id))
            return pb.GetPolicyResponse(policy=codec.policy_to_proto(run.policy.config))

        return await _guard(context, call)

    async def UpdatePolicy(self, request: pb.UpdatePolicyRequest, context: Context) -> pb.UpdatePolicyResponse:
        """Change policy fields of a run."""

        async def call() -> pb.UpdatePolicyResponse:
            changes = codec.overrides_from_proto(request.changes)
            event = ev.UpdatePolicy(reach(request.run_id), changes, caller_of(context), self.governor.now())
            config = await self.governor.call(event)
            assert isinstance(config, PolicyConfig)
            return pb.UpdatePolicyResponse(policy=codec.policy_to_proto(config))

        return await _guard(context, call)
