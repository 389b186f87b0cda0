"""The built-in tasks: digits, synthetic, cifar10 and tinylm."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from tolaria_trainer.errors import TaskError
from tolaria_trainer.tasks.spec import TaskData, TaskSpec, make_loaders

# ----------------------------------------------------------------------------- digits


def _load_digits(data_dir: Path | None, batch_size: int, generator: torch.Generator) -> TaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed split
    cut = int(0.8 * len(x))
    train_idx, val_idx = order[:cut], order[cut:]
    train, val = make_loaders(x[train_idx], y[train_idx], x[val_idx], y[val_idx], batch_size, generator)
    return TaskData(train, val, 10, f"digits: {cut} train / {len(x) - cut} validation 8x8 images")


def _flat_encoder(dim: int) -> tuple[nn.Module, int]:
    return nn.Flatten(), dim


DIGITS = TaskSpec(
    "digits",
    "handwritten digits bundled with scikit-learn (8x8, 10 classes)",
    10,
    False,
    _load_digits,
    lambda _n: _flat_encoder(64),
)

# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_DIM, SYNTHETIC_CLASSES = 16, 4


def _load_synthetic(data_dir: Path | None, batch_size: int, generator: torch.Generator) -> TaskData:
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(SYNTHETIC_CLASSES, SYNTHETIC_DIM, generator=g) * 2.0
    labels = torch.randint(0, SYNTHETIC_CLASSES, (1280,), generator=g)
    x = centers[labels] + torch.randn(len(labels), SYNTHETIC_DIM, generator=g)
    train, val = make_loaders(x[:1024], labels[:1024], x[1024:], labels[1024:], batch_size, generator)
    return TaskData(train, val, SYNTHETIC_CLASSES, "synthetic: 4 Gaussian blobs in 16 dimensions")


SYNTHETIC = TaskSpec(
    "synthetic",
    "Gaussian blobs (fast, for tests)",
    SYNTHETIC_CLASSES,
    False,
    _load_synthetic,
    lambda _n: _flat_encoder(SYNTHETIC_DIM),
    hidden_dim=32,
)

# ----------------------------------------------------------------------------- cifar10

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise TaskError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise TaskError(f"{path} is not a CIFAR-10 python batch (needs b'data' and b'labels')")
    x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32).float() / 255.0
    return x, torch.as_tensor(labels, dtype=torch.long)


def _load_cifar10(data_dir: Path | None, batch_size: int, generator: torch.Generator) -> TaskData:
    if data_dir is None:
        raise TaskError("cifar10 needs --data-dir pointing at the extracted cifar-10-batches-py folder")
    folder = data_dir / "cifar-10-batches-py" if (data_dir / "cifar-10-batches-py").is_dir() else data_dir
    present = [folder / n for n in CIFAR_TRAIN_FILES if (folder / n).exists()]
    if not present or not (folder / "test_batch").exists():
        raise TaskError(
            f"no CIFAR-10 python batches in {folder}: expected data_batch_1..5 and test_batch "
            "(the 'CIFAR-10 python version' archive, extracted)"
        )
    parts = [_read_cifar_batch(p) for p in present]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_val, y_val = _read_cifar_batch(folder / "test_batch")
    train, val = make_loaders(x_train, y_train, x_val, y_val, batch_size, generator)
    return TaskData(train, val, 10, f"cifar10: {len(x_train)} train / {len(x_val)} test images from {folder}")


def _conv_encoder(_num_outputs: int) -> tuple[nn.Module, int]:
    encoder = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
    )
    return encoder, 32 * 4 * 4


CIFAR10 = TaskSpec(
    "cifar10", "CIFAR-10 from the standard python batches in --data-dir", 10, False, _load_cifar10, _conv_encoder
)

# ----------------------------------------------------------------------------- tinylm

CONTEXT = 32
EMBED = 16


def _load_tinylm(data_dir: Path | None, batch_size: int, generator: torch.Generator) -> TaskData:
    if data_dir is None:
        raise TaskError("tinylm needs --data-dir: a text file, or a folder holding input.txt")
    path = data_dir / "input.txt" if data_dir.is_dir() else data_dir
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read the tinylm text {path}: {exc}") from None
    if len(text) < 4 * CONTEXT:
        raise TaskError(f"{path} holds {len(text)} characters; tinylm needs at least {4 * CONTEXT}")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    windows = ids.unfold(0, CONTEXT + 1, 1)
    x, y = windows[:, :CONTEXT], windows[:, CONTEXT]
    cut = int(0.9 * len(x))
    train, val = make_loaders(x[:cut], y[:cut], x[cut:], y[cut:], batch_size, generator)
    return TaskData(train, val, len(vocab), f"tinylm: {len(text)} characters, vocabulary {len(vocab)}, from {path}")


class _CharEncoder(nn.Module):
    """Embeds a window of character ids and flattens it."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embed(x).flatten(1)
        return out


TINYLM = TaskSpec(
    "tinylm",
    "character-level language model on a local text file",
    256,
    True,
    _load_tinylm,
    lambda vocab: (_CharEncoder(vocab), CONTEXT * EMBED),
)

TASKS: dict[str, TaskSpec] = {t.name: t for t in (DIGITS, SYNTHETIC, CIFAR10, TINYLM)}
