"""`make corpus`, step level: a small decoder-only transformer LM trained with per-step vitals, healthy and faulty.

The model: token and position embeddings, 2 pre-norm blocks of causal self-attention and an MLP, an untied
output head without bias, on the characters of build.py's generated text with garbled sentences mixed in
(corpus_text; context 32). AdamW with a linear warm-up, then a cosine decay to a tenth of the peak, or cosine
cycles that jump back to the peak (warm restarts). Each step writes a train record (the batch loss and the
gradient norm the optimizer saw), every VAL_EVERY steps a validation record (a fixed held-out set).

Healthy runs vary seed, width and learning rate, and include very noisy small-batch runs (batch 1 and 2) and
warm restarts. Faults strike at a step inside a validation interval (10 to 40 steps past a validation), and
that step is recorded as ``onset_step``: ``lr_spike`` (LR x 100 for 20 to 50 steps), ``grad_blowup``
(gradients x 1e4 for one step before optimizer.step), ``corrupt_batches`` (CORRUPT_STEPS batches of uniformly
random tokens), ``head_collapse`` (the output head zeroed and frozen: uniform predictions) and ``nan`` (NaN
output-head weights). The onset step's own record shows the corrupt batch, the collapsed head, the NaN and the
blown-up gradient norm; an LR spike or a blown-up gradient shows in the loss from the next step on. Faults
strike normal, batch-2 and restarts runs (batch-1 runs learn too slowly to have much to lose). The split is
stratified: healthy runs alternate between the halves within each variant, and each half holds a normal run of
every fault and, over the faults, faulty batch-2 and restarts runs. Traces: step_traces/*.jsonl.gz; index:
steps_index.json.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tests.benchmarks.corpus.build import generated_text

HERE = Path(__file__).resolve().parent
TRACES = HERE / "step_traces"
INDEX = HERE / "steps_index.json"
STEPS = 800
VAL_EVERY = 50
WARMUP = 50
CONTEXT = 32
RESTART_CYCLE = 250
"""Warm restarts: cosine cycles of this many steps after the warm-up (the LR jumps back at 300 and 550)."""
CORRUPT_STEPS = 40
"""Enough random batches to make the model forget: the first clean batches after them cost most of ln(V)."""
GARBLE_EVERY = 40
FAULTS = ("lr_spike", "grad_blowup", "corrupt_batches", "head_collapse", "nan")
SEED_BASE = 500


@dataclass(frozen=True)
class StepSpec:
    """One step-level corpus run."""

    trace_id: str
    variant: str  # "normal", "batch1", "batch2" or "restarts"
    seed: int
    width: int
    batch_size: int
    lr: float
    restarts: bool
    fault: str  # "none" or one of FAULTS
    onset_step: int  # 0 without a fault
    fault_steps: int  # how many steps the fault lasts (0 without a fault; head_collapse and nan stay)
    split: str  # "tuning" or "evaluation"


VARIANTS: dict[str, list[tuple[int, int, float]]] = {
    # (width, batch size, peak LR)
    "normal": [(64, 8, 2e-3), (48, 8, 3e-3), (96, 8, 1e-3), (64, 16, 1e-3)],
    "batch1": [(64, 1, 2e-3), (64, 1, 3e-3)],
    "batch2": [(64, 2, 2e-3), (48, 2, 3e-3)],
    "restarts": [(64, 8, 2e-3), (64, 8, 3e-3)],
}
HEALTHY_RUNS = {"normal": 8, "batch1": 3, "batch2": 3, "restarts": 4}
FAULT_VARIANTS = ("normal", "normal", "batch2", "restarts")
"""Each fault's four runs; the last two swap places for every other fault, so that with the alternating split
each half holds one normal run per fault and, over the faults, faulty batch-2 and restarts runs."""


def plan() -> list[StepSpec]:
    """Healthy runs per variant, then four runs per fault; the split alternates within each group."""
    specs: list[StepSpec] = []
    seen: dict[str, int] = {}
    phase: dict[str, int] = {}
    rng = random.Random("steps")

    def add(variant: str, k: int, seed: int, fault: str, group: str) -> None:
        width, batch, lr = VARIANTS[variant][k % len(VARIANTS[variant])]
        phase.setdefault(group, len(phase) % 2)  # groups of odd size: their extra run goes to each half in turn
        count = seen.get(group, 0)
        seen[group] = count + 1
        split = "tuning" if (count + phase[group]) % 2 == 0 else "evaluation"
        onset, duration = 0, 0
        if fault != "none":
            onset = VAL_EVERY * rng.randint(6, 11) + rng.randint(10, 40)
            duration = {"lr_spike": rng.randint(20, 50), "grad_blowup": 1, "corrupt_batches": CORRUPT_STEPS}.get(
                fault, STEPS - onset + 1
            )
        name = fault if fault != "none" else "healthy"
        specs.append(
            StepSpec(
                f"s{len(specs):02d}-{variant}-{name}",
                variant,
                seed,
                width,
                batch,
                lr,
                variant == "restarts",
                fault,
                onset,
                duration,
                split,
            )
        )

    for variant, count in HEALTHY_RUNS.items():
        for k in range(count):
            add(variant, k, SEED_BASE + len(specs), "none", variant)
    for f, fault in enumerate(FAULTS):
        phase[fault] = 0  # each fault's first run (a normal one) to the tuning half, its second to evaluation
        variants = FAULT_VARIANTS if f % 2 == 0 else (*FAULT_VARIANTS[:2], *FAULT_VARIANTS[:1:-1])
        for k, variant in enumerate(variants):
            add(variant, k + f, SEED_BASE * 10 + len(specs), fault, fault)
    return specs


class Block(nn.Module):
    """Pre-norm causal self-attention (4 heads) and a 4x MLP, each with a residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Decoder-only LM: token + position embeddings, 2 blocks, a final norm and an untied head (no bias)."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h, self.mask)
        out: torch.Tensor = self.head(self.norm(h))
        return out


