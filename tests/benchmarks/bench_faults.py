"""The fault campaign: goodput under faults, the governor against the practices users have today.

A real small language model (the step-level corpus's decoder-only transformer, ``corpus/steps.py``) trains
for ``STEPS`` optimizer steps with an LR warm-up and a cosine decay, on batches that are a pure function of
a data position (so a bad batch comes back whenever its position is trained again). Each fault kind strikes
at a step after the run has learnt something; every (fault, seed) is trained by each arm, and compared with
the healthy twin of its seed (no fault, no governor):

- **governed**: ``GovernedTraining`` against a real ``governor serve`` (a process of its own, on a loopback
  port), with the default policy; the data position lives in ``extra_state``, the loop skips what a restore asks it to
  (``take_skip``);
- **ungoverned**: the same loop with ``governor=None``;
- **stop on spike**: Lightning's SpikeDetection and LLM Foundry's KillLossSpike rules on the ungoverned run's
  losses: the run stops where the rule fires (it never finishes);
- **checkpoint and restart**: a ``torch.save`` checkpoint every ``CHECKPOINT_EVERY`` steps; on a non-finite
  loss or a spike (Megatron-LM's rule: 10 x the largest of the first 100 losses) the run restarts from the
  last checkpoint, as Megatron-LM's launchers do (a process start plus ``torch.load``, both measured here),
  at most ``MAX_RESTARTS`` times, then it stops; the PaLM variant also skips ``PALM_SKIP`` batches after
  each restart (PaLM restarted about 100 steps before a spike and skipped 200-500 batches).

The crash fault kills the training process after its step: each arm restarts it as its practice does (the
governed one adopting the last-known-good from /dev/shm, the checkpoint ones reloading their last checkpoint,
the others from step 0), and a restart costs a measured process start.

Per fault kind and arm it reports the runs that finish within ``WITHIN`` (2 %) of their twin's final
validation loss, the runs that stop or halt (with a diagnosis of a deterministic fault, for the governor),
the runs that finish worse silently, the optimizer steps trained and then thrown away (median and worst),
and the wall time against the twin; on healthy runs, the false rollbacks (restarts, stops). Goodput is the
time a fault-free run would have needed for the runs that finished as well as their twin, over the time the
arm spent on all faulty runs: overheads, replays, restarts and runs that end badly all count against it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.benchmarks.corpus.evaluate import foundry, lightning, megatron
from tests.benchmarks.corpus.steps import CONTEXT, TinyGPT, text_ids

STEPS = 500
VAL_EVERY = 50
WARMUP = 50
PEAK_LR = 3e-3
BATCH = 8
WIDTH = 64
FAULT_AT = 250
"""The fault's first step (plus 10 per seed): half-way, after the loss has fallen most of the way."""
SEEDS = (0, 1, 2)
WITHIN = 0.02
CHECKPOINT_EVERY = 100
MAX_RESTARTS = 3
PALM_SKIP = 200
CORRUPT_STEPS = 40


