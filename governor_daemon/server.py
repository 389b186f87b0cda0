"""`governor serve`: the asyncio gRPC server around the Governor, with health, reflection, metrics
and an orderly shutdown (health NOT_SERVING, streams told to end, server stopped, journal flushed)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import gc
import os
import resource
import signal
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from governor_daemon.certs import CertificateError, expiry_warning, not_after
from governor_daemon.core import events as ev
from governor_daemon.journal import JournalCorruptError, JournalLockedError
from governor_daemon.metrics import LabelValues, Metrics, MetricsServer, StateGauge
from governor_daemon.notify import Notifier
from governor_daemon.policy import RunState
from governor_daemon.security import (
    AuthInterceptor,
    CertificateReloader,
    TlsFiles,
    TlsMaterial,
    Tokens,
    TokensFileError,
    is_loopback,
)
from governor_daemon.service.control_servicer import ControlServicer
from governor_daemon.service.ingest import VitalsIngest
from governor_daemon.service.runtime import Governor, GovernorOptions
from governor_daemon.service.trainer_servicer import TrainerServicer
from governor_daemon.settings import ServeSettings, parse_address
from tolaria.exit_codes import ExitCode
from tolaria.governor.v1 import (
    control_service_pb2,
    control_service_pb2_grpc,
    trainer_service_pb2,
    trainer_service_pb2_grpc,
)

log = structlog.get_logger("governor.server")

SERVICE_NAMES = (
    trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    control_service_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
)


def build_governor(settings: ServeSettings) -> Governor:
    """The Governor for these settings."""
    return Governor(
        GovernorOptions(
            data_dir=settings.data_dir,
            defaults=settings.policy_defaults,
            locked_fields=settings.lock_policy_fields,
            limits=settings.limits(),
            segment_bytes=settings.segment_bytes,
            group_commit_s=settings.group_commit_ms / 1000.0,
            hmac_key=settings.hmac_key,
            repair=settings.repair,
        )
    )


def _certificate_reloaded(listener: str, material: TlsMaterial) -> None:
    """Logged from gRPC's handshake thread (or the metrics server's accept thread) when new TLS files are
    served (structlog is thread-safe)."""
    log.info("server certificate reloaded; new connections get it, open ones keep theirs", listener=listener)
    if expiring := expiry_warning(material.cert, datetime.now(UTC)):
        log.warning("server certificate", detail=expiring, listener=listener)


def _certificate_not_reloaded(listener: str, why: str) -> None:
    log.error(
        "TLS files changed but do not load; the previous certificate stays in force", error=why, listener=listener
    )


def _register_gauges(metrics: Metrics, governor: Governor) -> None:
    def runs_by_state() -> LabelValues:
        counts: LabelValues = {(str(s),): 0.0 for s in RunState}
        for run in governor.core.registry.runs.values():
            counts[(str(run.policy.state),)] += 1
        return counts

    def streams() -> LabelValues:
        return {(): float(len(governor.core.streams))}

    metrics.add_state_gauge(
        StateGauge("governor_runs", "Runs known to the daemon, by state.", ("state",), runs_by_state)
    )
    metrics.add_state_gauge(StateGauge("governor_active_streams", "Open Attach streams.", (), streams))

    def stalled_ranks() -> LabelValues:
        return {(): float(sum(len(run.policy.roster.stalled) for run in governor.core.registry.runs.values()))}

    metrics.add_state_gauge(
        StateGauge("governor_stalled_ranks", "Ranks marked STALLED (no progress), over every run.", (), stalled_ranks)
    )


def _grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    """The gRPC server's channel options for these settings."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", max(settings.max_message_bytes, 4 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),
        # Connections cannot pile up: an unfinished handshake and a connection without calls are closed,
        # keepalive pings find dead peers of open streams, and one connection has a bounded number of calls.
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.idle_connection_s * 1000)),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def _log_security_notes(settings: ServeSettings) -> None:
    """Log what an operator should know about the security settings (insecure ones, an expiring certificate,
    how mTLS subjects get their roles)."""
    for warning in settings.warnings:
        log.warning("insecure setting", detail=warning)
    if settings.tls_cert is not None and (expiring := expiry_warning(settings.tls_cert, datetime.now(UTC))):
        log.warning("server certificate", detail=expiring)
    if settings.tls_client_ca is not None and settings.tokens is not None:
        log.info(
            "mTLS: a client certificate's subject (CN) takes its role from the tokens file; "
            "subjects not listed there are refused",
            subjects=len(settings.tokens),
        )


