"""A crash costs seconds: from ``kill -9`` of a training process to the first optimizer step of its restart,
for the same model + Adam state (bench_snapshot's 100 MB one by default), three ways:

- **shm**: the restart adopts the last-known-good the killed process left in /dev/shm (``LastKnownGood`` with a
  ``ShmStore``: open, verify the digest, restore). The daemon's word (Welcome.last_snapshot) is stood in for by
  the manifest's own (timeline, step, digest): this measures the adoption, the protocol has its e2e test;
- **disk**: the restart reloads a ``torch.save`` checkpoint of the same state (model, Adam, step) from disk
  (written by the killed process with tmp + rename; the page cache is as the crash left it: warm);
- **scratch**: the restart starts over from step 0.

The killed process trains, publishes a snapshot every ``snapshot_every`` steps (stage + publish + digest, what
a validation or step snapshot costs) and saves a checkpoint every ``checkpoint_every`` steps; it is killed
when it reports step ``kill_at`` (where it waits for it). Steps lost per crash = ``kill_at`` − the step the restart resumes at. Each
restart is a new Python process (imports included, the same for all three); the time of each is the median
of ``repeats`` restarts, plus the time the kill took (SIGKILL to the process reaped).

Run alone: ``python -m tests.benchmarks.bench_crash_restart [--hidden 256 --kill-at 25]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _build(hidden: int) -> Any:
    import torch
    from torch import nn

    from tolaria_trainer.model.host import MorphogeneticModel
    from tolaria_trainer.training import TrainingState, adam

    torch.manual_seed(0)
    model = MorphogeneticModel(nn.Flatten(), 1024, hidden, 1000, num_blocks=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return TrainingState(model, [optimizer], torch.device("cpu"), adam(1e-3))


def _train_step(state: Any) -> None:
    import torch

    optimizer = state.host_optimizer
    optimizer.zero_grad(set_to_none=True)
    state.model(torch.randn(8, 1024)).square().mean().backward()
    optimizer.step()
    state.step += 1


def _worker_train(args: argparse.Namespace) -> None:
    """Train until killed: a snapshot every ``snapshot_every`` steps, a checkpoint every ``checkpoint_every``."""
    import torch

    from tolaria_trainer.shm import ShmStore
    from tolaria_trainer.snapshot import LastKnownGood

    state = _build(args.hidden)
    lkg = LastKnownGood("host", 0, ShmStore(args.run, 0, Path(args.shm)))
    lkg.take(state)
    checkpoint = Path(args.checkpoint)
    while True:
        _train_step(state)
        out: dict[str, Any] = {"step": state.step}
        if state.step % args.snapshot_every == 0:
            started = time.perf_counter()
            info = lkg.stage(state)
            lkg.publish(info.timeline, info.step)
            out.update(snapshot_ms=(time.perf_counter() - started) * 1000, digest_ms=lkg.digest_ms)
        if state.step % args.checkpoint_every == 0:
            started = time.perf_counter()
            tmp = checkpoint.with_suffix(".tmp")
            payload = {
                "model": state.model.state_dict(),
                "optimizer": state.host_optimizer.state_dict(),
                "step": state.step,
            }
            torch.save(payload, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, checkpoint)
            out.update(checkpoint_ms=(time.perf_counter() - started) * 1000)
        print(json.dumps(out), flush=True)
        while state.step == args.kill_at:  # the kill comes at exactly this step
            time.sleep(1)


def _worker_restart(args: argparse.Namespace) -> None:
    """Start as a restarted process would, resume (``mode``), take one optimizer step; print when it ended."""
    import torch

    import tolaria_trainer.model.host
    import tolaria_trainer.snapshot
    import tolaria_trainer.training  # noqa: F401  (every import done: what follows is the restart's own work)

    imported = time.time()
    state = _build(args.hidden)
    if args.mode == "shm":
        from tolaria_trainer.shm import ShmStore
        from tolaria_trainer.snapshot import LastKnownGood

        store = ShmStore(args.run, 0, Path(args.shm))
        lkg = LastKnownGood("host", 0, store)
        manifest = store.previous
        assert manifest is not None, "no manifest in shared memory"
        lkg.adopt(state, (manifest["timeline"], manifest["step"], manifest["digest"]))
        store.detach()  # leave the set for the next repeat
    elif args.mode == "disk" and Path(args.checkpoint).exists():  # else none was written yet: from step 0
        saved = torch.load(args.checkpoint, weights_only=True)
        state.model.load_state_dict(saved["model"])
        state.host_optimizer.load_state_dict(saved["optimizer"])
        state.step = int(saved["step"])
    resumed = state.step
    _train_step(state)
    print(json.dumps({"resumed_step": resumed, "imported_at": imported, "first_step_at": time.time()}), flush=True)


def run(
    hidden: int = 2048,
    kill_at: int = 95,
    snapshot_every: int = 10,
    checkpoint_every: int = 50,
    repeats: int = 3,
) -> dict[str, Any]:
    """Crash-to-first-step seconds and steps lost for shm adoption, disk reload and starting over."""
    shm = Path(os.environ.get("TOLARIA_SHM_DIR") or "/dev/shm") / f"tolaria-bench-{uuid.uuid4().hex[:8]}"
    shm.mkdir()
    work = Path(tempfile.mkdtemp(prefix="tolaria-bench-crash-"))
    common = ["--hidden", str(hidden), "--run", "bench", "--shm", str(shm), "--checkpoint", str(work / "ckpt.pt")]
    me = [sys.executable, "-m", "tests.benchmarks.bench_crash_restart"]
    schedule = ("--snapshot-every", str(snapshot_every), "--checkpoint-every", str(checkpoint_every))
    try:
        train = subprocess.Popen(
            [*me, "worker-train", *common, *schedule, "--kill-at", str(kill_at)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert train.stdout is not None
        costs: dict[str, list[float]] = {"snapshot_ms": [], "digest_ms": [], "checkpoint_ms": []}
        for line in train.stdout:
            item = json.loads(line)
            for key in costs:
                if key in item:
                    costs[key].append(item[key])
            if item["step"] >= kill_at:
                break
        killed = time.time()
        train.send_signal(signal.SIGKILL)
        train.wait()
        kill_s = time.time() - killed
        results: dict[str, Any] = {"kill_s": kill_s, "killed_at_step": kill_at}
        for mode in ("scratch", "disk", "shm"):
            times, steps, after_import = [], 0, []
            for _ in range(repeats):
                spawned = time.time()
                out = subprocess.run(
                    [*me, "worker-restart", *common, "--mode", mode],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=False,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"the {mode} restart failed: {out.stderr[-2000:]}")
                item = json.loads(out.stdout.strip().splitlines()[-1])
                times.append(item["first_step_at"] - spawned)
                after_import.append(item["first_step_at"] - item["imported_at"])
                steps = item["resumed_step"]
            results[mode] = {
                "crash_to_step_s": kill_s + statistics.median(times),
                "after_imports_s": statistics.median(after_import),
                "resumed_step": steps,
                "steps_lost": kill_at - steps,
            }
        nbytes = sum(p.numel() * p.element_size() for p in _build(hidden).model.parameters()) * 3
        results.update(
            bytes=nbytes,
            snapshot_every=snapshot_every,
            checkpoint_every=checkpoint_every,
            snapshot_ms=statistics.median(costs["snapshot_ms"]) if costs["snapshot_ms"] else float("nan"),
            digest_ms=statistics.median(costs["digest_ms"]) if costs["digest_ms"] else float("nan"),
            checkpoint_ms=statistics.median(costs["checkpoint_ms"]) if costs["checkpoint_ms"] else float("nan"),
        )
        return results
    finally:
        for path in shm.iterdir():
            path.unlink()
        shm.rmdir()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="bench", choices=("bench", "worker-train", "worker-restart"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--kill-at", type=int, default=95)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", default="bench")
    parser.add_argument("--shm", default="/dev/shm")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--mode", default="shm", choices=("shm", "disk", "scratch"))
    args = parser.parse_args()
    if args.role == "worker-train":
        _worker_train(args)
    elif args.role == "worker-restart":
        _worker_restart(args)
    else:
        print(json.dumps(run(args.hidden, args.kill_at, args.snapshot_every, args.checkpoint_every, args.repeats)))


if __name__ == "__main__":
    main()
