"""Prometheus text exposition, served on its own port. Counters, gauges and histograms, no deps.

Names follow Prometheus conventions with the ``governor_`` prefix. Updated from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount``."""
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    """A value computed at scrape time by ``collect`` (label set -> value)."""

    def __init__(
        self, name: str, help_text: str, collect: Callable[[], dict[tuple[tuple[str, str], ...], float]]
    ) -> None:
        self.name, self.help, self.collect = name, help_text, collect

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.collect().items())]
        return lines


class Histogram:
    """Cumulative buckets, sum and count (seconds)."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        lines += [
            f'{self.name}_bucket{{le="+Inf"}} {self.count}',
            f"{self.name}_sum {self.total:g}",
            f"{self.name}_count {self.count}",
        ]
        return lines


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.records = Counter("governor_records_received_total", "Records accepted, by kind (train, validation).")
        self.gaps = Counter("governor_record_gaps_total", "Sequence numbers skipped between accepted records.")
        self.stale = Counter(
            "governor_stale_records_total", "Records of an abandoned timeline, journaled, not decided."
        )
        self.late = Counter("governor_late_records_total", "Validation reports after their step was decided.")
        self.verdicts = Counter("governor_verdicts_total", "Verdicts, by kind.")
        self.panics = Counter("governor_panics_total", "PANIC verdicts, by rule.")
        self.commands = Counter(
            "governor_commands_total", "Commands, by type and outcome (sent, succeeded, failed, timeout)."
        )
        self.decision_latency = Histogram(
            "governor_decision_latency_seconds",
            "From receiving a validation record to its verdict being queued.",
        )
        self.fsync_latency = Histogram("governor_journal_fsync_seconds", "Journal write plus fsync per group commit.")
        self.auth_failures = Counter("governor_auth_failures_total", "Calls refused, by status code.")
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        metrics: list[Counter | Histogram | Gauge] = [
            self.records,
            self.gaps,
            self.stale,
            self.late,
            self.verdicts,
            self.panics,
            self.commands,
            self.decision_latency,
            self.fsync_latency,
            self.auth_failures,
            *self.gauges,
        ]
        for metric in metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve GET /metrics (any path) as Prometheus text on host:port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            body = metrics.render().encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port)
