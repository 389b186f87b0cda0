"""The daemon's Prometheus metrics, with ``prometheus_client``, on a registry of each daemon's own.

Every metric is ``governor_``-prefixed. Labelled counters are initialised for every label value the daemon
knows of, so each series exists (at 0) from start (a run's per-run series from its first count). Counters
are updated from the event loop; a scrape is served by prometheus_client's WSGI app and server in threads
of their own, from a snapshot of the gauges that read the Governor's state taken on the loop, so a scrape
never blocks the loop for more than that snapshot and never reads the Governor from another thread. Only
``GET /metrics`` (and HEAD) is served, 404 elsewhere; ``Accept`` chooses between the text format and
OpenMetrics, ``Accept-Encoding: gzip`` compresses, as prometheus_client does.

Per-run series (``governor_run_*``, a ``run`` label) are opt-in: ``--metrics-per-run N`` labels at most N
runs at once; further runs are summed under ``run="other"``, and a run that leaves memory (evicted, expired,
forgotten) gives its slot back and its series are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from governor_daemon.policy.decisions import Rule
from governor_daemon.security import CertificateReloader, TlsFiles, TlsMaterial, server_context
from tolaria import package_version

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Label values known in advance: each of their series exists from start.
RECORD_KINDS = ("train", "validation")
VERDICT_KINDS = ("healthy", "anomaly", "panic")
PANIC_RULES = tuple(str(r) for r in Rule if r not in (Rule.WARMUP, Rule.NORMAL, Rule.TRAIN_FINITE))
"""Every rule that can PANIC: the policy's ``Rule`` less those of healthy verdicts."""
COMMANDS = (
    ("rollback", "sent"),
    ("halt", "sent"),
    ("resume", "sent"),
    *(("any", o) for o in ("succeeded", "failed", "timeout")),
)
AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")
NOTIFICATION_OUTCOMES = ("sent", "retried", "failed", "dropped")
"""``notify.OUTCOMES`` (a unit test keeps the two in step)."""
OTHER_RUNS = "other"

