"""Seed lifecycle schedules, parsed from text such as ``germinate:residual@2,blend@4,fossilize@7``.

Items are ``[SLOT/]ACTION[:ARG]@EPOCH``; SLOT defaults to slot0. Actions: ``germinate:BLUEPRINT``
(then womb-mode training), ``blend[:EPOCHS]`` (alpha ramps to 1 over EPOCHS validations, default 2,
then PROBATIONARY), ``fossilize`` and ``cull``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tolaria_trainer.errors import ScheduleError
from tolaria_trainer.model.seeds import BLUEPRINTS

ACTIONS = ("germinate", "blend", "fossilize", "cull")
_ITEM_RE = re.compile(r"^(?:(?P<slot>[A-Za-z0-9_]+)/)?(?P<action>[a-z]+)(?::(?P<arg>[A-Za-z0-9_.]+))?@(?P<epoch>\d+)$")


@dataclass(frozen=True)
class ScheduleEvent:
    """One lifecycle event at the start of ``epoch`` (1-based)."""

    epoch: int
    slot: str
    action: str
    blueprint: str = ""
    blend_epochs: int = 2


def parse_schedule(text: str) -> list[ScheduleEvent]:
    """Parse a schedule; raises ScheduleError naming the bad item and the grammar."""
    events: list[ScheduleEvent] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        match = _ITEM_RE.match(raw)
        if match is None:
            raise ScheduleError(
                f"bad seed-schedule item {raw!r}: expected [SLOT/]ACTION[:ARG]@EPOCH, e.g. germinate:residual@2"
            )
        action, arg, epoch = match.group("action"), match.group("arg") or "", int(match.group("epoch"))
        slot = match.group("slot") or "slot0"
        if action not in ACTIONS:
            raise ScheduleError(f"unknown action {action!r} in {raw!r}; actions: {', '.join(ACTIONS)}")
        if epoch < 1:
            raise ScheduleError(f"epoch must be >= 1 in {raw!r}")
        if action == "germinate":
            if arg not in BLUEPRINTS:
                raise ScheduleError(f"{raw!r}: germinate needs a blueprint: {', '.join(sorted(BLUEPRINTS))}")
            events.append(ScheduleEvent(epoch, slot, action, blueprint=arg))
        elif action == "blend":
            if arg and not arg.isdigit():
                raise ScheduleError(f"{raw!r}: blend takes a whole number of epochs, e.g. blend:3@4")
            events.append(ScheduleEvent(epoch, slot, action, blend_epochs=max(1, int(arg or 2))))
        else:
            if arg:
                raise ScheduleError(f"{raw!r}: {action} takes no argument")
            events.append(ScheduleEvent(epoch, slot, action))
    return sorted(events, key=lambda e: e.epoch)
