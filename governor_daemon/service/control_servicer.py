"""ControlService: decode, call the Governor, encode. Domain errors become status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from governor_daemon.errors import GovernorError
from governor_daemon.governor import Governor
from governor_daemon.security import CALLER
from governor_daemon.service import codec
from governor_daemon.service.status_codes import status_for
from tolaria.governor.v1 import control_service_pb2 as pb
from tolaria.governor.v1 import control_service_pb2_grpc

log = structlog.get_logger("governor.control")
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def caller_of(context: Context) -> str:
    """The caller's identity: the name the auth interceptor attached, else the peer address."""
    return CALLER.get() or f"anonymous@{context.peer()}"


async def _guard(context: Context, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except GovernorError as exc:
        await context.abort(status_for(exc), str(exc))
        raise  # unreachable: abort raises


class ControlServicer(control_service_pb2_grpc.ControlServiceServicer):
    """Adapter between controllers and the Governor."""

    def __init__(self, governor: Governor) -> None:
        self.governor = governor

    async def GetPanicState(self, request: pb.GetPanicStateRequest, context: Context) -> pb.GetPanicStateResponse:
        """State of one run."""

        async def call() -> pb.GetPanicStateResponse:
            return pb.GetPanicStateResponse(run=self.governor.status(request.run_id))

        return await _guard(context, call)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        """All runs, optionally by state."""

        async def call() -> pb.ListRunsResponse:
            return pb.ListRunsResponse(runs=self.governor.list_runs(request.states))

        return await _guard(context, call)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        """Journal entries after the cursor, then live."""
        try:
            async for entry in self.governor.watch(request.cursor, request.run_ids, request.kinds):
                yield codec.entry_to_proto(entry)
        except GovernorError as exc:
            await context.abort(status_for(exc), str(exc))

    async def RequestRollback(self, request: pb.RequestRollbackRequest, context: Context) -> pb.RequestRollbackResponse:
        """A controller's ROLLBACK."""

        async def call() -> pb.RequestRollbackResponse:
            cmd = await self.governor.request_rollback(request.run_id, request.reason, caller_of(context))
            state = self.governor.run(request.run_id).policy.state
            return pb.RequestRollbackResponse(command_id=cmd.command_id, run_state=codec.RUN_STATE_TO_PROTO[state])

        return await _guard(context, call)

    async def Halt(self, request: pb.HaltRequest, context: Context) -> pb.HaltResponse:
        """A controller's HALT."""

        async def call() -> pb.HaltResponse:
            cmd = await self.governor.halt(request.run_id, request.reason, caller_of(context))
            state = self.governor.run(request.run_id).policy.state
            return pb.HaltResponse(command_id=cmd.command_id, run_state=codec.RUN_STATE_TO_PROTO[state])

        return await _guard(context, call)

    async def Resume(self, request: pb.ResumeRequest, context: Context) -> pb.ResumeResponse:
        """Resume a HALTED run."""

        async def call() -> pb.ResumeResponse:
            cmd = await self.governor.resume(request.run_id, request.reason, caller_of(context))
            state = self.governor.run(request.run_id).policy.state
            return pb.ResumeResponse(command_id=cmd.command_id, run_state=codec.RUN_STATE_TO_PROTO[state])

        return await _guard(context, call)

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Context) -> pb.GetPolicyResponse:
        """The effective policy of a run."""

        async def call() -> pb.GetPolicyResponse:
            return pb.GetPolicyResponse(policy=codec.policy_to_proto(self.governor.run(request.run_id).policy.config))

        return await _guard(context, call)

    async def UpdatePolicy(self, request: pb.UpdatePolicyRequest, context: Context) -> pb.UpdatePolicyResponse:
        """Change policy fields of a run."""

        async def call() -> pb.UpdatePolicyResponse:
            changes = codec.overrides_from_proto(request.changes)
            config = await self.governor.update_policy(request.run_id, changes, caller_of(context))
            return pb.UpdatePolicyResponse(policy=codec.policy_to_proto(config))

        return await _guard(context, call)
