"""Snapshot and restore bandwidth of LastKnownGood for >= 100 MB of model + Adam state, against a raw
copy_ of the same bytes into preallocated buffers, and the naive clone() of the state dict."""

from __future__ import annotations

import torch
from torch import nn

from tests.benchmarks.common import best_of
from tolaria_trainer.model.host import MorphogeneticModel
from tolaria_trainer.snapshot import LastKnownGood
from tolaria_trainer.training import TrainingState, adam


def big_state(device: torch.device) -> TrainingState:
    """About 8.3 M parameters plus Adam's two moments: 100.1 MB of tensors in all."""
    model = MorphogeneticModel(nn.Flatten(), 1024, 2048, 1000, num_blocks=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = TrainingState(model, [optimizer], device, adam(1e-3))
    loss = model(torch.randn(8, 1024, device=device)).sum()
    loss.backward()
    optimizer.step()  # Adam state exists
    return state


def tensors_of(state: TrainingState) -> list[torch.Tensor]:
    out = list(state.model.state_dict().values())
    for s in state.host_optimizer.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def run(location: str = "host") -> dict[str, float]:
    """Bandwidths in GB/s and ratios to raw copy_."""
    device = torch.device("cuda" if location in ("pinned", "device") else "cpu")
    state = big_state(device)
    sources = tensors_of(state)
    nbytes = sum(t.numel() * t.element_size() for t in sources)
    pin = location == "pinned"
    targets = [
        torch.empty(t.shape, dtype=t.dtype, device=device if location == "device" else "cpu", pin_memory=pin)
        for t in sources
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def raw_copy() -> None:
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src, non_blocking=device.type == "cuda")
        sync()

    def naive_clone() -> None:
        snapshot = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        opt = {
            k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
            for k, s in state.host_optimizer.state_dict()["state"].items()
        }
        del snapshot, opt
        sync()

    lkg = LastKnownGood(location)
    lkg.take(state)

    def snapshot() -> None:
        lkg.take(state)
        sync()

    def restore() -> None:
        lkg.restore(state)
        sync()

    raw = best_of(raw_copy)
    results = {"bytes": float(nbytes), "raw_gbps": nbytes / raw / 1e9}
    for name, fn in (("snapshot", snapshot), ("restore", restore), ("naive_clone", naive_clone)):
        seconds = best_of(fn)
        results[f"{name}_gbps"] = nbytes / seconds / 1e9
        results[f"{name}_ratio"] = raw / seconds
    return results


if __name__ == "__main__":
    print(run())