LabelValues = dict[tuple[str, ...], float]
"""A gauge's values by label values (in the order of its label names)."""


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
        self.registry = CollectorRegistry()
        self._add_record_metrics()
        self._add_decision_metrics()
        self._add_journal_metrics()
        self._add_daemon_metrics()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.state_gauges: list[StateGauge] = []
        self.runs = RunSlots(per_run)
        self.per_run: dict[str, tuple[Counter, list[dict[str, str]]]] = {}
        """Per-run family -> (counter, every label set besides ``run`` it has from a run's first count)."""
        self._runs_initialised: set[str] = set()
        if per_run > 0:
            self._add_per_run_counters(per_run)

    def _add_record_metrics(self) -> None:
        """What became of the records trainers sent: accepted, skipped over, shed, stale, late."""
        registry = self.registry
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
        for kind in RECORD_KINDS:
            self.records.labels(kind=kind)

    def _add_decision_metrics(self) -> None:
        """What the daemon decided: verdicts, the rules that PANICked, commands and their outcomes, and how
        long a decision took."""
        registry = self.registry
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
        for kind in VERDICT_KINDS:
            self.verdicts.labels(kind=kind)
        for rule in PANIC_RULES:
            self.panics.labels(rule=rule)
        for type_, outcome in COMMANDS:
            self.commands.labels(type=type_, outcome=outcome)

    def _add_journal_metrics(self) -> None:
        """How long the journal takes to make entries durable."""
        self.fsync_latency = Histogram(
            "governor_journal_fsync_seconds",
            "Journal write plus fsync per group commit.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def _add_daemon_metrics(self) -> None:
        """The daemon itself: calls it refused, the notifications it sent, its build."""
        registry = self.registry
        self.auth_failures = Counter(
            "governor_auth_failures_total", "Calls refused, by status code.", ["code"], registry=registry
        )
        self.notifications = Counter(
            "governor_notifications_total",
            "--notify-url events: sent, retried (an attempt failed), failed (given up), dropped (queue full or "
            "shutdown).",
            ["outcome"],
            registry=registry,
        )
        self.build_info = Gauge(
            "governor_build_info",
            "Always 1: the daemon's version and Python version.",
            ["version", "python"],
            registry=registry,
        )
        self.build_info.labels(version=package_version(), python=platform.python_version()).set(1)
        for code in AUTH_CODES:
            self.auth_failures.labels(code=code)
        for outcome in NOTIFICATION_OUTCOMES:
            self.notifications.labels(outcome=outcome)

    def _add_per_run_counters(self, per_run: int) -> None:
        """The governor_run_* counters: records, verdicts, panics and commands of each labelled run."""
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
        known = {
            "records": [{"kind": k} for k in RECORD_KINDS],
            "verdicts": [{"kind": k} for k in VERDICT_KINDS],
            "panics": [{"rule": r} for r in PANIC_RULES],
            "commands": [{"type": t, "outcome": o} for t, o in COMMANDS],
        }
        for key, (name, doc, labels) in families.items():
            doc += f' At most {per_run} runs labelled at once; the others as run="other".'
            self.per_run[key] = (Counter(name, doc, ["run", *labels], registry=self.registry), known[key])

    def add_state_gauge(self, gauge: StateGauge) -> None:
        """Register a gauge read from the Governor."""
        self.registry.register(gauge)
        self.state_gauges.append(gauge)

    def count_run(self, family: str, run: str, amount: float = 1.0, **labels: str) -> None:
        """Count in the per-run family (no-op when per-run series are off). A run's first count creates
        every series of every per-run family for it, at 0."""
        if family not in self.per_run or not run:
            return
        label = self.runs.label(run)
        if label not in self._runs_initialised:
            self._runs_initialised.add(label)
            for counter, known in self.per_run.values():
                for values in known:
                    counter.labels(run=label, **values)
        self.per_run[family][0].labels(run=label, **labels).inc(amount)

    def forget_run(self, run: str) -> None:
        """The run left memory: remove its per-run series and free its slot."""
        if self.runs.release(run):
            self._runs_initialised.discard(run)
            for counter, _ in self.per_run.values():
                counter.remove_by_labels({"run": run})

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (None if absent), e.g. ``value("governor_auth_failures_total", code=...)``."""
        return self.registry.get_sample_value(name, labels)


class MetricsServer:
    """``GET /metrics`` with prometheus_client's own WSGI app (text or OpenMetrics by ``Accept``, gzip by
    ``Accept-Encoding``, ``name[]`` filters) on its threading WSGI server, in threads of its own: a scrape
    never renders on the event loop, which only takes the snapshot of the state gauges. Other paths are 404,
    methods other than GET and HEAD 405. With a certificate and key it serves HTTPS, reading them again when
    they change (``certificates``: the next connection gets the renewed pair). A slow or hostile client holds
    one connection of ``_Server.max_connections`` for ``_Server.connection_deadline_s`` at most."""

    MAX_CONCURRENT = 8
    """Scrapes rendered at once; more are answered 503 at once."""
    SNAPSHOT_TIMEOUT_S = 5.0
    """How long a scrape waits for the event loop to snapshot the state gauges (then: the last snapshot)."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.metrics, self.loop = metrics, loop
        self.server: _Server | None = None
        self.certificates: CertificateReloader | None = None
        self._slots = threading.BoundedSemaphore(self.MAX_CONCURRENT)
        self._app = make_wsgi_app(metrics.registry)

    def start(
        self,
        host: str,
        port: int,
        tls: TlsFiles | None = None,
        on_reload: Callable[[TlsMaterial], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> int:
        """Listen (HTTPS with ``tls``, reloaded as ``CertificateReloader`` says, which calls ``on_reload`` and
        ``on_error`` from the accept thread) and serve from a daemon thread; returns the bound port. Raises
        OSError (the address is in use, the certificate unreadable; ssl.SSLError is one)."""
        server = make_server(host, port, self._serve, _IPv6Server if ":" in host else _IPv4Server, _QuietHandler)
        if tls is not None:
            try:
                server.context, material = server_context(tls)
            except BaseException:
                server.server_close()
                raise
            self.certificates = server.certificates = CertificateReloader(tls, material, on_reload, on_error)
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.1,), name="governor-metrics", daemon=True).start()
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop listening; blocks up to 0.1 s for the accept loop (scrapes in flight finish on their own)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    async def refresh(self) -> None:
        """Snapshot every state gauge (on the event loop)."""
        for gauge in self.metrics.state_gauges:
            gauge.refresh()

    def _serve(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if environ.get("PATH_INFO") != "/metrics":
            return _plain(start_response, "404 Not Found", b"not found: metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", b"use GET\n", ("Allow", "GET, HEAD"))
        if not self._slots.acquire(blocking=False):
            return _plain(start_response, "503 Service Unavailable", b"too many scrapes at once\n")
        try:
            with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is closed, or blocked
                asyncio.run_coroutine_threadsafe(self.refresh(), self.loop).result(self.SNAPSHOT_TIMEOUT_S)
            answer: list[tuple[str, list[tuple[str, str]]]] = []
            body = b"".join(self._app({**environ, "REQUEST_METHOD": "GET"}, lambda s, h, e=None: answer.append((s, h))))
        finally:
            self._slots.release()
        status, headers = answer[0]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]