def lr_at(spec: StepSpec, step: int) -> float:
    """Linear warm-up to the peak, then cosine to a tenth of it: once, or in RESTART_CYCLE cycles."""
    if step <= WARMUP:
        return spec.lr * step / WARMUP
    span = RESTART_CYCLE if spec.restarts else STEPS - WARMUP
    t = ((step - WARMUP - 1) % span) / span
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def record_trace(spec: StepSpec, ids: torch.Tensor, val: torch.Tensor, vocab: int) -> list[dict[str, object]]:
    """Train one run for STEPS steps; return its train records (every step) and validation records."""
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    model = TinyGPT(vocab, spec.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    rgl = math.log(vocab)
    faulty = range(spec.onset_step, spec.onset_step + spec.fault_steps)
    records: list[dict[str, object]] = []
    for step in range(1, STEPS + 1):
        in_fault = step in faulty
        if step == spec.onset_step:
            strike(spec, model)
        lr = lr_at(spec, step) * (100 if spec.fault == "lr_spike" and in_fault else 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if spec.fault == "corrupt_batches" and in_fault:
            batch = torch.randint(0, vocab, (spec.batch_size, CONTEXT + 1), generator=generator)
        else:
            starts = torch.randint(0, len(ids) - CONTEXT - 1, (spec.batch_size,), generator=generator)
            batch = torch.stack([ids[s : s + CONTEXT + 1] for s in starts.tolist()])
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch[:, :-1]).reshape(-1, vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if spec.fault == "grad_blowup" and in_fault:
            for g in grads:
                g.mul_(1e4)
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
        optimizer.step()
        epoch = (step - 1) // VAL_EVERY + 1
        records.append(
            {
                "run_id": spec.trace_id,
                "kind": "train",
                "epoch": epoch,
                "step": step,
                "loss": _num(float(loss.detach())),
                "grad_norm": _num(grad_norm),
            }
        )
        if step % VAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model(val[:, :-1]).reshape(-1, vocab), val[:, 1:].reshape(-1)))
            records.append(
                {
                    "run_id": spec.trace_id,
                    "kind": "validation",
                    "epoch": epoch,
                    "step": step,
                    "loss": _num(val_loss),
                    "random_guess_loss": rgl,
                }
            )
    return records


def strike(spec: StepSpec, model: TinyGPT) -> None:
    """The faults that change the model itself, at the onset step (the others act in the training loop)."""
    if spec.fault == "head_collapse":
        with torch.no_grad():
            model.head.weight.zero_()
        model.head.requires_grad_(False)
    elif spec.fault == "nan":
        with torch.no_grad():
            model.head.weight.fill_(float("nan"))


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if x != x else ("inf" if x > 0 else "-inf"))


def corpus_text(length: int = 40000) -> str:
    """build.py's generated text with a garbled sentence (random letters of its own vocabulary, like names,
    codes or typos in real text) after about one sentence in GARBLE_EVERY: a window that meets one costs
    several times the usual loss, so batch-1 and batch-2 runs are really noisy, as small batches of real
    text are."""
    rng = random.Random(11)
    letters = sorted(set(generated_text()) - {" ", "."})
    out = []
    for sentence in generated_text(length=length).split(". "):
        out.append(sentence + ". ")
        if rng.random() < 1 / GARBLE_EVERY:
            words = ("".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(rng.randint(3, 6)))
            out.append(" ".join(words) + ". ")
    return "".join(out)[:length]


def text_ids() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Training ids (the first 90 % of the text), 64 fixed held-out windows, and the vocabulary size."""
    text = corpus_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    held_out = ids[cut:]
    stride = (len(held_out) - CONTEXT - 1) // 64
    val = torch.stack([held_out[i * stride : i * stride + CONTEXT + 1] for i in range(64)])
    return ids[:cut], val, len(vocab)


def main() -> int:
    """Build every run of plan() (one torch thread), write the traces and steps_index.json."""
    torch.set_num_threads(1)
    TRACES.mkdir(parents=True, exist_ok=True)
    ids, val, vocab = text_ids()
    specs = plan()
    index = []
    started = time.monotonic()
    for i, spec in enumerate(specs):
        records = record_trace(spec, ids, val, vocab)
        path = TRACES / f"{spec.trace_id}.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        index.append({**asdict(spec), "file": path.name})
        print(f"[{i + 1}/{len(specs)}] {spec.trace_id} ({time.monotonic() - started:.0f} s)", flush=True)
    INDEX.write_text(json.dumps(index, indent=1) + "\n")
    faulty = sum(1 for s in specs if s.fault != "none")
    print(
        f"{len(specs)} step-level traces ({faulty} with a fault, {len(specs) - faulty} without) "
        f"in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
