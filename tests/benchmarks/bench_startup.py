"""Daemon start-up against journal size: open (lock, verify every segment's chain, recover) and rebuild the
core's state, for 2.5k entries, 20k entries and a full 64 MiB segment. The baseline is reading the same
files and hashing every line once (what verification cannot do without)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from governor_daemon.core import GovernorCore, Registry
from governor_daemon.journal import Journal
from governor_daemon.journal.segments import DEFAULT_SEGMENT_BYTES, list_segments

INCARNATION = "5f3a0c2d9e8b7a6f5e4d3c2b"


def _payload(seq: int) -> dict[str, Any]:
    """A vitals entry as the daemon writes one (256 records, the rank's effect included)."""
    rank = {
        "incarnation_id": INCARNATION,
        "generation": 1,
        "seqs": {INCARNATION: 256 * seq},
        "num_records": 256 * seq,
        "num_gaps": 0,
        "latest_step": 256 * seq,
        "latest_timeline": 0,
    }
    return {
        "rank": 0,
        "incarnation_id": INCARNATION,
        "seq": 256 * seq,
        "first_seq": 256 * seq - 255,
        "num_records": 256,
        "num_gaps": 0,
        "num_dropped": 0,
        "max_step": 256 * seq,
        "timeline": 0,
        "effects": {"ranks": {"0": rank}},
    }


def write_journal(data_dir: Path, entries: int | None) -> int:
    """A journal of ``entries`` entries (None: until one full segment exists); returns how many."""
    journal = Journal(data_dir)
    journal.open()
    registry = Registry()  # what the daemon's core holds, so that each segment's checkpoint is real
    journal.checkpoint_provider = registry.checkpoint
    created = {
        "meta": {
            "task": "bench",
            "world_size": 1,
            "overrides": {},
            "hello_rgl": None,
            "num_classes": 10,
            "ignored_fields": [],
            "owner": "",
        }
    }
    from governor_daemon.policy import PolicyConfig, RunPolicy

    created["policy"] = RunPolicy(PolicyConfig(), 1, None, 10).to_dict()
    registry.apply_entry(journal.append("bench", "run_created", {"effects": created}, time.time()))
    n = 1
    while (entries is not None and n < entries) or (
        entries is None and sum(p.stat().st_size for p in list_segments(data_dir)) < DEFAULT_SEGMENT_BYTES - 2048
    ):
        for _ in range(2000 if entries is None else min(2000, entries - n)):
            n += 1
            registry.apply_entry(journal.append("bench", "vitals", _payload(n), time.time()))
        journal.write_pending()
    journal.close()
    return n


def start_up(data_dir: Path) -> float:
    """Seconds to open the journal and rebuild the core, as `governor serve` starts."""
    started = time.perf_counter()
    journal = Journal(data_dir)
    recovery = journal.open()
    GovernorCore().restore(recovery.checkpoint, recovery.entries)
    elapsed = time.perf_counter() - started
    journal.close()
    return elapsed


def hash_lines(data_dir: Path) -> float:
    """Seconds to read every segment and SHA-256 each line once."""
    started = time.perf_counter()
    for path in list_segments(data_dir):
        for line in path.read_bytes().splitlines():
            hashlib.sha256(line).digest()
    return time.perf_counter() - started


def run() -> list[dict[str, float]]:
    """One row per journal size: entries, bytes, start-up seconds, baseline seconds."""
    rows = []
    for entries in (2_500, 20_000, None):
        folder = Path(tempfile.mkdtemp(prefix="bench-startup-"))
        try:
            n = write_journal(folder / "data", entries)
            size = sum(p.stat().st_size for p in list_segments(folder / "data"))
            seconds = min(start_up(folder / "data") for _ in range(2))
            baseline = min(hash_lines(folder / "data") for _ in range(2))
            rows.append({"entries": n, "bytes": size, "seconds": seconds, "baseline_s": baseline})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows
