"""The run registry: every run's policy state, ranks and pending multi-rank steps.

State changes are journaled as idempotent "set" effects (``effects`` in an entry's payload): a run's
metadata, its whole policy state, a rank's counters, a rank's train-stream detector state, the pending
steps. Start-up loads the last
checkpoint and applies the effects of the entries after it; it never re-runs the policy. Runtime
facts (the stream a rank is attached by, its stall clock, timers) are never journaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from governor_daemon.journal.entry import Entry
from governor_daemon.policy import PolicyConfig, RunPolicy, StallTracker, StepAggregator

MAX_INCARNATIONS_KEPT = 16
MAX_SNAPSHOTS_KEPT = 16  # a rank's newest published snapshots the daemon remembers (timeline, step, digest)


@dataclass
class RankState:
    """One rank of a run. ``stream`` (the attached stream's id) and ``tracker`` are runtime only."""

    rank: int
    incarnation_id: str = ""
    generation: int = 0
    seqs: dict[str, int] = field(default_factory=dict)
    num_records: int = 0
    num_gaps: int = 0
    num_shed: int = 0
    latest_step: int = -1
    latest_timeline: int = 0
    stream: int | None = None
    tracker: StallTracker | None = None
    snapshots: list[tuple[int, int, str]] = field(default_factory=list)
    """The rank's published snapshots (timeline, step, digest), oldest first, less those a restore abandoned."""

    @property
    def last_durable_seq(self) -> int:
        """Last durable seq of the current incarnation."""
        return self.seqs.get(self.incarnation_id, 0)

    def effect(self) -> dict[str, Any]:
        """The journaled part."""
        return {
            "incarnation_id": self.incarnation_id,
            "generation": self.generation,
            "seqs": dict(self.seqs),
            "num_records": self.num_records,
            "num_gaps": self.num_gaps,
            "num_shed": self.num_shed,
            "latest_step": self.latest_step,
            "latest_timeline": self.latest_timeline,
            "snapshots": [list(s) for s in self.snapshots],
        }

    def apply(self, data: dict[str, Any]) -> None:
        """Set the journaled fields from ``effect`` output."""
        self.incarnation_id = str(data["incarnation_id"])
        self.generation = int(data["generation"])
        self.seqs = {str(k): int(v) for k, v in data["seqs"].items()}
        self.num_records = int(data["num_records"])
        self.num_gaps = int(data["num_gaps"])
        self.num_shed = int(data.get("num_shed", 0))  # journals written before shedding existed
        self.latest_step = int(data["latest_step"])
        self.latest_timeline = int(data.get("latest_timeline", 0))
        self.snapshots = [(int(t), int(s), str(d)) for t, s, d in data.get("snapshots", [])]  # older journals: none

    def published(self, timeline: int, step: int, digest: str) -> None:
        """The rank published a snapshot (SnapshotTaken)."""
        self.snapshots.append((timeline, step, digest))
        del self.snapshots[:-MAX_SNAPSHOTS_KEPT]

    def restored(self, step: int) -> None:
        """The rank restored its snapshot of ``step``: it dropped the newer ones."""
        self.snapshots = [s for s in self.snapshots if s[1] <= step]

    @property
    def last_snapshot(self) -> tuple[int, int, str] | None:
        """The newest published snapshot, if it lies in shared memory (has a digest)."""
        return self.snapshots[-1] if self.snapshots and self.snapshots[-1][2] else None

    def accept_seq(self, seq: int, first_seq: int | None = None) -> None:
        """Record ``first_seq..seq`` (default: ``seq`` alone) as accepted; count any gap before it."""
        last = self.last_durable_seq
        first = seq if first_seq is None else first_seq
        if first > last + 1:
            self.num_gaps += first - last - 1
        self.seqs[self.incarnation_id] = seq
        while len(self.seqs) > MAX_INCARNATIONS_KEPT:
            oldest = next(k for k in self.seqs if k != self.incarnation_id)
            del self.seqs[oldest]


@dataclass
class RunMeta:
    """Facts fixed at run creation (the first Hello)."""

    task: str
    world_size: int
    overrides: dict[str, Any]
    hello_rgl: float | None
    num_classes: int | None
    ignored_fields: list[str]
    owner: str = ""
    """The principal that created the run; only it may attach to the run."""
    life: int = 0
    """Which life of its run id this run is: a run forgotten (evicted, expired) and created again is another
    life, told to trainers in every Welcome so that they void the commands of an earlier one."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "task": self.task,
            "world_size": self.world_size,
            "overrides": dict(self.overrides),
            "hello_rgl": self.hello_rgl,
            "num_classes": self.num_classes,
            "ignored_fields": list(self.ignored_fields),
            "owner": self.owner,
            "life": self.life,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMeta:
        """Inverse of ``as_dict``."""
        return cls(
            str(data["task"]),
            int(data["world_size"]),
            dict(data["overrides"]),
            data["hello_rgl"],
            data["num_classes"],
            list(data["ignored_fields"]),
            str(data.get("owner", "")),
            int(data.get("life", 0)),
        )


@dataclass
class Run:
    """One training run."""

    run_id: str
    meta: RunMeta
    policy: RunPolicy
    ranks: dict[int, RankState]
    aggregator: StepAggregator
    last_cursor: int = 0
    idle_since: float = 0.0
    """Monotonic time since which no rank is attached (runtime only; restarts at daemon start)."""

    @classmethod
    def create(cls, run_id: str, meta: RunMeta, config: PolicyConfig) -> Run:
        """A new run with a fresh policy state."""
        policy = RunPolicy(config, meta.world_size, meta.hello_rgl, meta.num_classes)
        ranks = {r: RankState(r) for r in range(meta.world_size)}
        return cls(run_id, meta, policy, ranks, StepAggregator(meta.world_size))

    def rank(self, rank: int) -> RankState:
        """The state of one rank (created on first use)."""
        state = self.ranks.get(rank)
        if state is None:
            state = self.ranks[rank] = RankState(rank)
        return state

    def to_dict(self) -> dict[str, Any]:
        """Everything journaled about the run (checkpoints)."""
        return {
            "meta": self.meta.as_dict(),
            "policy": self.policy.to_dict(),
            "ranks": {str(r): s.effect() for r, s in self.ranks.items()},
            "pending": self.aggregator.to_dict(),
            "last_cursor": self.last_cursor,
        }


class Registry:
    """All runs. Used from the event loop only."""

    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}
        self.lives = 0  # runs created so far, across every run id (a new run's ``life``)

    def checkpoint(self) -> dict[str, Any]:
        """Payload of a checkpoint entry: every run's journaled state."""
        return {"runs": {run_id: run.to_dict() for run_id, run in self.runs.items()}, "lives": self.lives}

    def restore(self, checkpoint: dict[str, Any] | None, entries: list[Entry]) -> None:
        """Load a checkpoint, then apply the effects of the entries after it."""
        self.runs.clear()
        self.lives = 0
        if checkpoint is not None:
            self.lives = int(checkpoint.get("lives", 0))
            for run_id, data in checkpoint.get("runs", {}).items():
                self._apply_effects(run_id, {**data, "policy": data["policy"]}, cursor=int(data["last_cursor"]))
        for entry in entries:
            self.apply_entry(entry)

    def apply_entry(self, entry: Entry) -> None:
        """Apply one journal entry's effects (and move its run's cursor)."""
        effects = entry.payload.get("effects")
        if entry.run and isinstance(effects, dict):
            self._apply_effects(entry.run, effects, cursor=entry.seq)
        elif entry.run in self.runs:
            self.runs[entry.run].last_cursor = entry.seq

    def _apply_effects(self, run_id: str, effects: dict[str, Any], cursor: int) -> None:
        if effects.get("forget"):
            self.runs.pop(run_id, None)
            return
        run = self.runs.get(run_id)
        if "meta" in effects:
            meta = RunMeta.from_dict(effects["meta"])
            self.lives = max(self.lives, meta.life)
            if run is None:
                policy = RunPolicy.from_dict(effects["policy"])
                run = Run(run_id, meta, policy, {}, StepAggregator(meta.world_size))
                self.runs[run_id] = run
            run.meta = meta
        if run is None:
            raise ValueError(f"journal entry for run {run_id!r} before its creation")
        if "policy" in effects:
            run.policy = RunPolicy.from_dict(effects["policy"])
        for rank, data in effects.get("ranks", {}).items():
            run.rank(int(rank)).apply(data)
        run.policy.detector_pins.load(effects)
        if "pending" in effects:
            run.aggregator.load(effects["pending"])
        run.last_cursor = max(run.last_cursor, cursor)
