"""GovernedTraining's start in a restarted process: it adopts the snapshot its dead process left in shared memory
when the governor names exactly it, tells the governor (SnapshotAdopted) and trains on on a new timeline."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.trainer.fake_governance import FakeGovernance
from tests.unit.trainer.helpers import assert_bitwise_equal
from tests.unit.trainer.test_governed import plain_setup, state_of, train_steps
from tolaria_trainer import GovernedTraining
from tolaria_trainer.governance import CommandType

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


@pytest.fixture
def shm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = Path("/dev/shm") / f"tolaria-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    monkeypatch.setenv("TOLARIA_SHM_DIR", str(directory))
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def _process(fake: FakeGovernance, seed: int) -> GovernedTraining:
    model, optimizers, scheduler = plain_setup(seed)
    return GovernedTraining(
        model, optimizers, governor=fake, run_id="adopting", num_classes=3, schedulers=[scheduler], agree_every_steps=5
    )


def _dead_process(timeline: int = 0) -> tuple[tuple[int, int, str], dict[str, object]]:
    """A process trains 10 steps on ``timeline``, publishes step 10, trains 4 more and dies (nothing closed).
    Returns the published snapshot (timeline, step, digest) and the training state as it was then."""
    first = FakeGovernance(run_timeline=timeline)
    dead = _process(first, seed=0)
    dead.start()
    train_steps(dead, 10)
    first.verdict_on(dead.report_validation(1.0, 0.5, epoch=1))
    dead.agreement_point()
    published = first.snapshots[-1]
    assert published.digest
    state = state_of(dead)
    train_steps(dead, 4)
    dead.lkg.close(remove=False)
    return (published.timeline, published.step, published.digest), state


def test_a_restarted_process_adopts_and_trains_on_on_a_new_timeline(shm: Path) -> None:
    """Before, the restarted process trained on on the timeline its dead process had reached, so the governor
    got steps 11.. a second time on one timeline. Now it reports the adoption first and moves on."""
    snapshot, lkg = _dead_process(timeline=2)
    assert snapshot[:2] == (2, 10)
    second = FakeGovernance(run_timeline=2, last_snapshot=snapshot)
    restarted = _process(second, seed=7)
    with restarted:
        assert restarted.adopted is not None
        assert_bitwise_equal(state_of(restarted), lkg)
        (adoption,) = second.adoptions
        assert (adoption.timeline, adoption.snapshot) == (2, snapshot)
        assert restarted.state.timeline == 3
        assert [(s.timeline, s.step) for s in second.snapshots] == [(3, 10)], "the adopted state, republished"
        train_steps(restarted, 5)
        restarted.agreement_point()
    assert [(timeline, step) for timeline, step, _ in second.steps] == [(3, s) for s in range(11, 16)]


def test_a_refused_adoption_reports_nothing_and_stays_on_the_timeline(shm: Path) -> None:
    _dead_process()
    second = FakeGovernance(run_timeline=1, last_snapshot=(0, 10, "sha256:" + "0" * 64))  # not this snapshot
    with _process(second, seed=7) as restarted:
        assert restarted.adopted is None
        assert second.adoptions == []
        assert restarted.state.timeline == 1
        assert [(s.timeline, s.step) for s in second.snapshots] == [(1, 0)]


def test_a_rollback_made_before_the_adoption_is_not_executed_after_it(shm: Path) -> None:
    """Red-team finding (seen from rank 0 of two): ROLLBACK 1 was made on timeline 0, rank 1 executed it (the run
    moved to 1) and rank 0 died before it did. Both restart; the Welcome says timeline 1 and re-sends ROLLBACK 1;
    both adopt on 1 and go on on 2. Before, executing ROLLBACK 1 put the rank back on 0 + 1 = 1, behind the run:
    every record stale until a Resync. The adoption answers it: not executed, nothing reported for it."""
    snapshot, _ = _dead_process()
    second = FakeGovernance(run_timeline=0, last_snapshot=snapshot)
    second.order(CommandType.ROLLBACK)  # made on timeline 0
    second.run_timeline = 1  # rank 1's result moved the run
    with _process(second, seed=7) as restarted:
        assert restarted.state.timeline == 2
        train_steps(restarted, 10)
        restarted.agreement_point()
        assert restarted.num_restores == 0
    assert {timeline for timeline, _, _ in second.steps} == {2}
    assert second.results == [], "no result: the governor counts the adoption as the rank's answer"


def test_a_rollback_made_on_the_adoptions_timeline_is_executed_with_its_recipe(shm: Path) -> None:
    """The dead process never executed it (it was made on the timeline the restart adopts on): the restarted
    process executes it at its first agreement point, restoring the adopted snapshot with the recipe."""
    snapshot, _ = _dead_process()
    second = FakeGovernance(run_timeline=0, last_snapshot=snapshot)
    second.order(CommandType.ROLLBACK, skip=3)
    with _process(second, seed=7) as restarted:
        assert restarted.state.timeline == 1
        (outcome,) = [o for o in train_steps(restarted, 5) if o.restored]  # one rank acts on it at once
    assert (outcome.restored_step, outcome.timeline, outcome.skip_batches) == (10, 1, 3)
    (result,) = second.results
    assert result.succeeded
