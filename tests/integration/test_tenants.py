"""Two tenants on one governor: a hostile trainer of one cannot take over, blind or flood the other's run."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.security import Tokens, TokensFileError
from governor_daemon.testing import AttachClient, InProcessDaemon
from tolaria.governor.v1 import common_pb2, trainer_service_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

TOKENS = {"alice": "alice-trainer-token-0123", "bob": "bob-trainer-token-012345", "ops": "ops-controller-token-0123"}
SECRET = "alice-secret-incarnation-7f3a"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    path = tmp_path / "tokens"
    roles = {"alice": "trainer", "bob": "trainer", "ops": "controller"}
    path.write_text("".join(f"{name} {roles[name]} {token}\n" for name, token in TOKENS.items()))
    path.chmod(0o600)
    with InProcessDaemon(tmp_path / "data", tokens=Tokens.load(path)) as d:
        yield d


def as_(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def connect(daemon: InProcessDaemon, who: str, run_id: str, incarnation_id: str | None = None) -> AttachClient:
    client = AttachClient(daemon.address, run_id, incarnation_id=incarnation_id, metadata=as_(who))
    client.connect()
    return client


def status(daemon: InProcessDaemon, run_id: str, metadata: tuple[tuple[str, str], ...] | None = None) -> cpb.RunStatus:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = cgrpc.ControlServiceStub(channel)
        request = cpb.GetPanicStateRequest(run_id=run_id)
        return stub.GetPanicState(request, metadata=as_("ops") if metadata is None else metadata).run


def journal_text(data_dir: Path) -> str:
    return "".join(path.read_text() for path in list_segments(data_dir))


def test_another_principal_cannot_attach_even_with_the_incarnation_id(daemon: InProcessDaemon, tmp_path: Path) -> None:
    """Review finding: any trainer token could take over any run, and reusing the live incarnation id
    evicted the real trainer's stream."""
    alice = connect(daemon, "alice", "alice-run", SECRET)
    try:
        for who, incarnation in (("bob", SECRET), ("bob", "bob-guess")):
            thief = AttachClient(daemon.address, "alice-run", incarnation_id=incarnation, metadata=as_(who))
            with pytest.raises(grpc.RpcError) as info:
                thief.connect()
            thief.close()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert SECRET not in (info.value.details() or "")
        seq = alice.validation(10, 2.0, epoch=1)
        assert alice.next("verdict").verdict.seq == seq, "alice's stream survived the attempts"
    finally:
        alice.close()
    shown = status(daemon, "alice-run")
    assert shown.ranks[0].incarnation_id
    assert SECRET not in str(shown)
    assert SECRET not in journal_text(tmp_path / "data"), "incarnation ids are journaled as digests only"


def test_hostile_trainer_on_its_own_run_is_refused_and_changes_nothing(daemon: InProcessDaemon) -> None:
    """A seq jump (which made every later record a 'duplicate') and a forged CommandResult that moved the
    timeline to 2^64-1 (after which a NaN was judged HEALTHY) are refused."""
    for message in (
        {"vitals_batch": trainer_service_pb2.VitalsBatch(first_seq=10**12, step=[1], loss=[math.nan])},
        {
            "command_result": trainer_service_pb2.CommandResult(
                seq=1, command_id=1, outcome=common_pb2.COMMAND_OUTCOME_SUCCEEDED, new_timeline=2**64 - 1
            )
        },
    ):
        bob = connect(daemon, "bob", "bob-run")
        bob.send(**message)
        with pytest.raises(grpc.RpcError) as info:
            bob.next("ack")
        bob.close()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    shown = status(daemon, "bob-run")
    assert (shown.timeline, shown.ranks[0].num_records, shown.ranks[0].num_record_gaps) == (0, 0, 0)
    bob = connect(daemon, "bob", "bob-run")
    try:
        bob.vitals([1], [math.nan])
        assert bob.next("command").command.type == common_pb2.COMMAND_TYPE_ROLLBACK, "a NaN is still judged"
    finally:
        bob.close()


