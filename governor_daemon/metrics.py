"""The daemon's Prometheus metrics, with ``prometheus_client``, on a registry of each daemon's own.

Every metric is ``governor_``-prefixed. Labelled counters are initialised for every label value the daemon
knows of, so each series exists (at 0) from start. Counters are updated from the event loop; a scrape is
rendered in a worker thread, from a snapshot of the gauges that read the Governor's state taken on the loop,
so a scrape never blocks the loop for more than that snapshot and never reads the Governor from another
thread. Only ``GET /metrics`` is served (404 elsewhere); ``Accept`` chooses between the text format and
OpenMetrics, as prometheus_client does.

Per-run series (``governor_run_*``, a ``run`` label) are opt-in: ``--metrics-per-run N`` labels at most N
runs at once; further runs are summed under ``run="other"``, and a run that leaves memory (evicted, expired,
forgotten) gives its slot back and its series are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Label values known in advance: each of their series exists from start.
RECORD_KINDS = ("train", "validation")
VERDICT_KINDS = ("healthy", "anomaly", "panic")
PANIC_RULES = (
    "non_finite",
    "lobotomy",
    "divergence",
    "train_non_finite",
    "step_loss_spike",
    "step_grad_blowup",
    "step_collapse",
    "step_rise",
    "step_lr_jump",
    "step_zero",
)
"""Every rule that can PANIC (policy/decisions.py ``Rule``; a unit test keeps the two in step)."""
COMMANDS = (
    ("rollback", "sent"),
    ("halt", "sent"),
    ("resume", "sent"),
    *(("any", o) for o in ("succeeded", "failed", "timeout")),
)
AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")
OTHER_RUNS = "other"

LabelValues = dict[tuple[str, ...], float]
"""A gauge's values by label values (in the order of its label names)."""


def package_version() -> str:
    """The installed version of tolaria-governor ("unknown" from a bare checkout)."""
    try:
        return metadata.version("tolaria-governor")
    except metadata.PackageNotFoundError:
        return "unknown"


