"""The seeded simulation (tests/simulation/harness.py): 1,000 schedules in `make test`, more with
`make simulate SEEDS=N`. A failure names the seed and prints the shrunk schedule."""

from __future__ import annotations

import pytest

from tests.simulation.harness import Violation, World, draw_schedule
from tests.simulation.run import SCHEDULE_LENGTH, failure, report

SEEDS = 1000
CHUNK = 100


@pytest.mark.parametrize("first", range(0, SEEDS, CHUNK))
def test_seeded_schedules_keep_every_invariant(first: int) -> None:
    """Each chunk of seeds: every invariant after every action and at the end."""
    for seed in range(first, first + CHUNK):
        actions = draw_schedule(seed, SCHEDULE_LENGTH)
        if failure(seed, actions) is not None:
            pytest.fail(report(seed, actions))


def test_the_checks_can_fail() -> None:
    """A world whose daemon forgets an entry's effect is caught at the next commit."""
    for seed in range(3, 40):  # the first schedule that leaves a run in memory (one may forget its run)
        world = World(seed)
        for action in draw_schedule(seed, 60):
            world.apply(action)
        world.commit()
        if world.core.registry.runs:
            break
    run = next(iter(world.core.registry.runs.values()))
    run.policy.ledger.total_punishment -= 1.0  # a state change with no entry
    with pytest.raises(Violation, match="differs from its journal"):
        world.commit()