def _plain(start_response: StartResponse, status: str, body: bytes, *headers: tuple[str, str]) -> list[bytes]:
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers]
    )
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No access log; a connection that sends no complete request (or TLS handshake) in 5 s is closed."""

    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


class _Server(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server (a thread per connection), bound without http.server's
    reverse DNS lookup of the address (``socket.getfqdn``, which can hang where DNS is slow).

    The handler's read timeout bounds each read, not a request: a client that trickles a byte every few
    seconds (slowloris) would hold its thread for hours, and every connection takes a thread. So at most
    ``max_connections`` are open at once (more are closed at accept, unanswered), and the accept loop shuts
    down every connection older than ``connection_deadline_s`` (a scrape that takes longer was dead anyway:
    Prometheus gives up after 10 s by default).
    """

    max_connections = 64
    connection_deadline_s = 30.0
    context: ssl.SSLContext | None = None
    """HTTPS: the context new connections get (replaced when ``certificates`` reloads)."""
    certificates: CertificateReloader | None = None

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()
        self._lock = threading.Lock()
        self._opened_at: dict[Any, float] = {}

    @property
    def num_connections(self) -> int:
        """Connections open now (accepted, not yet closed)."""
        with self._lock:
            return len(self._opened_at)

    def get_request(self) -> tuple[Any, Any]:
        """Accept loop: the next connection, with TLS the current certificate's (the files are checked for a
        renewal first). The handshake happens in the request's thread, under the handler's timeout."""
        request, address = super().get_request()
        if self.certificates is not None:
            loaded = None
            with contextlib.suppress(Exception):  # a bug must not end the accept loop: the current pair stays
                loaded = self.certificates.check()
            if loaded is not None:
                self.context = loaded[0]
        if self.context is None:
            return request, address
        try:
            return self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False), address
        except OSError:
            request.close()
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Accept loop: admit the connection if there is room (else socketserver closes it)."""
        with self._lock:
            if len(self._opened_at) >= self.max_connections:
                return False
            self._opened_at[request] = time.monotonic()
        return True

    def shutdown_request(self, request: Any) -> None:
        """Any thread: the connection is done (or refused)."""
        with self._lock:
            self._opened_at.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Accept loop, every poll interval: cut the connections past their deadline (their handler's blocked
        read returns, and its thread ends)."""
        cutoff = time.monotonic() - self.connection_deadline_s
        with self._lock:
            late = [request for request, opened in self._opened_at.items() if opened < cutoff]
        for request in late:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown: SSLSocket.shutdown would drop its TLS state under the reader.
                socket.socket.shutdown(request, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (cut off, reset, a bad TLS handshake): nothing to print."""


class _IPv4Server(_Server):
    address_family = socket.AF_INET


class _IPv6Server(_Server):
    address_family = socket.AF_INET6
