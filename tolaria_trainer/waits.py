"""The two bounded waits of a governed rank for what its governor is known to be sending.

``for_command``: before a validation on condemned weights, for the command on its way. ``for_settled``:
at the end of training, for the last validation's verdict and, after a PANIC, for its command. Invariant:
every rank leaves a wait in the same round (each round's decision is a collective), so the agreement
point that follows is held by all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tolaria_trainer.commands import Commands
from tolaria_trainer.distributed import Distributed
from tolaria_trainer.governance import Governance, VerdictKind
from tolaria_trainer.verdicts import ValidationSnapshots

_ROUND_S = 0.01


def for_command(
    commands: Commands, governance: Governance, dist: Distributed, wait_s: float, flush: Callable[[], object]
) -> None:
    """Until a command is in hand on every rank, the governor is away, or ``wait_s`` passed; ``flush``
    (the buffered records) goes first in each round, as the governor judges them before it commands."""
    deadline = time.monotonic() + wait_s
    while True:
        flush()
        commands.collect()
        waiting = not commands.known and governance.connected
        if not dist.agree_max(int(waiting)) or dist.agree_max(int(time.monotonic() >= deadline)):
            return
        time.sleep(_ROUND_S)


def for_settled(
    validations: ValidationSnapshots,
    commands: Commands,
    governance: Governance,
    dist: Distributed,
    wait_s: float,
    connect_wait_s: float,
) -> None:
    """Until every rank holds the last validation's verdict (and after a PANIC its command), at most
    ``wait_s``. While no governor is attached, only for a command known to be coming (a PANIC verdict, a
    condemned rank), and then ``connect_wait_s`` at least, for the governor to come back and send it."""
    started = time.monotonic()
    while True:
        verdict = validations.verdict(validations.latest_seq, 0.0)
        commands.collect()
        panic = verdict is not None and verdict.kind is VerdictKind.PANIC
        if governance.connected:
            judged = verdict is not None or validations.latest_seq is None
            settled = judged and (not panic or bool(commands.known))
            bound = wait_s
        else:  # the governor is away: wait for it only for a command known to be on its way
            in_hand = bool(commands.known) or governance.commands_waiting
            settled = in_hand or not (panic or commands.condemned)
            bound = max(wait_s, connect_wait_s)
        timed_out = time.monotonic() - started >= bound
        if dist.agree_min(int(settled)) or dist.agree_max(int(timed_out)):
            return
        time.sleep(_ROUND_S)


__all__ = ["for_command", "for_settled"]
