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


def test_a_restarted_process_adopts_and_trains_on_on_a_new_timeline(shm: Path) -> None:
    """Before, the restarted process trained on on the timeline its dead process had reached, so the governor
    got steps 11.. a second time on one timeline. Now it reports the adoption first and moves on."""
    first = FakeGovernance(run_timeline=2)
    dead = _process(first, seed=0)
    dead.start()
    train_steps(dead, 10)
    first.verdict_on(dead.report_validation(1.0, 0.5, epoch=1))
    dead.agreement_point()
    published = first.snapshots[-1]
    assert (published.timeline, published.step) == (2, 10)
    assert published.digest
    lkg = state_of(dead)
    train_steps(dead, 4)  # trained past the snapshot, then the process dies: nothing is closed
    dead.lkg.close(remove=False)

    second = FakeGovernance(run_timeline=2, last_snapshot=(2, 10, published.digest))
    restarted = _process(second, seed=7)
    with restarted:
        assert restarted.adopted is not None
        assert_bitwise_equal(state_of(restarted), lkg)
        (adoption,) = second.adoptions
        assert (adoption.timeline, adoption.snapshot) == (2, (2, 10, published.digest))
        assert restarted.state.timeline == 3
        assert [(s.timeline, s.step) for s in second.snapshots] == [(3, 10)], "the adopted state, republished"
        train_steps(restarted, 5)
        restarted.agreement_point()
    assert [(timeline, step) for timeline, step, _ in second.steps] == [(3, s) for s in range(11, 16)]


def test_a_refused_adoption_reports_nothing_and_stays_on_the_timeline(shm: Path) -> None:
    first = FakeGovernance()
    dead = _process(first, seed=0)
    dead.start()
    train_steps(dead, 10)
    first.verdict_on(dead.report_validation(1.0, 0.5, epoch=1))
    dead.agreement_point()
    dead.lkg.close(remove=False)
    second = FakeGovernance(run_timeline=1, last_snapshot=(0, 10, "sha256:" + "0" * 64))  # not this snapshot
    with _process(second, seed=7) as restarted:
        assert restarted.adopted is None
        assert second.adoptions == []
        assert restarted.state.timeline == 1
        assert [(s.timeline, s.step) for s in second.snapshots] == [(1, 0)]
