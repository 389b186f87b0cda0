"""One tenant's flood beside another tenant's fault: how long tenant B's NaN takes to become B's ROLLBACK
while tenant A floods 128 runs of its own (4 processes of 32 streams), against the same trials with no flood, and how fast the journal
grows under the flood (docs/protocol.md, "Shedding": turns by principal, paced shedding).

The daemon runs as `governor serve` with a tokens file scoping tenant A to ``a.`` and B to ``b.``; A's
flood is a separate process sending pre-serialized batches as fast as the daemon takes them."""

from __future__ import annotations

import math
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from governor_daemon.testing import AttachClient
from tests.benchmarks import loadgen
from tolaria.governor.v1 import common_pb2
from tolaria.governor.v1 import control_service_pb2 as cpb
from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

TOKENS = {
    "tenant-a": ("trainer", "bench-tenant-a-token-0123456789", "runs=a."),
    "tenant-b": ("trainer", "bench-tenant-b-token-0123456789", "runs=b."),
    "root": ("controller", "bench-root-controller-token-0123", ""),
}
FLOOD_RUNS = 32
FLOOD_PROCESSES = 4
TRIALS = 10


def who(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name][1]}"),)


def flood(address: str, num_runs: int, num_batches: int, prefix: str) -> None:
    """Tenant A: ``num_runs`` streams sending ``num_batches`` batches of 256 records each, as fast as taken."""
    messages = loadgen.batches(num_batches)
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    barrier = threading.Barrier(num_runs)
    threads = [
        threading.Thread(
            target=loadgen.stream,
            args=(channels[i % 4], messages, f"{prefix}{i}", barrier, 0.0, []),
            kwargs={"metadata": who("tenant-a")},
            daemon=True,
        )
        for i in range(num_runs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def trial(address: str, run_id: str) -> float:
    """Tenant B: a short healthy stretch, then a batch with a NaN; seconds from sending it to the ROLLBACK."""
    victim = AttachClient(address, run_id, metadata=who("tenant-b"))
    try:
        victim.connect(timeout_s=60)
        for b in range(4):
            victim.vitals(range(32 * b, 32 * b + 32), [1.0] * 32)
        victim.wait_ack(victim.seq, timeout_s=120)
        sent = time.perf_counter()
        victim.vitals(range(128, 160), [1.0] * 16 + [math.nan] + [1.0] * 15)
        command = victim.next("command", timeout_s=120).command
        delay = time.perf_counter() - sent
    finally:
        victim.close()
    if command.type != common_pb2.COMMAND_TYPE_ROLLBACK:
        raise AssertionError(f"{run_id}: expected a ROLLBACK, got {command}")
    return delay


def journal_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())


def shed_census(data_dir: Path) -> tuple[int, int]:
    """Shed entries in the journal so far, and their bytes."""
    shed = [
        item.raw
        for path in list_segments(data_dir)
        for item in read_segment(path)
        if isinstance(item, LocatedEntry) and item.entry.kind == "vitals" and item.entry.payload.get("num_shed")
    ]
    return len(shed), sum(len(raw) + 1 for raw in shed)


def scenario(flooded: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text("".join(f"{n} {role} {token} {scope}\n" for n, (role, token, scope) in TOKENS.items()))
        tokens.chmod(0o600)
        data = Path(tmp) / "data"
        d = DaemonProcess(data, "--tokens-file", str(tokens), "--max-active-runs", "1000")
        flooders = [
            multiprocessing.get_context("spawn").Process(
                target=flood, args=(d.address, FLOOD_RUNS, 4000, f"a.p{p}-"), daemon=True
            )
            for p in range(FLOOD_PROCESSES if flooded else 0)
        ]
        try:
            for flooder in flooders:
                flooder.start()
            if flooded:
                time.sleep(3.0)  # A's streams attached and the daemon saturated
            delays = [trial(d.address, f"b.run-{i}") for i in range(TRIALS)]
            growth = flood_window(d.address, data) if flooded else {}
        finally:
            for flooder in flooders:
                flooder.kill()
                flooder.join()
            d.terminate()
    return {
        "delays_s": delays,
        "delay_median_s": statistics.median(delays),
        "delay_max_s": max(delays),
        "rollbacks": len(delays),
        **growth,
    }


def flood_counts(address: str) -> tuple[int, int]:
    """Records of tenant A's runs judged and shed so far (GetPanicState as an unscoped controller)."""
    judged = shed = 0
    with grpc.insecure_channel(address) as channel:
        stub = cgrpc.ControlServiceStub(channel)
        for run in stub.ListRuns(cpb.ListRunsRequest(), metadata=who("root")).runs:
            if run.run_id.startswith("a."):
                request = cpb.GetPanicStateRequest(run_id=run.run_id)
                for rank in stub.GetPanicState(request, metadata=who("root")).run.ranks:
                    judged, shed = judged + rank.num_records, shed + rank.num_shed_records
    return judged, shed


def flood_window(address: str, data: Path, seconds: float = 5.0) -> dict[str, float]:
    """The journal's growth and A's judged and shed records per second over ``seconds`` of flood."""
    (judged, shed), size, census = flood_counts(address), journal_bytes(data), shed_census(data)
    started = time.perf_counter()
    time.sleep(seconds)
    (judged_after, shed_after), grown = flood_counts(address), journal_bytes(data) - size
    elapsed = time.perf_counter() - started
    census_after = shed_census(data)
    return {
        "journal_bytes_per_s": grown / elapsed,
        "shed_entries_per_s": (census_after[0] - census[0]) / elapsed,
        "shed_bytes_per_s": (census_after[1] - census[1]) / elapsed,
        "flood_judged_per_s": (judged_after - judged) / elapsed,
        "flood_shed_per_s": (shed_after - shed) / elapsed,
    }


def run() -> dict[str, Any]:
    quiet = scenario(flooded=False)
    flooded = scenario(flooded=True)
    return {
        "quiet": quiet,
        "flooded": flooded,
        "delay_ratio": flooded["delay_median_s"] / max(quiet["delay_median_s"], 1e-9),
        "trials": TRIALS,
        "flood_runs": FLOOD_RUNS * FLOOD_PROCESSES,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
