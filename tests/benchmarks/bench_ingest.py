"""Daemon ingest and verdict round trip under load, against the echo servicer on the same load.

Two loads: as fast as the server takes the batches (throughput, and the round trip at saturation), and
paced at half the echo's saturation rate measured in the same run (the round trip below saturation)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from governor_daemon.daemon_process import DaemonProcess
from tests.benchmarks.common import cpu_seconds


def loadgen(address: str, num_runs: int, num_batches: int, rate: float = 0.0) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.loadgen", address, str(num_runs), str(num_batches), str(rate)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured(pid: int, address: str, num_runs: int, num_batches: int, rate: float) -> dict[str, Any]:
    """One loadgen run, with the server's CPU seconds during it."""
    before = cpu_seconds(pid)
    result = loadgen(address, num_runs, num_batches, rate)
    result["server_cpu_s"] = cpu_seconds(pid) - before
    return result


def echo(num_runs: int, num_batches: int, rate: float = 0.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.echo_server", str(port_file)])
        try:
            while not port_file.exists():
                time.sleep(0.05)
            return measured(proc.pid, f"127.0.0.1:{port_file.read_text()}", num_runs, num_batches, rate)
        finally:
            proc.terminate()
            proc.wait(10)


def daemon(num_runs: int, num_batches: int, rate: float = 0.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        d = DaemonProcess(Path(tmp) / "data", "--max-active-runs", "1000")
        try:
            return measured(d.proc.pid, d.address, num_runs, num_batches, rate)
        finally:
            d.terminate()


def run(num_runs: int = 64, num_batches: int = 300, paced_seconds: float = 6.0) -> dict[str, Any]:
    """Both servers under both loads, interleaved twice; the better run of each (by records judged per
    second, or by p99). At saturation about 5 s a run, so the p99 rests on some 300 round trips."""
    saturated: dict[str, list[dict[str, Any]]] = {"echo": [], "daemon": []}
    for _ in range(2):
        saturated["echo"].append(echo(num_runs, num_batches))
        saturated["daemon"].append(daemon(num_runs, num_batches))
    best = {k: max(v, key=lambda r: r["judged_records_per_s"]) for k, v in saturated.items()}
    rate = 0.5 * best["echo"]["records_per_s"]
    paced_batches = max(10, round(rate * paced_seconds / (num_runs * 256)))
    paced: dict[str, list[dict[str, Any]]] = {"echo": [], "daemon": []}
    for _ in range(2):
        paced["echo"].append(echo(num_runs, paced_batches, rate))
        paced["daemon"].append(daemon(num_runs, paced_batches, rate))
    calm = {k: min(v, key=lambda r: r["rtt_p99_ms"]) for k, v in paced.items()}
    return {
        "daemon": best["daemon"],
        "echo": best["echo"],
        "ingest_ratio": best["daemon"]["judged_records_per_s"] / best["echo"]["records_per_s"],
        "rtt_p99_ratio": best["daemon"]["rtt_p99_ms"] / max(best["echo"]["rtt_p99_ms"], 1e-9),
        "paced_rate": rate,
        "paced_daemon": calm["daemon"],
        "paced_echo": calm["echo"],
        "paced_rtt_p99_ratio": calm["daemon"]["rtt_p99_ms"] / max(calm["echo"]["rtt_p99_ms"], 1e-9),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
