"""A restarted trainer's adoption of its rank's snapshot (SnapshotAdopted): the run goes on on a new timeline,
the detectors resume from the snapshot's pinned state, and what does not match changes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from governor_daemon.core import events as ev
from governor_daemon.core.effects import Ack, Resync, Welcome
from governor_daemon.errors import InvalidInputError
from governor_daemon.service import codec
from tests.unit.core.test_core import Harness, commands, messages
from tolaria.governor.v1 import trainer_service_pb2
from tolaria.journal import EntryKind

DIGEST = "sha256:" + "ab" * 32


def _trained_and_died(h: Harness, stream: int, rank: int = 0, world_size: int = 1) -> tuple[int, int, str]:
    """Rank ``rank`` trains steps 1..100 on timeline 0, publishes the snapshot of step 60 (pinned) and dies."""
    h.attach(stream, rank=rank, world_size=world_size, inc=f"old-{rank}")
    steps = list(range(1, 101))
    losses = [2.0 / (1 + 0.01 * s) for s in steps]
    h.handle(ev.Vitals(stream, h.seq(stream, 100), 0, np.array(steps), losses, [], 0, h.now, pins=(60,)))
    h.handle(ev.SnapshotTaken(stream, h.seq(stream), 0, 60, 1000, 1.0, "shm", h.now, digest=DIGEST))
    h.handle(ev.Detach(stream, h.now))
    return (0, 60, DIGEST)


def _adopt(h: Harness, stream: int, timeline: int, snapshot: tuple[int, int, str]) -> ev.SnapshotAdopted:
    return ev.SnapshotAdopted(stream, h.seq(stream), timeline, snapshot, 42.0, h.now)


def test_an_adoption_moves_the_run_to_a_new_timeline_and_resumes_the_detectors_from_the_snapshot() -> None:
    """Before, a restarted trainer trained on from the adopted step on the run's timeline: the steps its dead
    process had trained past the snapshot (61..100) and the ones it trains again were one stream to the
    detectors, whose state still held the dead process's steps."""
    h = Harness(step_warmup_steps=10)
    snapshot = _trained_and_died(h, 1)
    run = h.run()
    pinned = run.policy.detector_pins.pins[0][-1]
    (welcome,) = messages(h.attach(2, inc="new-0"), Welcome)
    assert welcome.last_snapshot == snapshot
    effects = h.handle(_adopt(h, 2, welcome.timeline, snapshot))
    assert messages(effects, Ack) == [Ack(1)]
    assert run.policy.timeline == 1
    assert run.policy.detector_pins.step_states[0] == pinned[2].resumed(1, 60)
    (entry,) = [p for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT_ADOPTED]
    assert (entry["timeline"], entry["new_timeline"], entry["run_timeline"]) == (0, 1, 1)
    assert entry["snapshot"] == {"timeline": 0, "step": 60, "digest": DIGEST}
    # The steps trained again are judged on the new timeline; a record of the old one is stale.
    h.vitals(2, [61, 62], [1.2, 1.2], timeline=1)
    assert [kind for _, kind, _ in h.entries][-1] == EntryKind.VITALS
    assert h.rebuilt() == h.core.checkpoint()


def test_every_rank_adopts_on_the_same_timeline_and_the_run_moves_once() -> None:
    h = Harness(step_warmup_steps=10)
    snapshots = [_trained_and_died(h, 1 + rank, rank, world_size=2) for rank in range(2)]
    run = h.run()
    for rank in range(2):
        h.attach(10 + rank, rank=rank, world_size=2, inc=f"new-{rank}")
    h.handle(_adopt(h, 10, 0, snapshots[0]))
    h.handle(_adopt(h, 11, 0, snapshots[1]))
    assert run.policy.timeline == 1, "the second rank follows the first: the run moves once"
    assert set(run.policy.detector_pins.step_states) == {0, 1}
    assert all(state.timeline == 1 and state.last_step == 60 for state in run.policy.detector_pins.step_states.values())
    entries = [p for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT_ADOPTED]
    assert [p["run_timeline"] for p in entries] == [1, 1]
    assert h.rebuilt() == h.core.checkpoint()


