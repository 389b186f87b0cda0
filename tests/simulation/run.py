"""Run seeded schedules; on a violation, shrink the schedule and print the seed and the shrunk trace.

``python -m tests.simulation.run --seeds 10000`` (what ``make simulate SEEDS=N`` runs).
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.simulation.harness import Action, Violation, World, draw_schedule

SCHEDULE_LENGTH = 300


def run_schedule(seed: int, actions: list[Action]) -> None:
    """Play ``actions`` in the world of ``seed``, checking after every action, then settle and check the end."""
    world = World(seed)
    for action in actions:
        world.apply(action)
    world.settle()
    world.check_final()


def failure(seed: int, actions: list[Action]) -> Violation | None:
    """The violation ``actions`` cause in the world of ``seed``, or None."""
    try:
        run_schedule(seed, actions)
    except Violation as exc:
        return exc
    return None


def shrink(seed: int, actions: list[Action]) -> list[Action]:
    """A smaller schedule that still fails (delta debugging over chunks, then single actions)."""
    chunk = max(1, len(actions) // 2)
    while chunk >= 1:
        i = 0
        while i < len(actions):
            candidate = actions[:i] + actions[i + chunk :]
            if failure(seed, candidate) is not None:
                actions = candidate
            else:
                i += chunk
        chunk //= 2
    return actions


def report(seed: int, actions: list[Action]) -> str:
    """The seed, the shrunk trace and the violation, for a person to replay."""
    small = shrink(seed, actions)
    exc = failure(seed, small)
    lines = [f"seed {seed}: {exc}", f"shrunk schedule ({len(small)} of {len(actions)} actions):"]
    lines += [f"  {kind} target={target} param={param}" for kind, target, param in small]
    lines.append(f"replay: run_schedule({seed}, {small!r})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    for seed in range(args.first, args.first + args.seeds):
        actions = draw_schedule(seed, SCHEDULE_LENGTH)
        if failure(seed, actions) is not None:
            print(report(seed, actions), file=sys.stderr)
            return 1
    print(f"{args.seeds} schedules, 0 violations, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