class StateGauge(Collector):
    """A gauge whose values are read from the Governor by ``read`` (on the event loop, at ``refresh``).

    A scrape renders the values of the last ``refresh``; a collect before any refresh calls ``read``
    itself (only safe on the loop's thread, which is where tests and ``refresh`` call it)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], read: Callable[[], LabelValues]):
        self.name, self.documentation, self.labelnames, self.read = name, documentation, labelnames, read
        self._values: LabelValues | None = None

    def refresh(self) -> None:
        """Take the values now (call on the event loop)."""
        self._values = dict(self.read())

    def describe(self) -> Iterable[Metric]:
        """The family without samples (for the registry's name checks)."""
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """The family with the last values."""
        values = self._values if self._values is not None else self.read()
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in sorted(values.items()):
            family.add_metric(list(labels), value)
        return [family]


class PerRunCounter:
    """A counter family with a ``run`` label for at most ``limit`` runs; others count under run="other"."""

    def __init__(self, counter: Counter, runs: RunSlots) -> None:
        self.counter, self.runs = counter, runs

    def inc(self, run: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to the run's series (or to run="other")."""
        self.counter.labels(run=self.runs.label(run), **labels).inc(amount)


class RunSlots:
    """Which runs have a label of their own: at most ``limit`` at once, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.labelled: set[str] = set()

    def label(self, run: str) -> str:
        """The ``run`` label value of this run."""
        if run in self.labelled:
            return run
        if len(self.labelled) < self.limit and run != OTHER_RUNS:
            self.labelled.add(run)
            return run
        return OTHER_RUNS

    def release(self, run: str) -> bool:
        """The run left memory: free its slot. True if it had one."""
        if run in self.labelled:
            self.labelled.discard(run)
            return True
        return False


class Metrics:
    """Every metric the daemon exports, on its own registry (``registry``).

    ``per_run``: how many runs get series of their own (``governor_run_*``); 0 turns them off.
    """

    def __init__(self, per_run: int = 0) -> None:
        self.registry = registry = CollectorRegistry()
        self.records = Counter(
            "governor_records_received_total",
            "Records accepted, by kind (train, validation).",
            ["kind"],
            registry=registry,
        )
        self.gaps = Counter(
            "governor_record_gaps_total", "Sequence numbers skipped between accepted records.", registry=registry
        )
        self.shed = Counter(
            "governor_records_shed_total",
            "Train-step records acknowledged without being judged because the daemon was behind.",
            registry=registry,
        )
        self.stale = Counter(
            "governor_stale_records_total",
            "Records of an abandoned timeline, journaled, not decided.",
            registry=registry,
        )
        self.late = Counter(
            "governor_late_records_total", "Validation reports after their step was decided.", registry=registry
        )
        self.verdicts = Counter("governor_verdicts_total", "Verdicts, by kind.", ["kind"], registry=registry)
        self.panics = Counter("governor_panics_total", "PANIC verdicts, by rule.", ["rule"], registry=registry)
        self.commands = Counter(
            "governor_commands_total",
            "Commands, by type and outcome (sent, succeeded, failed, timeout).",
            ["type", "outcome"],
            registry=registry,
        )
        self.decision_latency = Histogram(
            "governor_decision_latency_seconds",
            "From receiving a validation record to its verdict being queued.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.fsync_latency = Histogram(
            "governor_journal_fsync_seconds",
            "Journal write plus fsync per group commit.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.auth_failures = Counter(
            "governor_auth_failures_total", "Calls refused, by status code.", ["code"], registry=registry
        )
        self.build_info = Gauge(
            "governor_build_info",
            "Always 1: the daemon's version and Python version.",
            ["version", "python"],
            registry=registry,
        )
        self.build_info.labels(version=package_version(), python=platform.python_version()).set(1)
        for kind in RECORD_KINDS:
            self.records.labels(kind=kind)
        for kind in VERDICT_KINDS:
            self.verdicts.labels(kind=kind)
        for rule in PANIC_RULES:
            self.panics.labels(rule=rule)
        for type_, outcome in COMMANDS:
            self.commands.labels(type=type_, outcome=outcome)
        for code in AUTH_CODES:
            self.auth_failures.labels(code=code)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.state_gauges: list[StateGauge] = []
        self.runs = RunSlots(per_run)
        self.per_run: dict[str, PerRunCounter] = {}
        if per_run > 0:
            families = {
                "records": ("governor_run_records_received_total", "Records accepted per run, by kind.", ["kind"]),
                "verdicts": ("governor_run_verdicts_total", "Verdicts per run, by kind.", ["kind"]),
                "panics": ("governor_run_panics_total", "PANIC verdicts per run, by rule.", ["rule"]),
                "commands": (
                    "governor_run_commands_total",
                    "Commands per run, by type and outcome.",
                    ["type", "outcome"],
                ),
            }
            for key, (name, doc, labels) in families.items():
                doc += f' At most {per_run} runs labelled at once; the others as run="other".'
                counter = Counter(name, doc, ["run", *labels], registry=registry)
                self.per_run[key] = PerRunCounter(counter, self.runs)

    def add_state_gauge(self, gauge: StateGauge) -> None:
        """Register a gauge read from the Governor."""
        self.registry.register(gauge)
        self.state_gauges.append(gauge)

    def count_run(self, family: str, run: str, amount: float = 1.0, **labels: str) -> None:
        """Count in the per-run family (no-op when per-run series are off)."""
        counter = self.per_run.get(family)
        if counter is not None and run:
            counter.inc(run, amount, **labels)

    def forget_run(self, run: str) -> None:
        """The run left memory: remove its per-run series and free its slot."""
        if self.runs.release(run):
            for counter in self.per_run.values():
                counter.counter.remove_by_labels({"run": run})

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (None if absent), e.g. ``value("governor_auth_failures_total", code=...)``."""
        return self.registry.get_sample_value(name, labels)


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on an asyncio server; rendering runs in one worker thread."""

    MAX_CONCURRENT = 8

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.Server | None = None
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="governor-metrics")
        self._slots = asyncio.Semaphore(self.MAX_CONCURRENT)

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        self.server = await asyncio.start_server(self._handle, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and let the render thread go."""
        if self.server is not None:
            self.server.close()
        self._render.shutdown(wait=False, cancel_futures=True)

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (body, content type) for this Accept header."""
        for gauge in self.metrics.state_gauges:
            gauge.refresh()
        encoder, content_type = choose_encoder(accept)
        body = await asyncio.get_running_loop().run_in_executor(self._render, encoder, self.metrics.registry)
        return body, content_type

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            async with self._slots:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                status, body, content_type = await self._respond(head)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                )
                if not head.startswith(b"HEAD "):
                    writer.write(body)
                await writer.drain()
        writer.close()

    async def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain; charset=utf-8"
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return "404 Not Found", b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"use GET\n", "text/plain; charset=utf-8"
        accept = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("accept:")), "")
        body, content_type = await self.render(accept)
        return "200 OK", body, content_type
