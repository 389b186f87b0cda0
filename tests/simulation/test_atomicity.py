"""Every core handler is atomic: an exception at any of its effects (a journal entry appended, a message sent,
or the journal refusing to encode an entry) leaves the state exactly as it was before the event, and accepts
no seq. Checked on every event of seeded simulation schedules (every event kind the core handles: attach,
vitals judged and shed, stale and panicking, validations of one and several ranks, snapshots, command
results, finishes, detaches, controller commands, policy updates, forgetting, ticks with deadlines, stalls
and timeouts, start and stop), failing at each of its effects in turn on a copy of the core."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest

from governor_daemon.core import GovernorCore
from governor_daemon.core import events as ev
from governor_daemon.core.effects import Effects
from governor_daemon.errors import GovernorError
from governor_daemon.journal.entry import canonical_json
from tests.simulation import harness
from tests.simulation.run import SCHEDULE_LENGTH


class Injected(Exception):
    """The failure injected at an effect."""


def state(core: GovernorCore) -> Any:
    """Everything the core holds: the journaled state and the runtime parts (streams, attachments, stall
    clocks, pinned detector candidates)."""
    runtime = {
        run_id: (
            {rank: (r.stream, None if r.tracker is None else vars(r.tracker)) for rank, r in run.ranks.items()},
            run.policy.detector_pins.candidates,
            run.idle_since,
        )
        for run_id, run in core.registry.runs.items()
    }
    return copy.deepcopy((core.checkpoint(), dict(core.streams), runtime))


@contextmanager
def failing_at(k: int) -> Iterator[list[int]]:
    """Every Effects.append and Effects.send call counted; the k-th (from 0) raises Injected."""
    calls = [0]
    append, send = Effects.append, Effects.send

    def counted(original: Any) -> Any:
        def call(self: Effects, *args: Any, **kwargs: Any) -> None:
            if calls[0] == k:
                calls[0] += 1
                raise Injected(f"effect {k}")
            calls[0] += 1
            original(self, *args, **kwargs)

        return call

    Effects.append = counted(append)  # type: ignore[method-assign]
    Effects.send = counted(send)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Effects.append, Effects.send = append, send  # type: ignore[method-assign]


class CheckedCore(GovernorCore):
    """A core that, before handling each event for real, handles it on a copy failing at each effect in turn,
    and at the journal's encoding, and checks that the copy is then exactly as before."""

    seen: ClassVar[dict[str, int]] = {}  # event kind -> failures injected into it

    @contextmanager
    def transaction(self, event: ev.Event) -> Iterator[Effects]:
        for k in range(64):
            probe = copy.deepcopy(self)
            before = state(probe)
            with failing_at(k) as calls:
                try:
                    with GovernorCore.transaction(probe, event) as fx:
                        for append in fx.entries:
                            canonical_json(append.payload)
                except Injected:
                    assert state(probe) == before, f"{type(event).__name__} failing at effect {k} changed the state"
                    CheckedCore.seen[type(event).__name__] = CheckedCore.seen.get(type(event).__name__, 0) + 1
                    continue
                except GovernorError:
                    pass  # refused before any effect
            assert calls[0] <= k, "every effect was failed in turn"
            break
        probe = copy.deepcopy(self)
        before = state(probe)
        try:
            with GovernorCore.transaction(probe, event):
                raise Injected("the journal refuses an entry (it cannot encode it, say)")
        except Injected:
            assert state(probe) == before, f"{type(event).__name__} refused by the journal changed the state"
        except GovernorError:
            pass
        with GovernorCore.transaction(self, event) as fx:
            yield fx


def test_every_handler_is_atomic_at_every_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "GovernorCore", CheckedCore)
    CheckedCore.seen = {}
    for seed in (3, 11, 42, 7):
        world = harness.World(seed)
        for action in harness.draw_schedule(seed, SCHEDULE_LENGTH // 2):
            world.apply(action)
        world.settle()
        world.check_final()
    kinds = {
        "Attach",
        "Vitals",
        "Validation",
        "SnapshotTaken",
        "SnapshotAdopted",
        "CommandResult",
        "Finish",
        "Detach",
        "Tick",
        "Start",
    }
    assert kinds <= set(CheckedCore.seen), CheckedCore.seen
