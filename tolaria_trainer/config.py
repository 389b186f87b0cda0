"""RunConfig: everything `tolaria-train` was asked to do, checked where it is made.

The CLI builds one from its flags (most named as its fields; ``--address`` is ``governor``, ``--dataset-dir``
is ``data_dir``) and a program can build one directly;
either way ``__post_init__`` rejects what cannot work (a malformed fault or seed schedule, a missing TLS
file, a bad governor address) with a message naming the flag, before any training starts.
``governed_options`` is the one place its governance flags become the run's ``GovernedOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tolaria_trainer.address import check_governor_address
from tolaria_trainer.faults import parse_fault
from tolaria_trainer.model.schedule import parse_schedule
from tolaria_trainer.options import SNAPSHOT_LOCATIONS as LOCATIONS
from tolaria_trainer.options import GovernedOptions, default_run_id


@dataclass
class RunConfig:
    """One rank's run of `tolaria-train`."""

    task: str = "digits"
    epochs: int = 15
    max_epochs_total: int | None = None  # default: 3 × epochs
    batch_size: int = 32
    lr: float = 1e-3
    device: str = "cpu"
    data_dir: Path | None = None
    governor: str | None = None
    token: str = ""
    run_id: str = ""
    seed_schedule: str = ""
    snapshot_location: str = "auto"
    snapshot_shm: bool = True  # with --run-id: snapshots in /dev/shm, adopted by a restarted process
    fail_closed: bool = False
    fail_closed_deadline_s: float = 60.0
    halt_wait_s: float = 3600.0
    inject: list[str] = field(default_factory=list)
    compile: bool = False
    agree_every_steps: int = 50
    verdict_wait_s: float = 5.0  # at the end: for the last validation's verdict, and a PANIC's command
    vitals_flush_s: float = 0.1  # train-step records wait at most about this long before they are sent
    seed: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    train_metric_batches: int = 4
    heartbeat_s: float = 2.0
    final_flush_s: float = 30.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.max_epochs_total is not None and self.max_epochs_total < 1:
            raise ValueError(f"--max-epochs-total must be >= 1, got {self.max_epochs_total}")
        if self.agree_every_steps < 0:
            raise ValueError(f"--agree-every-steps must be >= 0, got {self.agree_every_steps}")
        if self.snapshot_location not in LOCATIONS:
            choices = ", ".join(LOCATIONS)
            raise ValueError(f"--snapshot-location must be one of {choices}, got {self.snapshot_location!r}")
        for spec in self.inject:
            parse_fault(spec)
        parse_schedule(self.seed_schedule)
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together (mTLS)")
        if self.governor:
            check_governor_address(self.governor)
        self.governed_options()  # the governance knobs' own checks (messages name the field)

    def governed_options(
        self, *, num_classes: int | None = None, random_guess_loss: float | None = None
    ) -> GovernedOptions:
        """This run's GovernedOptions (the TLS files read here); ``num_classes`` or ``random_guess_loss`` is
        the loaded task's. Snapshots live in shared memory only under a given --run-id: a restarted process
        finds them only under the same id."""
        return GovernedOptions(
            run_id=self.run_id or default_run_id(self.task),
            task=self.task,
            token=self.token,
            num_classes=num_classes,
            random_guess_loss=random_guess_loss,
            policy=self.policy,
            snapshot_location=self.snapshot_location,
            snapshot_shm=bool(self.run_id) and self.snapshot_shm,
            agree_every_steps=self.agree_every_steps,
            fail_closed=self.fail_closed,
            fail_closed_deadline_s=self.fail_closed_deadline_s,
            halt_wait_s=self.halt_wait_s,
            verdict_wait_s=self.verdict_wait_s,
            vitals_flush_s=self.vitals_flush_s,
            final_flush_s=self.final_flush_s,
            heartbeat_s=self.heartbeat_s,
            tls_ca=self.tls_ca.read_bytes() if self.tls_ca else None,
            tls_cert=self.tls_cert.read_bytes() if self.tls_cert else None,
            tls_key=self.tls_key.read_bytes() if self.tls_key else None,
        )

    @property
    def epoch_cap(self) -> int:
        """Epochs run at most, rollbacks included."""
        return self.max_epochs_total or 3 * self.epochs