class GovernorServer:
    """The daemon's servers around one Governor: start, then stop (from the same event loop)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.governor = build_governor(settings)
        self.metrics = Metrics(per_run=settings.metrics_per_run)
        self.governor.metrics = self.metrics
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.metrics_server: MetricsServer | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._stop_ticks = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self.ingest = VitalsIngest(
            self.governor, share=settings.vitals_share, shed_after_s=settings.shed_after_ms / 1000.0
        )
        self.interceptor: AuthInterceptor | None = None
        self.notifier: Notifier | None = None
        self.certificates: CertificateReloader | None = None

    async def start(self) -> None:
        """Open the journal, listen, mark SERVING. Raises JournalCorruptError, OSError, RuntimeError (and
        NotifyUrlError for an unusable notify_url that settings did not validate)."""
        settings, governor = self.settings, self.governor
        self._start_notifier()  # first: a bad URL (NotifyUrlError) stops start-up before anything opens
        try:
            recovery = await governor.start()
        except BaseException:
            await self._close_notifier()
            raise
        governor.committer.on_commit = self.metrics.fsync_latency.observe
        for note in recovery.moved_aside:
            log.warning("journal tail moved aside", detail=note)
        _register_gauges(self.metrics, governor)
        _raise_open_files_limit()
        _log_security_notes(settings)
        server = self._build_server()
        self.ingest.start()
        try:
            self.port = self._listen(server)
            self._start_metrics_server()
        except (RuntimeError, OSError):
            await self.ingest.stop()
            await governor.close("could not listen")
            await self._close_notifier()
            raise
        if settings.tls_cert is not None or settings.metrics_tls_cert is not None:
            self.metrics.add_state_gauge(
                StateGauge(
                    "governor_tls_cert_not_after_seconds",
                    "When the served TLS certificate expires (Unix time), by listener (grpc, metrics).",
                    ("listener",),
                    self._certificate_expiry,
                )
            )
        self.server = server
        await server.start()
        await self._serving()

    def _build_server(self) -> grpc.aio.Server:
        """The gRPC server with its interceptor, the two services, health and reflection (not listening yet)."""
        settings, governor = self.settings, self.governor
        self.interceptor = AuthInterceptor(settings.tokens, settings.tls_client_ca is not None, governor.auth_failure)
        server = grpc.aio.server(options=_grpc_options(settings), interceptors=[self.interceptor])
        trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(governor, self.ingest), server)
        control_service_pb2_grpc.add_ControlServiceServicer_to_server(ControlServicer(governor), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        return server

    def _listen(self, server: grpc.aio.Server) -> int:
        """Add the listening port (TLS when configured) and return it. Raises RuntimeError/OSError."""
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return server.add_insecure_port(settings.listen)
        if settings.tls_files is not None:
            # Files on disk (cert-manager renews them): re-read when they change, no restart needed.
            self.certificates = CertificateReloader(
                settings.tls_files,
                TlsMaterial(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
                on_reload=functools.partial(_certificate_reloaded, "grpc"),
                on_error=functools.partial(_certificate_not_reloaded, "grpc"),
            )
            credentials = self.certificates.credentials()
        else:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key, settings.tls_cert)],
                root_certificates=settings.tls_client_ca,
                require_client_auth=settings.tls_client_ca is not None,
            )
        return server.add_secure_port(settings.listen, credentials)

    def _start_metrics_server(self) -> None:
        """Serve /metrics unless metrics_listen is off. Raises RuntimeError/OSError."""
        settings = self.settings
        if settings.metrics_listen in ("off", ""):
            return
        host, mport = parse_address("metrics_listen", settings.metrics_listen)
        self.metrics_server = MetricsServer(self.metrics, asyncio.get_running_loop())
        tls = None
        if settings.metrics_tls_cert is not None and settings.metrics_tls_key is not None:
            tls = TlsFiles(settings.metrics_tls_cert, settings.metrics_tls_key)
        self.metrics_port = self.metrics_server.start(
            host,
            mport,
            tls,
            on_reload=functools.partial(_certificate_reloaded, "metrics"),
            on_error=functools.partial(_certificate_not_reloaded, "metrics"),
        )

    async def _serving(self) -> None:
        """Mark SERVING, write the port file, start the ticks and say so."""
        settings, governor = self.settings, self.governor
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if settings.port_file is not None:
            _write_atomically(settings.port_file, f"{self.port}\n")
        self._ticker = asyncio.create_task(_tick_loop(governor, settings.tick_interval_s, self._stop_ticks))
        log.info(
            "governor serving",
            listen=settings.listen,
            port=self.port,
            metrics_port=self.metrics_port,
            data_dir=str(settings.data_dir),
            runs_restored=len(governor.core.registry.runs),
            notify_url=self.notifier.shown_url if self.notifier is not None else None,
        )

    def _start_notifier(self) -> None:
        """The --notify-url sink, fed by the Governor's decision log (and its journal failure)."""
        settings = self.settings
        if not settings.notify_url:
            return
        counter = self.metrics.notifications
        self.notifier = Notifier(
            settings.notify_url,
            max_queued=settings.notify_max_queued,
            timeout_s=settings.notify_timeout_s,
            on_outcome=lambda outcome, n: counter.labels(outcome=outcome).inc(n),
        )
        self.governor.decisions.notify = self.notifier.submit
        host = urllib.parse.urlsplit(settings.notify_url).hostname or ""
        if settings.notify_url.startswith("http://") and not is_loopback(host):
            log.warning(
                "insecure setting",
                detail=f"notify_url {self.notifier.shown_url} is plain http: events and the URL cross the network "
                "unencrypted; use https",
            )

    async def _close_notifier(self) -> None:
        """Give queued notifications their drain time, off the event loop."""
        if self.notifier is not None:
            await asyncio.to_thread(self.notifier.close)

    def _certificate_expiry(self) -> LabelValues:
        """notAfter of each certificate served now (gRPC's: the reloaded one after a rotation)."""
        grpc_pem = self.certificates.current.cert if self.certificates is not None else self.settings.tls_cert
        metrics_tls = self.metrics_server.certificates if self.metrics_server is not None else None
        metrics_pem = metrics_tls.current.cert if metrics_tls is not None else None
        out: LabelValues = {}
        for listener, pem in (("grpc", grpc_pem), ("metrics", metrics_pem)):
            with contextlib.suppress(CertificateError):
                if pem is not None:
                    out[(listener,)] = not_after(pem).timestamp()
        return out

    def reload_tokens(self) -> None:
        """SIGHUP: read the tokens file again; a file that does not load leaves the current tokens in force."""
        path = self.settings.tokens_path
        if path is None or self.interceptor is None:
            log.info("SIGHUP ignored: no tokens file")
            return
        try:
            tokens = Tokens.load(path)
        except TokensFileError as exc:
            log.error("tokens file not reloaded; the previous tokens stay in force", error=str(exc))
            return
        self.interceptor.tokens = tokens
        log.info("tokens reloaded", tokens_file=str(path), entries=len(tokens))

    async def stop(self) -> None:
        """Health NOT_SERVING, streams told to end, server stopped within the grace, journal flushed."""
        log.info("shutting down: health NOT_SERVING, ending streams")
        await self.health.enter_graceful_shutdown()
        self.governor.begin_stop("daemon shutting down; reconnect later")
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        await self.ingest.stop()
        self._stop_ticks.set()
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
        await self.governor.close()
        await self._close_notifier()
        log.info("governor stopped; journal flushed")


