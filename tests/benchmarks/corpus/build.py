"""`make corpus`: train small real models and record traces in the replay format, healthy and faulty.

Tasks: digits (scikit-learn), a character-level language model on generated text, and a cifar-format
task (synthetic class-conditional images written as CIFAR-10 python batches). Runs vary seed, width,
optimizer and learning rate. Faults (one per faulty run, onset epoch recorded in index.json): NaN
weights, LR blow-up, dead units (output collapse), a high-LR burst (spike) and slow label noise.
Traces are gzipped JSON Lines. The split is stratified: within each (task, optimizer, fault) group the
runs alternate between the tuning half and the evaluation half, so both halves cover every configuration.
Then the step-level corpus (steps.py: a small transformer LM, faults at a step inside a validation interval).
"""

from __future__ import annotations

import gzip
import json
import math
import pickle
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.tasks import get_task

HERE = Path(__file__).resolve().parent
TRACES = HERE / "traces"
EPOCHS = 20
FAULTS = ("nan", "lr_blowup", "dead_units", "spike", "label_noise")
SEED_BASE = 200
"""Seeds of healthy runs start here, those of faulty runs at 10 x this (the first corpus used 100)."""


@dataclass(frozen=True)
class Spec:
    """One corpus run."""

    trace_id: str
    task: str
    seed: int
    width: int
    optimizer: str
    lr: float
    fault: str  # "none" or one of FAULTS
    onset_epoch: int  # 0 without a fault
    split: str  # "tuning" or "evaluation"


def generated_text(seed: int = 7, length: int = 6000) -> str:
    """Deterministic English-like text from a small grammar (no download, no bundled file)."""
    rng = random.Random(seed)
    subjects = ["the model", "a network", "the trainer", "each seed", "the governor", "our host", "the loss"]
    verbs = ["learns", "grows", "watches", "restores", "measures", "blends", "reports", "keeps"]
    objects = ["the weights", "a snapshot", "its gradients", "the history", "every step", "the journal", "a verdict"]
    tails = ["quickly", "again", "at night", "with care", "in memory", "before dawn", "without fail"]
    parts = []
    while sum(len(p) for p in parts) < length:
        parts.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}. ")
    return "".join(parts)[:length]