def test_a_flood_of_refused_calls_does_not_fill_the_journal(daemon: InProcessDaemon, tmp_path: Path) -> None:
    """Review finding: each refused call was journaled (380 B; about 1.9 GB/h from one client)."""
    with grpc.insecure_channel(daemon.address) as channel:
        stub = cgrpc.ControlServiceStub(channel)
        for i in range(300):
            token = "wrong-token-0123456789" if i % 2 else ""
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            with pytest.raises(grpc.RpcError):
                stub.ListRuns(cpb.ListRunsRequest(), metadata=metadata)
    entries = [
        item.entry.payload
        for path in list_segments(tmp_path / "data")
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.kind == "auth_failure"
    ]
    assert len(entries) == 1, "one entry per client host and code per window"
    assert entries[0]["code"] == "UNAUTHENTICATED"
    assert daemon.daemon is not None
    assert daemon.daemon.metrics.value("governor_auth_failures_total", code="UNAUTHENTICATED") == 300


SCOPED = {
    "team-a-bot": ("trainer", "team-a-bot-token-0123456", "runs=team-a."),
    "team-a-ops": ("controller", "team-a-ops-token-0123456", "runs=team-a.,shared."),
    "team-b-bot": ("trainer", "team-b-bot-token-0123456", "runs=team-b."),
    "root": ("controller", "root-controller-token-0123", ""),
}


