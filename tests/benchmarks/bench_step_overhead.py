"""What governance costs the training thread per step: ``time.thread_time`` and wall time per optimizer
step of one loop in three arms, interleaved in one process:

- ``bare``: the loop alone (it computes its gradient norm, as a loop that clips does);
- ``ungoverned``: the same loop through ``GovernedTraining(governor=None)`` (vitals recorded, dropped);
- ``governed``: through ``GovernedTraining`` attached to ``governor serve`` in a separate process.

Every step of every arm passes the same precomputed gradient norm, so the arms differ only in what
governance adds. Blocks of ``block`` steps rotate through the arms (the order reversing every round),
so drift of the machine's speed cancels; the governed arm's sender thread (serialization, gRPC) runs
beside the training thread and is counted in the process CPU column, never in the thread column.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from governor_daemon.daemon_process import DaemonProcess
from tolaria_trainer import GovernedTraining

ARMS = ("bare", "ungoverned", "governed")


class _Loop:
    """The one model, optimizer and batch every arm trains (separate instances per arm would measure their
    memory placement as much as governance); an arm differs only in the GovernedTraining it steps, if any."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(64, 64)
        self.y = self.x[:, :10].argmax(dim=1)

    def governed(self, address: str | None, arm: str) -> GovernedTraining:
        gov = GovernedTraining(
            self.model, self.optimizer, governor=address, run_id=f"overhead-{arm}", num_classes=10, agree_every_steps=50
        )
        gov.start()
        return gov

    def steps(self, n: int, gov: GovernedTraining | None) -> None:
        model, optimizer, x, y = self.model, self.optimizer, self.x, self.y
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1e3)
            optimizer.step()
            if gov is not None:
                gov.step(loss, grad_norm)


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(rounds: int = 15, block: int = 200) -> dict[str, Any]:
    """Per-step medians per arm (thread CPU µs, wall µs, process CPU µs) and the governed/bare and
    governed/ungoverned ratios of the per-round thread times with their spread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    per_step: dict[str, dict[str, list[float]]] = {arm: {"thread": [], "wall": [], "process": []} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data")
        loop = _Loop()
        govs = {"bare": None, "ungoverned": loop.governed(None, "ungoverned"), "governed": None}
        try:
            govs["governed"] = loop.governed(daemon.address, "governed")
            for arm in ARMS:
                loop.steps(block, govs[arm])  # warm-up
            for i in range(rounds):
                for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                    t0, w0, p0 = time.thread_time(), time.perf_counter(), _process_cpu_s()
                    loop.steps(block, govs[arm])
                    per_step[arm]["thread"].append((time.thread_time() - t0) / block * 1e6)
                    per_step[arm]["wall"].append((time.perf_counter() - w0) / block * 1e6)
                    per_step[arm]["process"].append((_process_cpu_s() - p0) / block * 1e6)
        finally:
            for gov in govs.values():
                if gov is not None:
                    gov.close(None)
            daemon.terminate()
            torch.set_num_threads(threads)

    def ratios(a: str, b: str, what: str) -> dict[str, float]:
        values = [x / y for x, y in zip(per_step[a][what], per_step[b][what], strict=True)]
        q1, median, q3 = statistics.quantiles(values, n=4)
        return {"median": median, "q1": q1, "q3": q3}

    return {
        "medians_us": {arm: {k: statistics.median(v) for k, v in per_step[arm].items()} for arm in ARMS},
        "thread_governed_vs_bare": ratios("governed", "bare", "thread"),
        "thread_governed_vs_ungoverned": ratios("governed", "ungoverned", "thread"),
        "wall_governed_vs_bare": ratios("governed", "bare", "wall"),
        "process_governed_vs_bare": ratios("governed", "bare", "process"),
        "rounds": rounds,
        "block": block,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