def test_an_adoption_of_a_snapshot_the_rank_did_not_publish_last_changes_nothing() -> None:
    h = Harness()
    _trained_and_died(h, 1)
    h.attach(2, inc="new-0")
    before = h.core.checkpoint()
    effects = h.handle(_adopt(h, 2, 0, (0, 40, DIGEST)))
    assert messages(effects, Ack) == [Ack(1)], "journaled and acknowledged: the trainer does not resend it"
    (entry,) = [p for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT_ADOPTED]
    assert [n["kind"] for n in entry["notices"]] == ["unknown_snapshot"]
    after = h.core.checkpoint()
    assert after["runs"]["r"]["policy"] == before["runs"]["r"]["policy"]


def test_an_adoption_on_a_timeline_ahead_of_the_run_is_refused_and_changes_nothing() -> None:
    h = Harness()
    snapshot = _trained_and_died(h, 1)
    h.attach(2, inc="new-0")
    before, journaled = h.core.checkpoint(), len(h.entries)
    with pytest.raises(InvalidInputError, match=r"snapshot_adopted\.timeline"):
        h.handle(_adopt(h, 2, 5, snapshot))
    assert h.core.checkpoint() == before
    assert len(h.entries) == journaled


def test_a_resent_adoption_is_acknowledged_and_moves_nothing_again() -> None:
    h = Harness()
    snapshot = _trained_and_died(h, 1)
    h.attach(2, inc="new-0")
    adopted = _adopt(h, 2, 0, snapshot)
    h.handle(adopted)
    assert messages(h.handle(adopted), Ack) == [Ack(1)]
    assert h.run().policy.timeline == 1


@pytest.mark.parametrize(
    ("adopted", "field"),
    [
        (trainer_service_pb2.SnapshotAdopted(seq=1, timeline=0), "snapshot_adopted.snapshot"),
        (
            trainer_service_pb2.SnapshotAdopted(
                seq=1, snapshot=trainer_service_pb2.PublishedSnapshot(timeline=0, step=60, digest="")
            ),
            "snapshot_adopted.snapshot.digest",
        ),
        (
            trainer_service_pb2.SnapshotAdopted(
                seq=1, snapshot=trainer_service_pb2.PublishedSnapshot(timeline=0, step=-1, digest=DIGEST)
            ),
            "snapshot_adopted.snapshot.step",
        ),
        (
            trainer_service_pb2.SnapshotAdopted(
                seq=0, snapshot=trainer_service_pb2.PublishedSnapshot(timeline=0, step=60, digest=DIGEST)
            ),
            "snapshot_adopted.seq",
        ),
        (  # red-team finding: a second adoption (or one after a Finish) moved the run again
            trainer_service_pb2.SnapshotAdopted(
                seq=7, snapshot=trainer_service_pb2.PublishedSnapshot(timeline=0, step=60, digest=DIGEST)
            ),
            "snapshot_adopted.seq",
        ),
    ],
)
def test_a_malformed_adoption_is_refused_naming_its_field(
    adopted: trainer_service_pb2.SnapshotAdopted, field: str
) -> None:
    request = trainer_service_pb2.AttachRequest(snapshot_adopted=adopted)
    with pytest.raises(InvalidInputError, match=field.replace(".", r"\.")):
        codec.decode_request(request, 1, 0.0, Harness().core.options.limits)


