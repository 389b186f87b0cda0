"""Fault injection for demos and tests. Each fault fires once per run and never again after a rollback.

Specs: ``nan@epoch=12`` (weights become NaN), ``spike@epoch=13:x50:epochs=2`` (reported validation
losses multiplied for that many validations), ``lobotomy@epoch=14`` (uniform outputs),
``lr-blowup@step=3000:x1000`` (learning rate multiplied), ``hang@epoch=15[:s=600]`` (the process stops
making progress for s seconds). ``:rank=R`` limits a fault to one rank of a multi-rank run;
``:timeline=T`` holds it until the trainer is on timeline T (after T rollbacks), so that a chain of faults
strikes one after another's rollback whatever the governor's latency. ``:attempt=A`` limits it to the launcher's
attempt A (torchrun's ``TORCHELASTIC_RESTART_COUNT``, 0 outside torchrun): a transient fault that a restarted
process does not meet again, as most hangs and crashes are.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from tolaria_trainer.errors import ScheduleError
from tolaria_trainer.training.state import TrainingState

KINDS = ("nan", "spike", "lobotomy", "lr-blowup", "hang")
_SPEC_RE = re.compile(r"^(?P<kind>[a-z-]+)@(?P<unit>epoch|step)=(?P<at>\d+)(?P<opts>(?::[a-z]*=?[0-9.]+)*)$")


@dataclass(frozen=True)
class Fault:
    """One parsed fault."""

    kind: str
    unit: str
    at: int
    factor: float = 1.0
    epochs: int = 1
    seconds: float = 3600.0
    spec: str = ""
    rank: int | None = None
    timeline: int | None = None
    attempt: int | None = None


def parse_fault(spec: str) -> Fault:
    """Parse one --inject value; raises ScheduleError naming the expected syntax."""
    match = _SPEC_RE.match(spec.strip())
    if match is None:
        raise ScheduleError(
            f"bad --inject {spec!r}: expected KIND@epoch=N or KIND@step=N with options, e.g. nan@epoch=12, "
            "spike@epoch=13:x50:epochs=2, lr-blowup@step=3000:x1000"
        )
    kind, unit, at = match.group("kind"), match.group("unit"), int(match.group("at"))
    if kind not in KINDS:
        raise ScheduleError(f"unknown fault {kind!r} in {spec!r}; kinds: {', '.join(KINDS)}")
    if (kind == "lr-blowup") != (unit == "step"):
        raise ScheduleError(f"{spec!r}: lr-blowup is given @step=N, every other fault @epoch=N")
    options: dict[str, float] = {}
    for opt in filter(None, match.group("opts").split(":")):
        if opt.startswith("x"):
            options["factor"] = float(opt[1:])
        elif "=" in opt:
            name, value = opt.split("=", 1)
            if name not in ("epochs", "s", "rank", "timeline", "attempt"):
                raise ScheduleError(
                    f"{spec!r}: unknown option {name!r} (epochs=N, s=SECONDS, rank=R, timeline=T, attempt=A, xFACTOR)"
                )
            options[name] = float(value)
        else:
            raise ScheduleError(f"{spec!r}: bad option {opt!r}")
    if kind in ("spike", "lr-blowup") and "factor" not in options:
        options["factor"] = 50.0 if kind == "spike" else 1000.0
    rank = int(options["rank"]) if "rank" in options else None
    return Fault(
        kind,
        unit,
        at,
        options.get("factor", 1.0),
        int(options.get("epochs", 1)),
        options.get("s", 3600.0),
        spec.strip(),
        rank,
        int(options["timeline"]) if "timeline" in options else None,
        int(options["attempt"]) if "attempt" in options else None,
    )


class FaultInjector:
    """Fires parsed faults at their epoch or step, once each."""

    def __init__(self, faults: list[Fault], rank: int = 0, attempt: int = 0) -> None:
        self.faults = [
            f for f in faults if (f.rank is None or f.rank == rank) and (f.attempt is None or f.attempt == attempt)
        ]
        self.fired: set[str] = set()
        self._spiking: dict[str, int] = {}

    def _due(self, kind: str, unit: str, at: int, timeline: int) -> list[Fault]:
        return [
            f
            for f in self.faults
            if f.kind == kind
            and f.unit == unit
            and f.at <= at
            and f.spec not in self.fired
            and (f.timeline is None or f.timeline == timeline)
        ]

    def before_epoch(self, state: TrainingState, epoch: int) -> list[str]:
        """Fire epoch faults due at ``epoch`` (1-based) before it trains; returns their specs."""
        fired = []
        for fault in self._due("nan", "epoch", epoch, state.timeline):
            with torch.no_grad():
                for param in state.host.head.parameters():
                    param.fill_(float("nan"))
            fired.append(fault.spec)
        for fault in self._due("lobotomy", "epoch", epoch, state.timeline):
            with torch.no_grad():
                state.host.head.weight.zero_()
                state.host.head.bias.zero_()
            # The collapse persists: the head stops learning, as a dead network would.
            state.host.head.requires_grad_(False)
            fired.append(fault.spec)
        for fault in self._due("spike", "epoch", epoch, state.timeline):
            self._spiking[fault.spec] = fault.epochs
            fired.append(fault.spec)
        for fault in self._due("hang", "epoch", epoch, state.timeline):
            self.fired.add(fault.spec)
            time.sleep(fault.seconds)
            fired.append(fault.spec)
        self.fired.update(fired)
        return fired

    def on_step(self, state: TrainingState) -> list[str]:
        """Fire step faults due at ``state.step``."""
        fired = []
        for fault in self._due("lr-blowup", "step", state.step, state.timeline):
            for group in state.host_optimizer.param_groups:
                group["lr"] = group["lr"] * fault.factor
            fired.append(fault.spec)
        self.fired.update(fired)
        return fired

    def reported_loss(self, loss: float) -> float:
        """The validation loss to report: multiplied while a spike is active (counts down per call)."""
        for spec, remaining in list(self._spiking.items()):
            fault = next(f for f in self.faults if f.spec == spec)
            loss *= fault.factor
            if remaining <= 1:
                del self._spiking[spec]
            else:
                self._spiking[spec] = remaining - 1
        return loss

    def on_restore(self, state: TrainingState) -> None:
        """After a rollback: effects end (a lobotomized head learns again); nothing fires again."""
        self._spiking.clear()
        state.host.head.requires_grad_(True)