async def serve(settings: ServeSettings) -> int:
    """Run the daemon until SIGTERM or SIGINT. Returns the exit code.

    SIGQUIT (or a crash) writes every thread's Python stack to stderr: what an operator needs when the
    daemon hangs.
    """
    faulthandler.enable()
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    daemon = GovernorServer(settings)
    # Handlers first: a SIGTERM that arrives while the daemon starts (its port file may already be written)
    # stops it cleanly once it has started, instead of killing it mid-start.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_tokens)
    try:
        await daemon.start()
    except JournalCorruptError as exc:
        log.error("journal corrupt; not starting", error=str(exc))
        return ExitCode.USAGE
    except JournalLockedError as exc:
        log.error("data dir in use; not starting", error=str(exc))
        return ExitCode.USAGE
    except (OSError, RuntimeError) as exc:
        log.error(
            "cannot start",
            listen=settings.listen,
            metrics_listen=settings.metrics_listen,
            data_dir=str(settings.data_dir),
            error=str(exc),
        )
        return ExitCode.USAGE
    # Everything allocated so far (modules, the restored registry) lives as long as the process: out of the
    # collector's sight, a full collection under load pauses the event loop for a few ms instead of ~50 ms.
    gc.freeze()
    fatal = asyncio.ensure_future(daemon.governor.fatal.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({fatal, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (fatal, stopped):
        task.cancel()
    await daemon.stop()
    if daemon.governor.failure is not None:
        log.error("stopped after a journal write failure; restart recovers from the journal")
        return ExitCode.JOURNAL_FAILED
    return ExitCode.OK


async def _tick_loop(governor: Governor, interval_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set() and governor.failure is None:
        try:
            governor.handle(ev.Tick(governor.now()))
        except Exception:  # a bug in one tick must not stop the daemon's clocks
            log.exception("tick failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def _raise_open_files_limit() -> None:
    """Use every file descriptor the hard limit allows (the soft default, often 1024, is a few hundred
    connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open files limit raised", soft=soft, now=hard)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