def test_tokens_scoped_to_run_prefixes_reach_only_their_runs(tmp_path: Path) -> None:
    """Tenants by run-id prefix (``runs=`` in the tokens file): a scoped trainer attaches only to its runs; a
    scoped controller sees, watches and commands only its runs, and never the daemon-wide entries (a
    checkpoint holds every run's state); an unscoped controller reaches everything."""
    path = tmp_path / "tokens"
    path.write_text("".join(f"{name} {role} {token} {scope}\n" for name, (role, token, scope) in SCOPED.items()))
    path.chmod(0o600)

    def who(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {SCOPED[name][1]}"),)

    with InProcessDaemon(tmp_path / "data", tokens=Tokens.load(path)) as daemon:
        a = AttachClient(daemon.address, "team-a.run1", metadata=who("team-a-bot"))
        b = AttachClient(daemon.address, "team-b.run1", metadata=who("team-b-bot"))
        a.connect()
        b.connect()
        a.wait_ack(a.vitals([1, 2], [1.0, 0.9]))
        b.wait_ack(b.vitals([1, 2], [1.0, 0.9]))
        stray = AttachClient(daemon.address, "team-b.run2", metadata=who("team-a-bot"))
        with pytest.raises(grpc.RpcError) as info:
            stray.connect()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "outside this identity's scope" in (info.value.details() or "")
        with grpc.insecure_channel(daemon.address) as channel:
            stub = cgrpc.ControlServiceStub(channel)
            listed = stub.ListRuns(cpb.ListRunsRequest(), metadata=who("team-a-ops")).runs
            assert [r.run_id for r in listed] == ["team-a.run1"]
            everything = stub.ListRuns(cpb.ListRunsRequest(), metadata=who("root")).runs
            assert sorted(r.run_id for r in everything) == ["team-a.run1", "team-b.run1"]
            assert stub.GetPanicState(cpb.GetPanicStateRequest(run_id="team-a.run1"), metadata=who("team-a-ops"))
            for call in (
                lambda: stub.GetPanicState(cpb.GetPanicStateRequest(run_id="team-b.run1"), metadata=who("team-a-ops")),
                lambda: stub.GetPanicState(cpb.GetPanicStateRequest(run_id="no-such"), metadata=who("team-a-ops")),
                lambda: stub.Halt(cpb.HaltRequest(run_id="team-b.run1", reason="x"), metadata=who("team-a-ops")),
                lambda: stub.GetPolicy(cpb.GetPolicyRequest(run_id="team-b.run1"), metadata=who("team-a-ops")),
                lambda: list(
                    stub.WatchEvents(cpb.WatchEventsRequest(run_ids=["team-b.run1"]), metadata=who("team-a-ops"))
                ),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, "refused before any lookup"
            watch = stub.WatchEvents(cpb.WatchEventsRequest(), metadata=who("team-a-ops"), timeout=3)
            seen: list[str] = []
            with pytest.raises(grpc.RpcError) as info:
                seen.extend(event.run_id for event in watch)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert seen
            assert set(seen) == {"team-a.run1"}, "no other tenant's entries, no daemon-wide ones"
        a.close()
        b.close()
    assert no_command_journaled(tmp_path / "data")


def no_command_journaled(data_dir: Path) -> bool:
    """The refused Halt journaled no command."""
    return '"kind":"command"' not in journal_text(data_dir).replace(" ", "")


def test_a_malformed_scope_names_its_line(tmp_path: Path) -> None:
    """Review: a name listed twice gave an mTLS subject whichever role and scope came last."""
    path = tmp_path / "tokens"
    for line, message in (
        ("bot trainer bot-token-0123456789 team-a.", "the fourth field must be runs="),
        ("bot trainer bot-token-0123456789 runs=team/a", "run prefix 'team/a'"),
        ("bot trainer bot-token-0123456789 runs=", "run prefix ''"),
        ("bot trainer bot-token-0123456789\nbot viewer bot-token-9876543210 runs=a.", "name 'bot' is used twice"),
    ):
        path.write_text(line + "\n")
        with pytest.raises(TokensFileError, match=f"{path}:[12]: .*{message}"):
            Tokens.load(path)


FLOOD_TOKENS = {
    "tenant-a": ("trainer", "tenant-a-token-0123456789", "runs=a."),
    "tenant-b": ("trainer", "tenant-b-token-0123456789", "runs=b."),
    "root": ("controller", "root-controller-token-0123", ""),
}


def test_one_tenants_flood_cannot_get_anothers_nan_shed_unjudged(tmp_path: Path) -> None:
    """Hardening 2, defect 1: tenant A flooding 32 runs got tenant B's NaN batch shed, unjudged, in 1 of 2
    runs (one FIFO for every stream; a shed batch skipped every check). With the worker's share cut to 5 %
    so that A's flood certainly overloads it: A's records are shed, B's NaN gets its ROLLBACK in 10 runs of
    10, and A's shedding journals at most one entry per stream per second."""
    path = tmp_path / "tokens"
    path.write_text("".join(f"{name} {role} {token} {scope}\n" for name, (role, token, scope) in FLOOD_TOKENS.items()))
    path.chmod(0o600)

    def who(name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {FLOOD_TOKENS[name][1]}"),)

    with InProcessDaemon(tmp_path / "data", tokens=Tokens.load(path), vitals_share=0.05, shed_after_ms=50.0) as daemon:
        flood = [AttachClient(daemon.address, f"a.flood-{i}", metadata=who("tenant-a")) for i in range(32)]
        started = time.monotonic()
        try:
            for client in flood:
                client.connect()
            for b in range(300):
                for client in flood:
                    client.vitals(range(256 * b, 256 * b + 256), [1.0] * 256)
            for i in range(10):
                victim = AttachClient(daemon.address, f"b.run-{i}", metadata=who("tenant-b"))
                try:
                    victim.connect()
                    for b in range(4):
                        victim.vitals(range(32 * b, 32 * b + 32), [1.0] * 32)
                    victim.vitals(range(128, 160), [1.0] * 16 + [math.nan] + [1.0] * 15)
                    command = victim.next("command", timeout_s=120).command
                finally:
                    victim.close()
                assert command.type == common_pb2.COMMAND_TYPE_ROLLBACK, f"b.run-{i}"
                assert "non-finite train loss nan at step 144" in command.reason
            shed = [status(daemon, f"a.flood-{i}", who("root")).ranks[0].num_shed_records for i in range(32)]
        finally:
            for client in flood:
                client.close()
        elapsed = time.monotonic() - started
    assert sum(shed) > 0, "the flood overloaded the worker"
    entries = [
        item.entry
        for path in list_segments(tmp_path / "data")
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.kind == "vitals" and item.entry.payload.get("num_shed")
    ]
    per_run = {run: sum(1 for e in entries if e.run == run) for run in {e.run for e in entries}}
    assert max(per_run.values()) <= elapsed + 2, f"shed entries per run in {elapsed:.1f} s: {per_run}"
