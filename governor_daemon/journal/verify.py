"""Verification of the whole chain across segments, for `governor audit verify` and `audit head`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from governor_daemon.journal.entry import GENESIS_HASH, verify_link
from governor_daemon.journal.segments import BadLine, list_segments, read_segment


@dataclass
class VerifyReport:
    """Outcome of a verification: ``problem`` names the first bad line, if any."""

    num_entries: int = 0
    num_segments: int = 0
    head_hash: str = GENESIS_HASH
    head_seq: int = 0
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every entry continues the chain."""
        return self.problem is None


def verify_journal(data_dir: Path, key: bytes | None = None) -> VerifyReport:
    """Check every line of every segment: parse, seq continuity, prev_hash link and hash.

    A torn last line of the last segment is a warning (start-up moves it aside); anything else stops
    the check with the file and line named.
    """
    report = VerifyReport()
    segments = list_segments(data_dir)
    report.num_segments = len(segments)
    if not segments:
        report.problem = f"no journal segments in {data_dir}"
        return report
    prev_hash, expected = GENESIS_HASH, 1
    for index, path in enumerate(segments):
        for item in read_segment(path):
            if isinstance(item, BadLine):
                if item.is_last and index == len(segments) - 1 and "torn" in item.reason:
                    report.warnings.append(f"{path.name}:{item.line}: {item.reason} (moved aside at next start)")
                    continue
                report.problem = f"{path.name}:{item.line}: {item.reason}"
                return report
            why = verify_link(item.entry, prev_hash, expected, key, item.raw)
            if why is not None:
                report.problem = f"{path.name}:{item.line}: {why}"
                return report
            prev_hash, expected = item.entry.hash, item.entry.seq + 1
            report.num_entries += 1
            report.head_hash, report.head_seq = item.entry.hash, item.entry.seq
    return report
