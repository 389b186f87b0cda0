"""What every handler of the core works on: the options, the runs, and which stream each rank is attached by.

``CoreState`` is the one object the event families (``attach``, ``records``, ``reports``, ``control``,
``timers``) share; ``GovernorCore`` owns it and dispatches events to them. ``accept`` is the first step of
every trainer message that carries a seq: the stream's run and rank, or nothing for a moot or resent one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from governor_daemon.core.effects import Ack, Effects
from governor_daemon.core.registry import RankState, Registry, Run
from governor_daemon.errors import InvalidInputError, NotFoundError
from governor_daemon.policy import PolicyConfig

MAX_SEQ_JUMP = 1 << 32
"""The furthest a message's seq may lie beyond the rank's last accepted seq (gaps stay countable)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send and on what the daemon keeps."""

    max_records_per_batch: int = 4096
    max_string_length: int = 4096
    max_per_class: int = 100_000
    max_active_runs: int = 1024
    retain_finished_runs: int = 256
    max_active_runs_per_principal: int = 256
    idle_run_expiry_s: float = 7 * 24 * 3600.0
    """A run with no trainer attached for this long leaves memory (0: never)."""
    journal_train_records: int = 10_000
    """While a run has sent fewer records than this (all ranks), its vitals entries keep each train-step
    record, not only the batch summary (governor_daemon/train_records.py; 0: never)."""


@dataclass(frozen=True)
class CoreOptions:
    """What the core needs from the serve configuration."""

    defaults: PolicyConfig = field(default_factory=PolicyConfig)
    locked_fields: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Binding:
    """Which (run, rank, incarnation, generation) a stream is attached as."""

    run_id: str
    rank: int
    incarnation_id: str
    generation: int


@dataclass
class CoreState:
    """The runs (journaled: ``registry``) and the live attachments (not journaled: ``streams``).

    Invariant: a stream in ``streams`` is the ``stream`` of the rank its binding names, while that run is held.
    """

    options: CoreOptions = field(default_factory=CoreOptions)
    registry: Registry = field(default_factory=Registry)
    streams: dict[int, Binding] = field(default_factory=dict)

    def run(self, run_id: str) -> Run:
        """The run, or NotFoundError."""
        run = self.registry.runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}; `governor runs` lists the known runs")
        return run

    def bound(self, stream: int) -> Accepted | None:
        """The stream's run and rank; None for a stream that was replaced or ended (its messages are moot)."""
        binding = self.streams.get(stream)
        if binding is None:
            return None
        run = self.registry.runs.get(binding.run_id)
        if run is None:
            return None
        return Accepted(stream, binding, run, run.rank(binding.rank))


@dataclass(frozen=True)
class Accepted:
    """A trainer message's stream, binding, run and rank, once its seq is past the rank's journaled ones."""

    stream: int
    binding: Binding
    run: Run
    rank: RankState


def accept(
    state: CoreState, fx: Effects, stream: int, field_name: str, first_seq: int, last_seq: int
) -> Accepted | None:
    """The message's run and rank; None when moot (no binding), or when resent (``last_seq`` is journaled
    already: acknowledged again). Raises for a seq too far ahead."""
    bound = state.bound(stream)
    if bound is None:
        return None
    rank = bound.rank
    if last_seq <= rank.last_durable_seq:
        fx.send(stream, Ack(rank.last_durable_seq))
        return None
    if first_seq > rank.last_durable_seq + MAX_SEQ_JUMP:
        raise InvalidInputError(
            field_name,
            f"seq {first_seq} jumps more than {MAX_SEQ_JUMP} past the last accepted seq {rank.last_durable_seq}",
        )
    return bound
