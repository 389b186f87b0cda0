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

Every train record also carries ``lr``, the learning rate the optimizer used at that step (the schedule times
any fault's factor). After those runs (drawn after them, so that they stay as they were) come four runs of
each of NEW_KINDS, the regimes a held-out evaluation found the train-stream detectors blind to:
``early_lr_spike`` and ``early_corrupt`` (an LR spike or corrupt batches as above, with the onset in the
first 200 steps: EARLY_ONSETS), ``lr_x10`` (the LR times LR_X10_FACTOR from the onset to the end: a schedule
bug), ``lr_ramp`` (the LR times LR_RAMP_GROWTH ** (steps since onset + 1) to the end: the loss creeps up,
then explodes), ``easy_stretch`` (EASY_STEPS trivially easy batches from ``easy_start``, then normal data
again: no fault, its spec has onset_step 0) and ``easy_then_spike`` (an easy stretch, then within
SPIKE_AFTER_EASY steps of normal data an LR spike, whose first step is the onset_step). Easy batches are
``easy_data`` "repeat" (every sequence one character repeated) or "memorize" (the stretch's first batch of
text, again and again), each half holding both. lr_x10 has EXTRA_RUNS.

``model`` tells the two model families apart (``variant`` keeps naming batch size, LR and schedule):
"tinygpt", the model above on characters, and "gpt2bytes", transformers' GPT2LMHeadModel (GPT2Bytes) on the
UTF-8 bytes of the same text (vocabulary 256, so RGL ln 256), with the same optimizer, schedule and faults
but its own batch sizes and LRs (GPT2_VARIANTS): GPT2_HEALTHY runs without a fault, one run of each of
FAULTS and two of each of NEW_KINDS (one per half). Its trace ids read ``sNN-gpt2bytes-<variant>-<kind>``.

``python -m tests.benchmarks.corpus.steps`` builds every trace (one torch thread; `make corpus` runs it
after build.py); ``--missing`` builds only those whose file is missing. Both write the whole index.
"""

from __future__ import annotations

import argparse
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
NEW_KINDS = ("early_lr_spike", "early_corrupt", "lr_x10", "lr_ramp", "easy_stretch", "easy_then_spike")
"""The regimes added after FAULTS (their runs come after FAULTS' in plan(), so the old runs stay as they were).
easy_stretch is no fault: its spec has fault "easy_stretch", onset_step 0 and fault_steps 0."""
KINDS = FAULTS + NEW_KINDS
SEED_BASE = 500
SPIKE = 100
"""An LR spike's factor (lr_spike, early_lr_spike, easy_then_spike)."""
EARLY_ONSETS = {"tinygpt": (110, 160), "gpt2bytes": (60, 160)}
"""early_*: the onset step, drawn in this range: past the warm-up, while the loss still falls fast (TinyGPT's
train loss is above 0.6 x RGL, not yet learning by the labels, until about step 110)."""
LR_X10_FACTOR = {
    ("tinygpt", "normal"): 10.0,
    ("tinygpt", "restarts"): 10.0,
    ("tinygpt", "batch2"): 15.0,
    ("gpt2bytes", "normal"): 30.0,
    ("gpt2bytes", "batch2"): 30.0,
}
"""lr_x10's factor per model and variant. A persistent LR x k raises the loss moderately for hundreds of steps
only in noisy runs: TinyGPT batch 2 (x 15: about 1.5-2 x the pre-onset level, still 1.1-1.4 x after 200 steps)
and gpt2bytes with its dropout (x 30: 1.5-1.9 x to the end). A clean TinyGPT run (batch 8 or 16) is bistable:
x 5 to x 12 give a bump (1.3-3.4 x for 25-50 steps), then the loss follows the healthy curve; from x 13 on it
catapults to 4-6 x and relearns over 200-300 steps; so x 10 there (the bug as named), whose bump is all."""
LR_RAMP_GROWTH = 1.02
"""lr_ramp: the LR factor grows by this much per step from the onset (x 52 after 200 steps)."""
EASY_STEPS = (100, 200)
"""easy_stretch, easy_then_spike: how many easy batches, drawn in this range."""
SPIKE_AFTER_EASY = (20, 60)
"""easy_then_spike: the spike strikes after this many steps of normal data (drawn) past the easy stretch."""
EXTRA_RUNS = {"lr_x10": ("batch2", "batch2")}
"""Runs of a kind beyond its four (after them): lr_x10 raises TinyGPT's loss moderately and persistently only in
batch-2 runs (LR_X10_FACTOR)."""
GPT2_WIDTH = 64
GPT2_VARIANTS: dict[str, list[tuple[int, float]]] = {
    # (batch size, peak LR): at a peak LR of 2e-3 or more, GPT-2 sits on the unigram plateau (loss about 2.85)
    # for hundreds of steps, some seeds for the whole run; at 1e-3 it learns steadily
    "normal": [(8, 1e-3), (16, 1e-3)],
    "batch2": [(2, 1e-3)],
    "restarts": [(8, 1e-3), (16, 1e-3)],
}
GPT2_HEALTHY = ("normal", "normal", "batch2", "batch2", "restarts", "restarts")
GPT2_NEW_VARIANTS = {
    "early_lr_spike": ("normal", "batch2"),
    "early_corrupt": ("normal", "restarts"),
    "lr_x10": ("normal", "batch2"),
    "lr_ramp": ("normal", "batch2"),
    "easy_stretch": ("normal", "batch2"),
    "easy_then_spike": ("normal", "restarts"),
}
"""gpt2bytes: the variants of the two runs of each kind of NEW_KINDS."""


@dataclass(frozen=True)
class StepSpec:
    """One step-level corpus run."""

    trace_id: str
    variant: str  # "normal", "batch1", "batch2" or "restarts" (batch size, LR, schedule: VARIANTS, GPT2_VARIANTS)
    seed: int
    width: int
    batch_size: int
    lr: float
    restarts: bool
    fault: str  # "none" or one of KINDS ("easy_stretch" is no fault: onset_step and fault_steps 0)
    onset_step: int  # the fault's first step; 0 without a fault
    fault_steps: int  # how many steps the fault lasts (0 without a fault; head_collapse, nan, lr_x10, lr_ramp stay)
    split: str  # "tuning" or "evaluation"
    model: str = "tinygpt"  # "tinygpt" (TinyGPT on characters) or "gpt2bytes" (GPT2LMHeadModel on UTF-8 bytes)
    easy_start: int = 0  # easy_stretch, easy_then_spike: the first easy batch's step (0: none)
    easy_steps: int = 0  # how many easy batches
    easy_data: str = ""  # "repeat" (each sequence one character repeated) or "memorize" (one batch, again and again)
    lr_factor: float = 1.0  # lr_x10: the LR factor from the onset on; lr_ramp: the factor's growth per step


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
    """Healthy runs per variant, then four runs per fault; the split alternates within each group. Then (drawn
    after them, so the runs before stay as they were) four runs per kind of NEW_KINDS, and the gpt2bytes runs:
    GPT2_HEALTHY, one run per fault and two per kind of NEW_KINDS (one per half)."""
    specs: list[StepSpec] = []
    seen: dict[str, int] = {}
    phase: dict[str, int] = {}
    rng = random.Random("steps")

    def add(variant: str, k: int, seed: int, fault: str, group: str, model: str = "tinygpt") -> None:
        width, batch, lr = VARIANTS[variant][k % len(VARIANTS[variant])]
        if model == "gpt2bytes":
            width, (batch, lr) = GPT2_WIDTH, GPT2_VARIANTS[variant][k % len(GPT2_VARIANTS[variant])]
        phase.setdefault(group, len(phase) % 2)  # groups of odd size: their extra run goes to each half in turn
        count = seen.get(group, 0)
        seen[group] = count + 1
        split = "tuning" if (count + phase[group]) % 2 == 0 else "evaluation"
        onset, duration = 0, 0
        easy_start, easy_steps, easy_data, lr_factor = 0, 0, "", 1.0
        if fault in FAULTS:
            onset = VAL_EVERY * rng.randint(6, 11) + rng.randint(10, 40)
            duration = {"lr_spike": rng.randint(20, 50), "grad_blowup": 1, "corrupt_batches": CORRUPT_STEPS}.get(
                fault, STEPS - onset + 1
            )
        elif fault in ("early_lr_spike", "early_corrupt"):
            onset = rng.randint(*EARLY_ONSETS[model])
            duration = rng.randint(20, 50) if fault == "early_lr_spike" else CORRUPT_STEPS
        elif fault in ("lr_x10", "lr_ramp"):
            onset = VAL_EVERY * rng.randint(4, 8) + rng.randint(10, 40)
            duration = STEPS - onset + 1
            lr_factor = LR_RAMP_GROWTH if fault == "lr_ramp" else LR_X10_FACTOR[model, variant]
        elif fault in ("easy_stretch", "easy_then_spike"):
            easy_start = VAL_EVERY * rng.randint(4, 8 if fault == "easy_stretch" else 6) + rng.randint(10, 40)
            easy_steps = rng.randint(*EASY_STEPS)
            # TinyGPT's four runs: repeat, repeat, memorize, memorize (one of each per half); gpt2bytes's two: one each
            easy_data = ("repeat", "memorize")[(count // 2 if model == "tinygpt" else count) % 2]
            if fault == "easy_then_spike":
                onset = easy_start + easy_steps + rng.randint(*SPIKE_AFTER_EASY)
                duration = rng.randint(20, 50)
        name = fault if fault != "none" else "healthy"
        tag = variant if model == "tinygpt" else f"{model}-{variant}"
        specs.append(
            StepSpec(
                f"s{len(specs):02d}-{tag}-{name}",
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
                model,
                easy_start,
                easy_steps,
                easy_data,
                lr_factor,
            )
        )

    for variant, count in HEALTHY_RUNS.items():
        for k in range(count):
            add(variant, k, SEED_BASE + len(specs), "none", variant)
    for f, fault in enumerate(KINDS):
        phase[fault] = 0  # each fault's first run (a normal one) to the tuning half, its second to evaluation
        variants = FAULT_VARIANTS if f % 2 == 0 else (*FAULT_VARIANTS[:2], *FAULT_VARIANTS[:1:-1])
        for k, variant in enumerate((*variants, *EXTRA_RUNS.get(fault, ()))):
            add(variant, k + f, SEED_BASE * 10 + len(specs), fault, fault)
    for k, variant in enumerate(GPT2_HEALTHY):
        phase[f"gpt2bytes-{variant}"] = 0
        add(variant, k, SEED_BASE + len(specs), "none", f"gpt2bytes-{variant}", "gpt2bytes")
    phase["gpt2bytes-faults"] = 0
    for f, fault in enumerate(FAULTS):
        add(FAULT_VARIANTS[f % 4], f, SEED_BASE * 10 + len(specs), fault, "gpt2bytes-faults", "gpt2bytes")
    for f, fault in enumerate(NEW_KINDS):
        phase[f"gpt2bytes-{fault}"] = f % 2
        for k, variant in enumerate(GPT2_NEW_VARIANTS[fault]):
            add(variant, 2 * f + k + 2, SEED_BASE * 10 + len(specs), fault, f"gpt2bytes-{fault}", "gpt2bytes")
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


class GPT2Bytes(nn.Module):
    """transformers' GPT2LMHeadModel (2 layers, 4 heads, width GPT2_WIDTH, context CONTEXT, 256 byte tokens;
    GPT2Config's defaults otherwise: dropout 0.1, the output head tied to the token embedding), built from its
    config (nothing downloaded); forward gives the logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=GPT2_WIDTH,
            n_positions=CONTEXT,
            vocab_size=256,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.gpt = GPT2LMHeadModel(config)

    @property
    def head(self) -> nn.Linear:
        head: nn.Linear = self.gpt.lm_head
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gpt(input_ids=x).logits
        return out


def make_model(spec: StepSpec, vocab: int) -> TinyGPT | GPT2Bytes:
    return GPT2Bytes() if spec.model == "gpt2bytes" else TinyGPT(vocab, spec.width)


def lr_at(spec: StepSpec, step: int) -> float:
    """Linear warm-up to the peak, then cosine to a tenth of it: once, or in RESTART_CYCLE cycles."""
    if step <= WARMUP:
        return spec.lr * step / WARMUP
    span = RESTART_CYCLE if spec.restarts else STEPS - WARMUP
    t = ((step - WARMUP - 1) % span) / span
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def fault_lr_factor(spec: StepSpec, step: int) -> float:
    """The factor a fault puts on the scheduled LR at a step: SPIKE during an LR spike, lr_factor from lr_x10's
    onset on, lr_factor ** (steps since lr_ramp's onset + 1) from its onset on; 1 otherwise."""
    if not spec.onset_step <= step < spec.onset_step + spec.fault_steps:
        return 1.0
    if spec.fault in ("lr_spike", "early_lr_spike", "easy_then_spike"):
        return SPIKE
    if spec.fault == "lr_x10":
        return spec.lr_factor
    if spec.fault == "lr_ramp":
        return float(spec.lr_factor ** (step - spec.onset_step + 1))
    return 1.0


def record_trace(spec: StepSpec, ids: torch.Tensor, val: torch.Tensor, vocab: int) -> list[dict[str, object]]:
    """Train one run for STEPS steps; return its train records (every step) and validation records."""
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    model = make_model(spec, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    rgl = math.log(vocab)
    faulty = range(spec.onset_step, spec.onset_step + spec.fault_steps)
    easy = range(spec.easy_start, spec.easy_start + spec.easy_steps)
    alphabet = ids.unique()
    memorized: torch.Tensor | None = None
    records: list[dict[str, object]] = []
    for step in range(1, STEPS + 1):
        in_fault = step in faulty
        if step == spec.onset_step:
            strike(spec, model)
        lr = lr_at(spec, step) * fault_lr_factor(spec, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if spec.fault in ("corrupt_batches", "early_corrupt") and in_fault:
            batch = torch.randint(0, vocab, (spec.batch_size, CONTEXT + 1), generator=generator)
        elif step in easy and spec.easy_data == "repeat":
            chars = alphabet[torch.randint(0, len(alphabet), (spec.batch_size, 1), generator=generator)]
            batch = chars.expand(spec.batch_size, CONTEXT + 1)
        else:
            if memorized is not None and step in easy:
                batch = memorized
            else:
                starts = torch.randint(0, len(ids) - CONTEXT - 1, (spec.batch_size,), generator=generator)
                batch = torch.stack([ids[s : s + CONTEXT + 1] for s in starts.tolist()])
                if step in easy:
                    memorized = batch
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
                "lr": lr,
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


def strike(spec: StepSpec, model: TinyGPT | GPT2Bytes) -> None:
    """The faults that change the model itself, at the onset step (the others act in the training loop).
    GPT2Bytes ties its head to the token embedding: zeroing or NaN-filling the head does both."""
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


def text_ids(model: str = "tinygpt") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Training ids (the first 90 % of the text), 64 fixed held-out windows, and the vocabulary size: the
    text's characters (tinygpt) or its UTF-8 bytes, a vocabulary of 256 (gpt2bytes)."""
    text = corpus_text()
    if model == "gpt2bytes":
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        vocab_size = 256
    else:
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        vocab_size = len(vocab)
    cut = int(0.9 * len(ids))
    held_out = ids[cut:]
    stride = (len(held_out) - CONTEXT - 1) // 64
    val = torch.stack([held_out[i * stride : i * stride + CONTEXT + 1] for i in range(64)])
    return ids[:cut], val, vocab_size


def trace_path(spec: StepSpec) -> Path:
    return TRACES / f"{spec.trace_id}.jsonl.gz"


def main(argv: list[str] | None = None) -> int:
    """Build every run of plan() (one torch thread), or with --missing only those whose trace file is missing;
    write the traces and steps_index.json (every run of plan())."""
    parser = argparse.ArgumentParser(description="Build the step-level corpus (step_traces/, steps_index.json).")
    parser.add_argument("--missing", action="store_true", help="build only the traces whose file is missing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    TRACES.mkdir(parents=True, exist_ok=True)
    data = {model: text_ids(model) for model in ("tinygpt", "gpt2bytes")}
    specs = plan()
    todo = [spec for spec in specs if not (args.missing and trace_path(spec).exists())]
    started = time.monotonic()
    for i, spec in enumerate(todo):
        began = time.monotonic()
        records = record_trace(spec, *data[spec.model])
        with gzip.open(trace_path(spec), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(
            f"[{i + 1}/{len(todo)}] {spec.trace_id} {time.monotonic() - began:.1f} s "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    INDEX.write_text(json.dumps([{**asdict(spec), "file": trace_path(spec).name} for spec in specs], indent=1) + "\n")
    faulty = sum(1 for s in specs if s.fault not in ("none", "easy_stretch"))
    print(
        f"{len(specs)} step-level traces ({faulty} with a fault, {len(specs) - faulty} without), "
        f"{len(todo)} built in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