def write_cifar_like(folder: Path, seed: int = 3) -> None:
    """Class-conditional 32x32 colour patterns with noise, in the CIFAR-10 python batch format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prototypes = rng.integers(0, 256, (10, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    for name, count in (("data_batch_1", 640), ("test_batch", 320)):
        labels = rng.integers(0, 10, count)
        images = prototypes[labels] + rng.normal(0, 70, (count, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(count, 3072)
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": [int(x) for x in labels]}, f)


def plan() -> list[Spec]:
    """The corpus: per task, healthy runs over the hyper-parameter grid and seeds, and runs with each fault."""
    grid = {
        "digits": [(w, o, lr) for w in (32, 64, 128) for o, lr in (("adam", 1e-3), ("adam", 3e-3), ("sgd", 0.05))],
        "tinylm": [(w, o, lr) for w in (64, 128) for o, lr in (("adam", 2e-3), ("sgd", 0.1))],
        "cifar10": [(w, o, lr) for w in (32, 64) for o, lr in (("adam", 1e-3), ("sgd", 0.05))],
    }
    healthy_runs = {"digits": 27, "tinylm": 20, "cifar10": 20}
    runs_per_fault = {"digits": 7, "tinylm": 3, "cifar10": 3}
    specs: list[Spec] = []
    seen: dict[tuple[str, str, str], int] = {}
    phase: dict[tuple[str, str, str], int] = {}

    def add(task: str, seed: int, variant: tuple[int, str, float], fault: str, onset: int) -> None:
        width, optimizer, lr = variant
        group = (task, optimizer, fault)
        if group not in seen:  # groups of odd size: their extra run goes to each half in turn
            phase[group] = len(seen) % 2
        split = "tuning" if (seen.get(group, 0) + phase[group]) % 2 == 0 else "evaluation"
        seen[group] = seen.get(group, 0) + 1
        specs.append(
            Spec(
                f"{len(specs):03d}-{task}-{fault if fault != 'none' else 'healthy'}",
                task,
                seed,
                width,
                optimizer,
                lr,
                fault,
                onset,
                split,
            )
        )

    for task, variants in grid.items():
        rng = random.Random(task)
        for k in range(healthy_runs[task]):
            add(task, SEED_BASE + k, variants[k % len(variants)], "none", 0)
        for f, fault in enumerate(FAULTS):
            for k in range(runs_per_fault[task]):
                add(task, SEED_BASE * 10 + 10 * k + f, variants[(k + f) % len(variants)], fault, rng.randint(11, 15))
    return specs


def build_model(task: str, num_outputs: int, width: int) -> MorphogeneticModel:
    spec = get_task(task)
    encoder, dim = spec.build_encoder(num_outputs)
    return MorphogeneticModel(encoder, dim, width, num_outputs, num_blocks=2)


def record_trace(spec: Spec, data_dir: Path) -> list[dict[str, object]]:
    """Train one run (EPOCHS epochs) and return its records: per-step train and per-epoch validation."""
    torch.manual_seed(spec.seed)
    task = get_task(spec.task)
    generator = torch.Generator().manual_seed(spec.seed)
    data = task.load(data_dir if spec.task != "digits" else None, 32, generator)
    model = build_model(spec.task, data.num_outputs, spec.width)
    if spec.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    rgl = math.log(data.num_outputs)
    facts = {"num_classes": data.num_outputs} if not task.is_language_model else {"random_guess_loss": rgl}
    records: list[dict[str, object]] = []
    train_x, train_y = (torch.stack(t) for t in zip(*[(x, y) for x, y in data.train.dataset], strict=True))
    noisy = train_y.clone()
    step = 0
    base_lr = spec.lr
    for epoch in range(1, EPOCHS + 1):
        if spec.fault != "none" and epoch >= spec.onset_epoch:
            apply_fault(spec, epoch, model, optimizer, base_lr, noisy, data.num_outputs, generator)
        elif spec.fault == "spike" and epoch > spec.onset_epoch:
            set_lr(optimizer, base_lr)
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(train_x[idx]), noisy[idx])
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            optimizer.step()
            step += 1
            records.append(
                {
                    "run_id": spec.trace_id,
                    "kind": "train",
                    "epoch": epoch,
                    "step": step,
                    "loss": _num(float(loss)),
                    "grad_norm": _num(grad_norm),
                }
            )
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in data.val:
                total += float(loss_fn(model(x), y)) * len(y)
                count += len(y)
        records.append(
            {
                "run_id": spec.trace_id,
                "kind": "validation",
                "epoch": epoch,
                "step": step,
                "loss": _num(total / count),
                **facts,
            }
        )
    return records


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_fault(
    spec: Spec,
    epoch: int,
    model: MorphogeneticModel,
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    labels: torch.Tensor,
    num_outputs: int,
    generator: torch.Generator,
) -> None:
    first = epoch == spec.onset_epoch
    if spec.fault == "nan" and first:
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))
    elif spec.fault == "lr_blowup" and first:
        set_lr(optimizer, base_lr * 300)
    elif spec.fault == "dead_units" and first:
        last = model.blocks[-1][0]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(-1.0)  # every unit of the last block dead (ReLU of a negative constant)
        last.requires_grad_(False)
    elif spec.fault == "spike":
        set_lr(optimizer, base_lr * 30 if first else base_lr)
    elif spec.fault == "label_noise":  # 4 % more of the training labels replaced each epoch
        flip = torch.rand(len(labels), generator=generator) < 0.04
        labels[flip] = torch.randint(0, num_outputs, (int(flip.sum()),), generator=generator)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


def main() -> int:
    TRACES.mkdir(parents=True, exist_ok=True)
    specs = plan()
    index = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        (data_dir / "input.txt").write_text(generated_text())
        write_cifar_like(data_dir / "cifar-10-batches-py")
        for i, spec in enumerate(specs):
            records = record_trace(spec, data_dir)
            path = TRACES / f"{spec.trace_id}.jsonl.gz"
            with gzip.open(path, "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            index.append({**asdict(spec), "file": path.name})
            print(f"[{i + 1}/{len(specs)}] {spec.trace_id} ({time.monotonic() - started:.0f} s)", flush=True)
    (HERE / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    faulty = sum(1 for s in specs if s.fault != "none")
    print(
        f"{len(specs)} traces ({faulty} with a fault, {len(specs) - faulty} without) in {time.monotonic() - started:.0f} s"
    )
    from tests.benchmarks.corpus import steps  # it reads this module's generated_text

    return steps.main()


if __name__ == "__main__":
    sys.exit(main())