def test_an_open_rollback_made_before_the_adoption_is_answered_by_it() -> None:
    """Red-team finding. ROLLBACK 1 is made on timeline 0; rank 1 executes it (the run moves to 1) and rank 0
    dies before it does; both restart and adopt on 1 (the run moves to 2). Before, the command stayed open and
    both trainers executed it afterwards, landing on 0 + 1 = 1, behind the run: every record stale until a
    Resync. The adoption of a rank answers a ROLLBACK or RESUME made on an earlier timeline (its dead process
    executed it: what it left is what it restored), and the trainer does not execute it (Commands.adopted_on)."""
    h = Harness(step_warmup_steps=10)
    for rank in range(2):
        h.attach(1 + rank, rank=rank, world_size=2, inc=f"old-{rank}")
    for rank in range(2):
        steps = list(range(1, 100))
        h.handle(ev.Vitals(1 + rank, h.seq(1 + rank, 99), 0, np.array(steps), [1.0] * 99, [], 0, h.now, pins=(60,)))
        h.handle(ev.SnapshotTaken(1 + rank, h.seq(1 + rank), 0, 60, 1000, 1.0, "shm", h.now, digest=DIGEST))
    rollback = commands(h.vitals(1, [100], [math.nan]))[0]
    assert rollback.timeline == 0
    h.handle(ev.CommandResult(2, h.seq(2), rollback.command_id, True, 1, 60, 1.0, "", 0, h.now))
    h.run().ranks[1].restored(60)
    for stream in (1, 2):
        h.handle(ev.Detach(stream, h.now))
    for rank in range(2):
        h.attach(10 + rank, rank=rank, world_size=2, inc=f"new-{rank}")
    h.handle(_adopt(h, 10, 1, (0, 60, DIGEST)))
    policy = h.run().policy
    assert policy.timeline == 2
    assert policy.ledger.open is None, "rank 1 answered with its result, rank 0 with its adoption"
    (entry,) = [p for _, kind, p in h.entries if kind == EntryKind.SNAPSHOT_ADOPTED]
    assert [n["kind"] for n in entry["notices"]] == ["command_completed"]
    assert "answered by rank 0's adoption" in entry["notices"][0]["reason"]
    h.handle(_adopt(h, 11, 1, (0, 60, DIGEST)))
    assert h.run().policy.timeline == 2, "the peer follows"
    assert not messages(h.vitals(10, [61, 62], [1.0, 1.0], timeline=2), Resync)
    assert h.rebuilt() == h.core.checkpoint()


def test_an_open_rollback_made_on_the_adoptions_timeline_stays_open_for_the_trainer_to_execute() -> None:
    """A ROLLBACK nobody executed before the process died (made on the timeline the restart adopts on) is still
    the rank's to execute, with its recipe: the adoption moves the run, the command stays open."""
    h = Harness(step_warmup_steps=10)
    snapshot = _trained_and_died(h, 1)
    h.attach(2, inc="mid-0")
    rollback = commands(h.vitals(2, [101], [math.nan]))[0]
    h.handle(ev.Detach(2, h.now))
    h.attach(3, inc="new-0")
    h.handle(_adopt(h, 3, 0, snapshot))
    policy = h.run().policy
    assert policy.timeline == 1
    assert policy.ledger.open is not None
    assert policy.ledger.open.command.command_id == rollback.command_id
    h.handle(ev.CommandResult(3, h.seq(3), rollback.command_id, True, 1, 60, 1.0, "", 0, h.now))
    assert h.run().policy.ledger.open is None
    assert h.run().policy.timeline == 1
    assert h.rebuilt() == h.core.checkpoint()


def test_an_adoption_on_the_last_timeline_is_refused() -> None:
    """Red-team finding: timelines above 2^62-1 are refused, and a CommandResult can never move the run there, but
    an adoption on 2^62-1 moved the run to 2^62, on which the decoder refuses every record: the run was wedged."""
    request = trainer_service_pb2.AttachRequest(
        snapshot_adopted=trainer_service_pb2.SnapshotAdopted(
            seq=1,
            timeline=2**62 - 1,
            snapshot=trainer_service_pb2.PublishedSnapshot(timeline=2**62 - 1, step=2, digest=DIGEST),
        )
    )
    with pytest.raises(InvalidInputError, match=r"snapshot_adopted\.timeline"):
        codec.decode_request(request, 2, 0.0, Harness().core.options.limits)
