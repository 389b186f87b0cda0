"""Daemon ingest and verdict round trip under load, against the echo servicer on the same load."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from governor_daemon.testing import DaemonProcess


def loadgen(address: str, num_runs: int, num_batches: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.loadgen", address, str(num_runs), str(num_batches)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def echo(num_runs: int, num_batches: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.echo_server", str(port_file)])
        try:
            while not port_file.exists():
                time.sleep(0.05)
            return loadgen(f"127.0.0.1:{port_file.read_text()}", num_runs, num_batches)
        finally:
            proc.terminate()
            proc.wait(10)


def daemon(num_runs: int, num_batches: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        d = DaemonProcess(Path(tmp) / "data", "--max-active-runs", "1000")
        try:
            return loadgen(d.address, num_runs, num_batches)
        finally:
            d.terminate()


def run(num_runs: int = 64, num_batches: int = 150) -> dict[str, Any]:
    """Both measurements, interleaved twice; the better of each."""
    results: dict[str, list[dict[str, Any]]] = {"echo": [], "daemon": []}
    for _ in range(2):
        results["echo"].append(echo(num_runs, num_batches))
        results["daemon"].append(daemon(num_runs, num_batches))
    best = {k: max(v, key=lambda r: r["records_per_s"]) for k, v in results.items()}
    return {
        "daemon": best["daemon"],
        "echo": best["echo"],
        "ingest_ratio": best["daemon"]["records_per_s"] / best["echo"]["records_per_s"],
        "rtt_p99_ratio": best["daemon"]["rtt_p99_ms"] / max(best["echo"]["rtt_p99_ms"], 1e-9),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