# ----------------------------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One fault kind. ``transient`` faults strike once (the first time their step is reached); the others
    are deterministic: a data fault comes back whenever its data position is trained, a schedule fault
    whenever its step is."""

    name: str
    description: str
    kind: str  # "nan_once", ...
    deterministic: bool = False


FAULTS = (
    Fault("nan_once", "one step's loss is NaN (once)", "nan_once"),
    Fault("grads_x1e4", "one step's gradients x 1e4 (once)", "grads_x1e4"),
    Fault("lr_x100_once", "the learning rate x 100 for one step (once)", "lr_x100_once"),
    Fault("zeroed_head", "the output head zeroed (once); it can learn again", "zeroed_head"),
    Fault("slow_divergence", "the learning rate creeps up x 1.03 per step from the fault (until a restore)", "ramp"),
    Fault("corrupt_stretch", f"{CORRUPT_STEPS} batches of random tokens at a data position", "corrupt", True),
    Fault("bad_batch", "one batch whose loss is NaN, whenever its data position is trained", "bad_batch", True),
    Fault("lr_schedule_bug", "the schedule's learning rate x 30 from the fault's step on", "lr_bug", True),
    Fault("lr_x10_bug", "the schedule's learning rate x 10 from the fault's step on", "lr_x10", True),
    Fault(
        "crash",
        "the training process is killed (SIGKILL) after the fault's step (once); a launcher restarts it",
        "crash",
    ),
)
HEALTHY = Fault("healthy", "no fault", "none")


@dataclass
class Injector:
    """A fault as it strikes one run. Its own state (``fired``) is the world's, not the model's: a restore
    does not bring a transient fault back."""

    fault: Fault
    at: int  # the fault's step (schedule faults) or data position (data faults)
    vocab: int
    fired: bool = False
    ramping: bool = False

    def batch(self, position: int, batch: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """The batch trained at ``position`` and whether its loss is to be poisoned with NaN."""
        kind = self.fault.kind
        if kind == "corrupt" and self.at <= position < self.at + CORRUPT_STEPS:
            noise = torch.Generator().manual_seed(seed * 7919 + position)
            return torch.randint(0, self.vocab, batch.shape, generator=noise), False
        if kind == "bad_batch" and position == self.at:
            return batch, True
        return batch, False

    def lr_factor(self, step: int) -> float:
        """The schedule faults: a factor on the scheduled LR of ``step`` (the optimizer step about to run)."""
        kind = self.fault.kind
        if kind == "lr_bug" and step >= self.at:
            return 30.0
        if kind == "lr_x10" and step >= self.at:
            return 10.0
        if kind == "lr_x100_once" and step == self.at and not self.fired:
            self.fired = True
            return 100.0
        if kind == "ramp":
            if step == self.at and not self.fired:
                self.fired, self.ramping = True, True
            if self.ramping:
                return 1.03 ** max(0, step - self.at)
        return 1.0

    def before_step(self, step: int, model: TinyGPT) -> bool:
        """Faults on the model at ``step``; returns whether the step's loss is poisoned with NaN."""
        kind = self.fault.kind
        if step != self.at or self.fired:
            return False
        if kind == "zeroed_head":
            self.fired = True
            with torch.no_grad():
                model.head.weight.zero_()
        elif kind == "nan_once":
            self.fired = True
            return True
        return False

    def after_backward(self, step: int, model: TinyGPT) -> None:
        if self.fault.kind == "grads_x1e4" and step == self.at and not self.fired:
            self.fired = True
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)

    def restored(self) -> None:
        """A restore: a slow divergence in progress stops (it was transient)."""
        self.ramping = False

    def crashes(self, step: int) -> bool:
        """Whether the process dies after optimizer step ``step`` (the crash fault, once)."""
        if self.fault.kind != "crash" or step != self.at or self.fired:
            return False
        self.fired = True
        return True


class Crash(Exception):
    """The training process died: nothing of it survives but /dev/shm, the disk and the daemon's journal."""

    def __init__(self, step: int) -> None:
        super().__init__(f"killed after step {step}")
        self.step = step


# ----------------------------------------------------------------------------------------------- training


@dataclass
class Setup:
    ids: torch.Tensor
    val: torch.Tensor
    vocab: int


def setup() -> Setup:
    ids, val, vocab = text_ids()
    return Setup(ids, val, vocab)


def schedule(step: int) -> float:
    """Linear warm-up to 1, then a cosine decay to 0.1 at STEPS (a factor on PEAK_LR)."""
    if step <= WARMUP:
        return max(step, 1) / WARMUP
    t = min(1.0, (step - WARMUP) / (STEPS - WARMUP))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def batch_at(data: Setup, seed: int, position: int) -> torch.Tensor:
    """The batch of a data position: the same windows every time it is trained."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    starts = torch.randint(0, len(data.ids) - CONTEXT - 1, (BATCH,), generator=g)
    return torch.stack([data.ids[s : s + CONTEXT + 1] for s in starts.tolist()])


def build(data: Setup, seed: int, injector: Injector) -> tuple[TinyGPT, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = TinyGPT(data.vocab, WIDTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    # LambdaLR's epoch is the number of steps taken: the factor of the step about to run is that + 1.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: schedule(done + 1) * injector.lr_factor(done + 1)
    )
    return model, optimizer, scheduler


def loss_of(model: TinyGPT, batch: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))


@torch.no_grad()
def val_loss(model: TinyGPT, data: Setup) -> float:
    model.eval()
    value = float(loss_of(model, data.val, data.vocab))
    model.train()
    return value


@dataclass
class RunResult:
    """What one arm's run of one (fault, seed) came to."""

    final_val: float | None  # None: it did not finish
    status: str  # "finished", "halted", "stopped"
    reason: str = ""
    steps_run: int = 0  # optimizer steps executed, discarded ones included
    steps_lost: int = 0  # steps trained and then thrown away by restores
    restores: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # the train losses, in order (stop rules read them)
    stop_step: int | None = None


