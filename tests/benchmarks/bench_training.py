"""Training overhead: steps/s on digits (CPU) with the governor attached (per-step vitals) over steps/s
with none. Runs are interleaved; the daemon is a separate process, as in production."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from governor_daemon.daemon_process import DaemonProcess
from tolaria_trainer.loop import GovernedRun, RunConfig


def steps_per_second(address: str | None, epochs: int, run_id: str) -> float:
    """Steps/s between the first and the last epoch of one run (start-up and shutdown excluded)."""
    marks: list[tuple[float, int]] = []

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "epoch":
            marks.append((time.perf_counter(), int(event["step"])))

    cfg = RunConfig(task="digits", epochs=epochs, governor=address, run_id=run_id, verdict_wait_s=5.0)
    GovernedRun(cfg, progress).run()
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0)


def run(epochs: int = 10, pairs: int = 12) -> dict[str, float]:
    """Steps/s of each arm (medians) and the median of the per-pair ratios, with their spread.

    Each pair runs both arms back to back, the order alternating (ABBA), so drift of the machine's speed
    over the benchmark cancels instead of favouring one arm. torch uses one thread in both arms: the
    daemon needs a core of its own (as it has in production, on another machine or a spare core); on a
    2-core machine it would otherwise take the training's second core and measure CPU contention instead
    of the governor's overhead.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data")
        try:
            arms = [("bare", None), ("governed", daemon.address)]
            speeds: dict[str, list[float]] = {"bare": [], "governed": []}
            for i in range(pairs):
                for arm, address in arms if i % 2 == 0 else arms[::-1]:
                    speeds[arm].append(steps_per_second(address, epochs, f"{arm}-{i}"))
        finally:
            daemon.terminate()
            torch.set_num_threads(threads)
    governed, bare = speeds["governed"], speeds["bare"]
    ratios = [g / b for g, b in zip(governed, bare, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "governed_steps_per_s": statistics.median(governed),
        "bare_steps_per_s": statistics.median(bare),
        "ratio": statistics.median(ratios),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "bare_min": min(bare),
        "bare_max": max(bare),
    }


if __name__ == "__main__":
    print(run())
