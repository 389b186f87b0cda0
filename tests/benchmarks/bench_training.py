"""Training overhead: steps/s on digits (CPU) with the governor attached (per-step vitals) over steps/s
with none. Runs are interleaved; the daemon is a separate process, as in production."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from governor_daemon.testing import DaemonProcess
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


def run(epochs: int = 15, repeats: int = 7) -> dict[str, float]:
    """Median steps/s of each arm and their ratio.

    torch uses one thread in both arms: the daemon needs a core of its own (as it has in production,
    on another machine or a spare core); on a 2-core machine it would otherwise take the training's
    second core and measure CPU contention instead of the governor's overhead.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp) / "data")
        try:
            governed, bare = [], []
            for i in range(repeats):
                bare.append(steps_per_second(None, epochs, f"bare-{i}"))
                governed.append(steps_per_second(daemon.address, epochs, f"governed-{i}"))
        finally:
            daemon.terminate()
            torch.set_num_threads(threads)
    g, b = statistics.median(governed), statistics.median(bare)
    return {"governed_steps_per_s": g, "bare_steps_per_s": b, "ratio": g / b}


if __name__ == "__main__":
    print(run())
