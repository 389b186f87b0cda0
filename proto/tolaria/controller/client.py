"""``ControllerClient``: the unary calls (never retried) and ``EventStream``, which follows the journal across
daemon restarts."""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

import grpc

from tolaria.channel import TlsConfig, open_channel
from tolaria.controller.errors import ControllerError, Unreachable, error_from_rpc
from tolaria.controller.events import Event, event_from_proto
from tolaria.controller.status import (
    POLICY_FIELDS,
    CommandReceipt,
    Policy,
    RunStatus,
    policy_from_proto,
    run_status_from_proto,
)
from tolaria.governor.v1 import common_pb2, control_service_pb2, control_service_pb2_grpc
from tolaria.vocabulary import RunState, from_proto_enum

# The channel's own reconnect backoff is kept short (gRPC's default grows to two minutes): after a daemon
# restart the event stream's retries must find the channel trying again.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class ControllerClient:
    """A connection to one governor daemon. A context manager: leaving it closes the channel and every event
    stream it opened. Thread-safe, as gRPC channels are.

    ``token`` is sent as ``authorization: Bearer TOKEN`` (reads need the ``viewer`` or ``controller`` role,
    commands and policy changes ``controller``); ``timeout_s`` is the deadline of each unary call.
    """

    def __init__(
        self, address: str, token: str | None = None, tls: TlsConfig | None = None, timeout_s: float = 10.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(address, tls, _CHANNEL_OPTIONS)
        self._stub = control_service_pb2_grpc.ControlServiceStub(self._channel)
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every event stream of this client (their iterators stop), then close the channel."""
        for stream in list(self._streams):
            stream.close()
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, method, self.address) from None

    # ------------------------------------------------------------------------------------------- reads

    def runs(self, states: Iterable[RunState | str] = ()) -> list[RunStatus]:
        """Every run the daemon knows (active and retained finished ones), or those in ``states`` (names of
        ``RunState`` in any case, e.g. "halted")."""
        numbers = [common_pb2.RunState.Value("RUN_STATE_" + RunState(str(s).upper()).value) for s in states]
        response = self._call("ListRuns", control_service_pb2.ListRunsRequest(states=numbers))
        return [run_status_from_proto(r) for r in response.runs]

    def panic_state(self, run_id: str) -> RunStatus:
        """The state of one run (NotFound for an unknown run)."""
        return run_status_from_proto(
            self._call("GetPanicState", control_service_pb2.GetPanicStateRequest(run_id=run_id)).run
        )

    def get_policy(self, run_id: str) -> Policy:
        """The run's effective policy, every field set."""
        return policy_from_proto(self._call("GetPolicy", control_service_pb2.GetPolicyRequest(run_id=run_id)).policy)

    def events(
        self,
        cursor: int = 0,
        runs: Sequence[str] = (),
        kinds: Sequence[str] = (),
        *,
        reconnect_for_s: float = 60.0,
        deadline_s: float | None = None,
    ) -> EventStream:
        """Journal entries with a cursor above ``cursor`` (0: the whole journal), then live ones as they are
        written, as typed events; only those of ``runs`` and of ``kinds`` (entry kinds, e.g. "command") when
        given. See ``EventStream`` for reconnection, ``reconnect_for_s`` and ``deadline_s``.

        The protocol has no end-of-catch-up marker, so the stream always follows. To read only the history, stop
        at a cursor known beforehand (e.g. ``panic_state(run).last_cursor`` for one run's entries), or give a
        ``deadline_s``.
        """
        stream = EventStream(self, cursor, tuple(runs), tuple(kinds), reconnect_for_s, deadline_s)
        self._streams.add(stream)
        return stream

    # ------------------------------------------------------------------------------------------- commands

    def rollback(self, run_id: str, reason: str) -> CommandReceipt:
        """Order a ROLLBACK of the run now (Refused while another command is open or the run is FINISHED)."""
        return self._command("RequestRollback", control_service_pb2.RequestRollbackRequest, run_id, reason)

    def halt(self, run_id: str, reason: str) -> CommandReceipt:
        """Stop the run at its next agreement point; it waits for ``resume``."""
        return self._command("Halt", control_service_pb2.HaltRequest, run_id, reason)

    def resume(self, run_id: str, reason: str) -> CommandReceipt:
        """Let a HALTED run continue from its last-known-good snapshot (Refused unless it is HALTED)."""
        return self._command("Resume", control_service_pb2.ResumeRequest, run_id, reason)

    def _command(self, method: str, request_type: Any, run_id: str, reason: str) -> CommandReceipt:
        response = self._call(method, request_type(run_id=run_id, reason=reason))
        return CommandReceipt(response.command_id, from_proto_enum(RunState, common_pb2.RunState, response.run_state))

    def update_policy(self, run_id: str, **changes: Any) -> Policy:
        """Change the given ``Policy`` fields of the run, effective from its next record; returns the effective
        policy. TypeError for a name that is not a policy field; Refused for a value the daemon rejects."""
        unknown = sorted(set(changes) - set(POLICY_FIELDS))
        if unknown:
            raise TypeError(f"unknown policy fields {unknown}; policy fields: {', '.join(POLICY_FIELDS)}")
        message = common_pb2.Policy(**{k: v for k, v in changes.items() if v is not None})
        request = control_service_pb2.UpdatePolicyRequest(run_id=run_id, changes=message)
        return policy_from_proto(self._call("UpdatePolicy", request).policy)

    def forget(self, run_id: str, reason: str) -> int:
        """Remove a FINISHED run, or one with no trainer attached, from the daemon's memory (Refused otherwise);
        returns the cursor of the journal entry that forgot it (the journal keeps the run's history)."""
        return int(self._call("ForgetRun", control_service_pb2.ForgetRunRequest(run_id=run_id, reason=reason)).cursor)


# Reconnection backoff of an event stream: from the first delay, doubling up to the cap, each drawn uniformly
# from half to all of it (watchers of one daemon do not come back in step).
RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 2.0


class EventStream(Iterator[Event]):
    """Typed events of one ``ControllerClient.events`` call; iterate it, and close it (or use it as a context
    manager) when done.

    When the stream is lost (UNAVAILABLE, or the daemon ending it as it shuts down) the iterator reconnects with
    a jittered, capped exponential backoff and resumes after ``cursor``, the cursor of the last event it yielded:
    across a daemon restart no event is yielded twice and none is lost. It gives up with ``Unreachable`` once it
    has tried for ``reconnect_for_s`` seconds without getting a stream (``math.inf``: keep trying until closed);
    with ``reconnect_for_s`` 0 it never reconnects: the iteration ends where the daemon ends the stream, and
    UNAVAILABLE raises ``Unreachable``. Any other failure raises its ``ControllerError`` at once, and an event
    this client cannot read ``ProtocolError``; either closes the stream (``cursor`` stays before that event).

    ``deadline_s`` (seconds from the ``events`` call) ends the iteration quietly when it passes, and then
    ``deadline_reached`` is True. ``close()``, from any thread, ends it at once.
    """

    def __init__(
        self,
        client: ControllerClient,
        cursor: int,
        runs: tuple[str, ...],
        kinds: tuple[str, ...],
        reconnect_for_s: float,
        deadline_s: float | None,
    ) -> None:
        self._client = client
        self._cursor = cursor
        self._runs, self._kinds = runs, kinds
        self._reconnect_for_s = reconnect_for_s
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: grpc.CallIterator[control_service_pb2.WatchEventsResponse] | None = None
        self._responses: Iterator[control_service_pb2.WatchEventsResponse] | None = None
        self._lost_since: float | None = None
        self._retries = 0
        self.deadline_reached = False

    @property
    def cursor(self) -> int:
        """Cursor of the last event yielded (the one given to ``events`` before the first): ``events(cursor=...)``
        resumes after it."""
        return self._cursor

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: a blocked ``next`` returns at once, and iteration ends. Safe from any thread, and idempotent."""
        with self._lock:
            self._closed.set()
            call, self._call = self._call, None
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        try:
            event = self._next()
        except ControllerError:
            self.close()
            raise
        if event is None:
            self.close()
            raise StopIteration
        return event

    def _next(self) -> Event | None:
        """The next event; None when the iteration ends (closed, the deadline, a stream the daemon ended while
        reconnecting is off)."""
        while not self._closed.is_set():
            if self._past_deadline():
                self.deadline_reached = True
                return None
            responses = self._responses if self._responses is not None else self._open()
            if responses is None:
                return None
            try:
                response = next(responses)
            except StopIteration:  # the daemon ended the stream: it is shutting down
                self._drop_call()
                if self._reconnect_for_s <= 0:
                    return None
                self._lost()
                continue
            except grpc.RpcError as exc:
                self._drop_call()
                if self._closed.is_set():
                    return None
                code = exc.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED and self._past_deadline():
                    self.deadline_reached = True
                    return None
                if code is grpc.StatusCode.UNAVAILABLE and self._reconnect_for_s > 0:
                    self._lost(exc)
                    continue
                raise error_from_rpc(exc, "WatchEvents", self._client.address) from None
            event = event_from_proto(response, self._client.address)
            self._cursor = event.cursor
            self._lost_since, self._retries = None, 0
            return event
        return None

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _open(self) -> Iterator[control_service_pb2.WatchEventsResponse] | None:
        """Start a WatchEvents call after the cursor; None when closed meanwhile."""
        request = control_service_pb2.WatchEventsRequest(cursor=self._cursor, run_ids=self._runs, kinds=self._kinds)
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        with self._lock:
            if self._closed.is_set():
                return None
            call = self._client._stub.WatchEvents(request, metadata=self._client._metadata, timeout=timeout)
            self._call = call
        # The daemon answers a watch with its headers at once: a call still active after them has a stream (the
        # reconnection window starts again), even if no event comes for hours.
        call.initial_metadata()
        if call.is_active():
            self._lost_since = None
        self._responses = iter(call)
        return self._responses

    def _drop_call(self) -> None:
        with self._lock:
            self._call = None
        self._responses = None

    def _lost(self, exc: grpc.RpcError | None = None) -> None:
        """Wait before the next attempt; raise Unreachable once the reconnection window has passed."""
        now = time.monotonic()
        if self._lost_since is None:
            self._lost_since = now
        if now - self._lost_since >= self._reconnect_for_s:
            details = f"no event stream for {now - self._lost_since:.1f} s (reconnect_for_s {self._reconnect_for_s:g})"
            if exc is not None:
                details += f"; last error: {exc.details() or exc.code().name}"
            raise Unreachable(grpc.StatusCode.UNAVAILABLE, details, "WatchEvents", self._client.address)
        delay = min(RECONNECT_MAX_DELAY_S, RECONNECT_FIRST_DELAY_S * 2 ** min(self._retries, 16))
        self._retries += 1
        delay *= random.uniform(0.5, 1.0)
        if self._deadline is not None:
            delay = min(delay, max(0.0, self._deadline - now))
        self._closed.wait(delay)