@dataclass
class Trainee:
    """What one process of an arm trains: the model, its optimizer and schedule, and the fault striking it."""

    data: Setup
    seed: int
    injector: Injector
    model: TinyGPT
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @classmethod
    def new(cls, data: Setup, seed: int, injector: Injector) -> Trainee:
        """A new process's objects (the injector is the world's: it outlives a crash)."""
        return cls(data, seed, injector, *build(data, seed, injector))

    def step(self, step: int, position: int) -> torch.Tensor:
        """Optimizer step ``step`` on the batch of data position ``position``, with what the fault does to it."""
        injector, model = self.injector, self.model
        batch, poison = injector.batch(position, batch_at(self.data, self.seed, position), self.seed)
        poison = injector.before_step(step, model) or poison
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, batch, self.data.vocab)
        if poison:
            loss = loss * math.nan
        loss.backward()
        injector.after_backward(step, model)
        self.optimizer.step()
        self.scheduler.step()
        return loss


def governed_run(data: Setup, fault: Fault, seed: int, address: str, run_id: str, restart_s: float) -> RunResult:
    """The arm under test: GovernedTraining against a real daemon, the data position in extra_state. A crash
    is played in this process: the trainer is abandoned without a Finish (``close(None)``: its shared-memory
    segments stay, its stream ends, as a killed process's do; unlike one, it gets 0.5 s to hand over what it
    buffered) and a new one starts with new model, optimizer and scheduler objects, as a restarted process
    would, and adopts the last-known-good; ``restart_s`` (a process start, measured) is added to its time."""
    from tolaria_trainer import GovernedTraining, RunHalted

    injector = Injector(fault, FAULT_AT + 10 * seed, data.vocab)
    result = RunResult(None, "finished")
    started = time.perf_counter()
    crashed_at: int | None = None
    while True:  # one pass per process
        trainee = Trainee.new(data, seed, injector)
        model = trainee.model
        position = {"position": 0}
        try:
            with GovernedTraining(
                model,
                trainee.optimizer,
                governor=address,
                run_id=run_id,
                random_guess_loss=math.log(data.vocab),
                schedulers=[trainee.scheduler],
                extra_state=position,
                agree_every_steps=10,
                step_snapshot_every=25,  # an in-memory copy of a small model: cheap enough every 25 steps
                halt_wait_s=0.0,
                verdict_wait_s=10.0,
                task="fault-campaign",
            ) as gov:
                if crashed_at is not None:  # a restart: it resumes where the adopted snapshot was (or at 0)
                    result.restores += 1
                    result.steps_lost += crashed_at - gov.state.step
                while True:
                    while gov.state.step < STEPS:
                        position["position"] += gov.take_skip()
                        step = gov.state.step + 1
                        loss = trainee.step(step, position["position"])
                        position["position"] += 1
                        result.steps_run += 1
                        outcome = gov.step(loss.detach())
                        if injector.crashes(step):
                            gov.close(None)  # no Finish: the run goes on when the restart attaches
                            raise Crash(step)
                        if outcome.restored is False and step % VAL_EVERY == 0 and gov.state.step == step:
                            outcome = gov.validate(val_loss(model, data), epoch=step // VAL_EVERY)
                        if outcome.halted:
                            raise RunHalted(outcome.command.reason if outcome.command else "")
                        if outcome.restored:
                            result.restores += 1
                            result.steps_lost += step - (outcome.restored_step or 0)
                            injector.restored()
                    outcome = gov.settle()
                    if outcome.halted:
                        raise RunHalted(outcome.command.reason if outcome.command else "")
                    if not outcome.restored:
                        break
                    result.restores += 1
                    result.steps_lost += STEPS - (outcome.restored_step or 0)
                    injector.restored()
            result.final_val = val_loss(model, data)
        except Crash as crash:
            crashed_at = crash.step
            result.wall_s += restart_s
            continue
        except RunHalted as exc:
            result.status, result.reason = "halted", exc.reason
        break
    result.wall_s += time.perf_counter() - started
    return result


def plain_run(data: Setup, fault: Fault, seed: int, restart_s: float = 0.0) -> RunResult:
    """No governor: train through whatever happens (the stop-on-spike arms read its losses). A crash restarts
    it from step 0, as a launcher would with nothing to resume from (``restart_s`` for the process start)."""
    injector = Injector(fault, FAULT_AT + 10 * seed, data.vocab)
    result = RunResult(None, "finished")
    started = time.perf_counter()
    crashed = True
    while crashed:  # one pass per process
        crashed = False
        trainee = Trainee.new(data, seed, injector)
        result.losses = []
        for step in range(1, STEPS + 1):
            loss = trainee.step(step, step - 1)
            result.steps_run += 1
            result.losses.append(float(loss.detach()))
            if injector.crashes(step):
                result.steps_lost += step
                result.restores += 1
                result.wall_s += restart_s
                crashed = True
                break
            if step % VAL_EVERY == 0:
                val_loss(trainee.model, data)  # as the other arms do (the same cost)
    result.final_val = val_loss(trainee.model, data)
    result.wall_s += time.perf_counter() - started
    return result


def stop_rule_run(plain: RunResult, make_rule: Callable[[], Callable[[list[float], float], bool]]) -> RunResult:
    """A stop-on-spike rule on the ungoverned run's losses: the run stops where it fires (it never finishes)."""
    rule = make_rule()
    seen: list[float] = []
    for i, loss in enumerate(plain.losses):
        if not math.isfinite(loss) or rule(seen, loss):
            return RunResult(None, "stopped", f"stop rule at step {i + 1}", i + 1, 0, 0, plain.wall_s * (i + 1) / STEPS)
        seen.append(loss)
    return RunResult(plain.final_val, "finished", "", STEPS, 0, 0, plain.wall_s)


def process_start_s() -> float:
    """What a restart costs before it loads anything: a new Python process that imports torch (measured)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def checkpoint_run(data: Setup, fault: Fault, seed: int, folder: Path, skip: int, restart_s: float) -> RunResult:
    """Disk checkpoints every CHECKPOINT_EVERY steps; a non-finite loss or Megatron-LM's spike rule restarts
    from the last one (``restart_s`` for the process, plus the measured load), ``skip`` batches skipped after
    each restart (PaLM), at most MAX_RESTARTS times."""
    injector = Injector(fault, FAULT_AT + 10 * seed, data.vocab)
    trainee = Trainee.new(data, seed, injector)
    model, optimizer, scheduler = trainee.model, trainee.optimizer, trainee.scheduler
    path = folder / f"{fault.name}-{seed}-{skip}.pt"
    result = RunResult(None, "finished")
    started = time.perf_counter()
    position, step, seen = 0, 0, []
    restarts = 0
    extra_s = 0.0

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        state |= {"scheduler": scheduler.state_dict(), "position": position, "step": step, "seen": list(seen)}
        torch.save(state, path)

    save()
    while step < STEPS:
        step += 1
        loss = trainee.step(step, position)
        position += 1
        result.steps_run += 1
        value = float(loss.detach())
        crashed = injector.crashes(step)  # the launcher restarts it from the last checkpoint, skipping nothing
        if crashed or not math.isfinite(value) or megatron(seen, value):
            if restarts == MAX_RESTARTS:
                result.status, result.reason = "stopped", f"{MAX_RESTARTS} restarts did not get past step {step}"
                break
            restarts += 1
            loaded = time.perf_counter()
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            result.steps_lost += step - state["step"]
            position, step, seen = state["position"] + (0 if crashed else skip), state["step"], state["seen"]
            extra_s += restart_s + (time.perf_counter() - loaded)
            injector.restored()
            continue
        seen.append(value)
        if step % VAL_EVERY == 0:
            val_loss(model, data)
        if step % CHECKPOINT_EVERY == 0:
            save()
    result.restores = restarts
    if result.status == "finished":
        result.final_val = val_loss(model, data)
    result.wall_s = time.perf_counter() - started + extra_s
    return result


# ----------------------------------------------------------------------------------------------- the campaign

ARMS = (
    "governed",
    "ungoverned",
    "checkpoint + restart (Megatron-LM)",
    "checkpoint + restart + skip (PaLM)",
    "stop on spike (Lightning SpikeDetection)",
    "stop on spike (LLM Foundry KillLossSpike)",
)


@dataclass
class Campaign:
    """Every run of the campaign: results[arm][(fault, seed)]."""

    results: dict[str, dict[tuple[str, int], RunResult]]
    twins: dict[int, RunResult]
    faults: tuple[Fault, ...]
    seeds: tuple[int, ...]
    restart_s: float
    wall_s: float


def run_campaign(
    faults: tuple[Fault, ...] = FAULTS, seeds: tuple[int, ...] = SEEDS, progress: Callable[[str], None] = print
) -> Campaign:
    """Train every (fault, seed) with every arm, and the healthy runs; ``progress`` gets a line per run."""
    from governor_daemon.daemon_process import DaemonProcess

    torch.set_num_threads(1)
    data = setup()
    started = time.perf_counter()
    restart_s = process_start_s()
    results: dict[str, dict[tuple[str, int], RunResult]] = {arm: {} for arm in ARMS}
    twins: dict[int, RunResult] = {}
    # The daemon in a process of its own, as deployed (an in-process one would share the GIL with training).
    with tempfile.TemporaryDirectory() as tmp, DaemonProcess(Path(tmp) / "journal", tick_interval_s=None) as daemon:
        for fault in (HEALTHY, *faults):
            for seed in seeds:
                key = (fault.name, seed)
                plain = plain_run(data, fault, seed, restart_s)
                if fault is HEALTHY:
                    twins[seed] = plain
                results["ungoverned"][key] = plain
                results["governed"][key] = governed_run(
                    data, fault, seed, daemon.address, f"{fault.name}-{seed}", restart_s
                )
                results[ARMS[2]][key] = checkpoint_run(data, fault, seed, Path(tmp), 0, restart_s)
                results[ARMS[3]][key] = checkpoint_run(data, fault, seed, Path(tmp), PALM_SKIP, restart_s)
                results[ARMS[4]][key] = stop_rule_run(plain, lambda: lightning)
                results[ARMS[5]][key] = stop_rule_run(plain, foundry)
                governed = results["governed"][key]
                progress(
                    f"{fault.name} seed {seed}: governed {governed.status} "
                    f"{'' if governed.final_val is None else f'{governed.final_val:.4f} '}"
                    f"({governed.restores} restores, {governed.steps_lost} steps lost), "
                    f"ungoverned {plain.final_val:.4f} ({time.perf_counter() - started:.0f} s)"
                )
    return Campaign(results, twins, faults, seeds, restart_s, time.perf_counter() - started)


def outcome(result: RunResult, twin: RunResult) -> str:
    """ "saved" (within WITHIN of the twin), "halted", "stopped", or "worse" (finished worse, silently)."""
    if result.status != "finished" or result.final_val is None or twin.final_val is None:
        return result.status
    return "saved" if result.final_val <= twin.final_val * (1 + WITHIN) else "worse"


def summary(campaign: Campaign) -> dict[str, dict[str, Any]]:
    """Per arm: counts over the faulty runs, per fault kind, goodput, steps lost, false alarms on healthy runs."""
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in campaign.results.items():
        per_fault: dict[str, dict[str, int]] = {}
        lost: list[int] = []
        useful = spent = 0.0
        wall = []
        deterministic_halts = 0
        for fault in campaign.faults:
            counts = {"saved": 0, "halted": 0, "stopped": 0, "worse": 0}
            for seed in campaign.seeds:
                result = runs[(fault.name, seed)]
                twin = campaign.twins[seed]
                verdict = outcome(result, twin)
                counts[verdict] += 1
                deterministic_halts += verdict == "halted" and "deterministic" in result.reason
                spent += result.wall_s
                useful += twin.wall_s if verdict == "saved" else 0.0
                lost.append(result.steps_lost)
                if verdict == "saved" and twin.wall_s > 0:
                    wall.append(result.wall_s / twin.wall_s)
            per_fault[fault.name] = counts
        healthy = [runs[("healthy", seed)] for seed in campaign.seeds]
        false_alarms = sum(r.restores + (r.status != "finished") for r in healthy)
        totals = {k: sum(c[k] for c in per_fault.values()) for k in ("saved", "halted", "stopped", "worse")}
        out[arm] = {
            "per_fault": per_fault,
            "totals": totals,
            "deterministic_halts": deterministic_halts,
            "goodput": useful / spent if spent else 0.0,
            "steps_lost_median": statistics.median(lost) if lost else 0,
            "steps_lost_worst": max(lost) if lost else 0,
            "false_alarms": false_alarms,
            "wall_ratio": statistics.median(wall) if wall else None,
        }
    return out


def table(campaign: Campaign) -> list[str]:
    """The campaign's markdown section."""
    stats = summary(campaign)
    n = len(campaign.seeds)
    lines = [
        f"A decoder-only transformer LM ({WIDTH} wide, 2 blocks, batch {BATCH}, context {CONTEXT}) trained for {STEPS} "
        f"steps under {len(campaign.faults)} fault kinds at step {FAULT_AT} (+10 per seed), {n} seeds each, against its "
        f"healthy twin (same seed, no fault). A run is saved when its final validation loss is within {WITHIN:.0%} of "
        f"its twin's. Goodput: the healthy twins' wall time of the saved runs over the wall time the arm spent on every "
        f"faulty run (overheads, replays and restarts included). A restart costs "
        f"{campaign.restart_s:.1f} s of process start (measured) plus the checkpoint load. "
        f"{campaign.wall_s:.0f} s in all.",
        "",
        "| arm | saved | halted with a diagnosis | stopped | finished worse, silently | false alarms (healthy runs) | "
        "goodput | steps lost per fault (median / worst) | wall time vs twin (saved runs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    total = len(campaign.faults) * n
    healthy = [
        campaign.results["governed"][("healthy", seed)].wall_s / campaign.twins[seed].wall_s for seed in campaign.seeds
    ]
    for arm in ARMS:
        s = stats[arm]
        t = s["totals"]
        wall = "-" if s["wall_ratio"] is None else f"{s['wall_ratio']:.2f}"
        lines.append(
            f"| {arm} | {t['saved']}/{total} | {s['deterministic_halts']} | {t['stopped'] + t['halted'] - s['deterministic_halts']} "
            f"| {t['worse']} | {s['false_alarms']} | {s['goodput']:.2f} | {s['steps_lost_median']:g} / {s['steps_lost_worst']} | {wall} |"
        )
    lines += [
        "",
        f"On the healthy runs the governed arm took {statistics.median(healthy):.2f} x the ungoverned wall time "
        "(median; the daemon in a process of its own on the same 2 cores, snapshots every 25 steps).",
        "",
        "Per fault kind (saved / halted or stopped / finished worse, of " + str(n) + " seeds):",
        "",
    ]
    lines.append("| fault | " + " | ".join(ARMS) + " |")
    lines.append("| --- |" + " --- |" * len(ARMS))
    for fault in campaign.faults:
        cells = []
        for arm in ARMS:
            c = stats[arm]["per_fault"][fault.name]
            cells.append(f"{c['saved']} / {c['halted'] + c['stopped']} / {c['worse']}")
        lines.append(f"| {fault.name}: {fault.description} | " + " | ".join(cells) + " |")
    governed = campaign.results["governed"]
    lines += ["", "Governed runs that halted, and why:", ""]
    for (name, seed), result in sorted(governed.items()):
        if result.status == "halted":
            lines.append(f"- {name} seed {seed}: {result.reason}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="*", help="fault kinds to run (default: all)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    args = parser.parse_args(argv)
    faults = tuple(f for f in FAULTS if not args.faults or f.name in args.faults)
    campaign = run_campaign(faults, tuple(range(args.seeds)))
    print("\n".join(table(campaign)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
