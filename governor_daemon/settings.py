"""`governor serve` configuration: flags > GOVERNOR_* environment > TOML file > defaults.

Every setting is declared once in SETTINGS (name, type, default, help); the flag is ``--name`` with
dashes, the environment variable ``GOVERNOR_NAME``. ENV_VARS lists every variable this module reads.
Validation happens at start, with messages that name the setting and its sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import ssl
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from governor_daemon.core.state import Limits
from governor_daemon.errors import GovernorError, PolicyConfigError
from governor_daemon.notify import NotifyUrlError, check_url
from governor_daemon.policy import PolicyConfig, parse_assignments
from governor_daemon.policy.config import FIELD_NAMES
from governor_daemon.security import TlsFiles, TlsMaterial, Tokens, TokensFileError, is_loopback, read_tls


class SettingsError(GovernorError):
    """A configuration value is unusable; the message names the setting and the fix (exit 2)."""


@dataclass(frozen=True)
class Setting:
    """One setting: its name (snake_case), type, default and help."""

    name: str
    kind: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        """Its environment variable."""
        return "GOVERNOR_" + self.name.upper()

    @property
    def flag(self) -> str:
        """Its command-line flag."""
        return "--" + self.name.replace("_", "-")


_LIMITS = Limits()
"""The core's bounds: their defaults live in ``Limits``; the settings below that set them read them from there."""

SETTINGS: tuple[Setting, ...] = (
    Setting("listen", str, "127.0.0.1:50051", "gRPC listen address HOST:PORT (port 0 picks a free port)"),
    Setting("data_dir", Path, Path("governor-data"), "journal directory"),
    Setting(
        "metrics_listen",
        str,
        "127.0.0.1:9464",
        "Prometheus metrics address HOST:PORT, or 'off' (unset while --listen has port 0: 127.0.0.1:0, a free port)",
    ),
    Setting(
        "metrics_per_run",
        int,
        0,
        "per-run series (governor_run_*, a run label) for at most N runs at once, the rest as run=other (0: off)",
    ),
    Setting("metrics_tls_cert", str, "", "PEM certificate chain: /metrics over HTTPS (reread on change; empty: HTTP)"),
    Setting("metrics_tls_key", str, "", "PEM private key of metrics_tls_cert"),
    Setting("policy", str, "", "default policy for new runs, comma-separated KEY=VALUE pairs"),
    Setting("lock_policy_fields", str, "", "comma-separated policy fields trainers may not override"),
    Setting("segment_bytes", int, 64 * 1024 * 1024, "journal segment size in bytes"),
    Setting("group_commit_ms", float, 2.0, "group commit window for ordinary journal entries (ms)"),
    Setting("vitals_share", float, 0.35, "largest share of the event loop that judging train-step records takes"),
    Setting(
        "shed_after_ms",
        float,
        500.0,
        "a train-step batch waiting longer than this is shed: non-finite check only, no statistical detectors (ms)",
    ),
    Setting("max_active_runs", int, _LIMITS.max_active_runs, "runs not FINISHED that may exist at once"),
    Setting("retain_finished_runs", int, _LIMITS.retain_finished_runs, "FINISHED runs kept in memory for queries"),
    Setting(
        "max_active_runs_per_principal",
        int,
        _LIMITS.max_active_runs_per_principal,
        "runs not FINISHED that one identity may own at once",
    ),
    Setting(
        "idle_run_expiry_s",
        float,
        _LIMITS.idle_run_expiry_s,
        "a run with no trainer attached this long leaves memory (0: never)",
    ),
    Setting("max_records_per_batch", int, _LIMITS.max_records_per_batch, "train-step records per VitalsBatch"),
    Setting(
        "journal_train_records",
        int,
        _LIMITS.journal_train_records,
        "until a run has sent this many records, its vitals entries keep every train-step record (for "
        "`governor audit export`), not only batch summaries (0: never)",
    ),
    Setting("max_message_bytes", int, 1024 * 1024, "largest gRPC message accepted (bytes)"),
    Setting("hmac_key_file", str, "", "file holding a key for HMAC-SHA-256 journal hashes (empty: plain SHA-256)"),
    Setting("log_format", str, "auto", "auto (JSON unless stdout is a TTY), json or console"),
    Setting("shutdown_grace_s", float, 5.0, "seconds open RPCs get to finish on SIGTERM (below 10)"),
    Setting("handshake_timeout_s", float, 5.0, "a connection that has not completed its TLS/HTTP2 handshake is closed"),
    Setting("idle_connection_s", float, 300.0, "a connection without an open call this long is closed"),
    Setting("max_streams_per_connection", int, 64, "concurrent calls on one connection"),
    Setting("port_file", str, "", "write the bound gRPC port to this file once serving"),
    Setting("tick_interval_s", float, 0.25, "how often deadlines, stalls and command timeouts are checked"),
    Setting("tokens_file", str, "", "file of 'name role token' lines; without it auth is off (loopback only)"),
    Setting("tls_cert", str, "", "PEM certificate chain of the server (enables TLS)"),
    Setting("tls_key", str, "", "PEM private key of the server"),
    Setting("tls_client_ca", str, "", "PEM CA bundle; clients must present a certificate it signed (mTLS)"),
    Setting(
        "notify_url",
        str,
        "",
        "http(s) URL that gets a JSON event (with a Slack-compatible 'text') on ROLLBACK, HALT, STALLED and "
        "journal failure; a secret (a Slack webhook URL is one): prefer GOVERNOR_NOTIFY_URL or the TOML file, "
        "as ps shows flags; logs show only its scheme and host (empty: off)",
    ),
    Setting("notify_timeout_s", float, 5.0, "timeout of one notification POST; failures are retried with backoff"),
    Setting("notify_max_queued", int, 1000, "notifications waiting at most; beyond, the oldest is dropped (counted)"),
)
ENV_VARS: tuple[str, ...] = ("GOVERNOR_CONFIG", "GOVERNOR_INSECURE", *(s.env for s in SETTINGS))
"""Every environment variable `governor serve` reads."""


@dataclass(frozen=True)
class ServeSettings:
    """Validated settings of `governor serve`."""

    listen: str
    data_dir: Path
    metrics_listen: str
    metrics_per_run: int
    policy_defaults: PolicyConfig
    lock_policy_fields: tuple[str, ...]
    segment_bytes: int
    group_commit_ms: float
    vitals_share: float
    shed_after_ms: float
    max_active_runs: int
    retain_finished_runs: int
    max_active_runs_per_principal: int
    idle_run_expiry_s: float
    max_records_per_batch: int
    max_message_bytes: int
    hmac_key: bytes | None
    log_format: str
    shutdown_grace_s: float
    handshake_timeout_s: float
    idle_connection_s: float
    max_streams_per_connection: int
    port_file: Path | None
    tick_interval_s: float
    metrics_tls_cert: Path | None = None
    metrics_tls_key: Path | None = None
    journal_train_records: int = _LIMITS.journal_train_records
    notify_url: str = ""
    notify_timeout_s: float = 5.0
    notify_max_queued: int = 1000
    repair: bool = False
    sources: dict[str, str] = field(default_factory=dict)
    tokens: Tokens | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    insecure: bool = False
    tokens_path: Path | None = None
    tls_files: TlsFiles | None = None
    """The TLS files' paths: the server reads them again when they change (certificate rotation)."""
    warnings: tuple[str, ...] = ()
    """Things an operator should fix that do not stop the daemon; logged at start."""

    def limits(self) -> Limits:
        """The core's bounds that these settings set (the rest keep ``Limits``' defaults)."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits) if hasattr(self, f.name)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting's flag (default None: unset flags fall through to env, file, default)."""
    parser.add_argument("--config", type=Path, help="TOML file with settings (also GOVERNOR_CONFIG)")
    for s in SETTINGS:
        if s.name == "policy":
            parser.add_argument("--policy", action="append", metavar="KEY=VALUE", help=s.help + "; repeatable")
            continue
        parser.add_argument(
            s.flag, default=None, metavar=s.name.upper(), help=f"{s.help} [{s.env}; default {s.default}]"
        )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback listen address without tokens or mTLS [GOVERNOR_INSECURE=1]",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="move a corrupt journal tail aside (never deleted) instead of refusing to start",
    )


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeSettings:
    """Merge flags, environment and the TOML file; validate. Raises SettingsError."""
    env = os.environ if env is None else env
    config_path = args.config or (Path(env["GOVERNOR_CONFIG"]) if env.get("GOVERNOR_CONFIG") else None)
    file_values: dict[str, Any] = {}
    file_policy: dict[str, Any] = {}
    if config_path is not None:
        try:
            data = tomllib.loads(config_path.read_text())
        except OSError as exc:
            raise SettingsError(f"cannot read --config {config_path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"--config {config_path} is not valid TOML: {exc}") from None
        file_policy = dict(data.pop("policy", {}) or {})
        known = {s.name for s in SETTINGS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(
                f"{config_path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        file_values = data
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.name)
        if s.name == "policy" and flag_value:
            flag_value = ",".join(flag_value)
        if flag_value is not None:
            raw, source = flag_value, s.flag
        elif env.get(s.env) is not None:
            raw, source = env[s.env], s.env
        elif s.name in file_values:
            raw, source = file_values[s.name], f"{config_path} ({s.name})"
        else:
            raw, source = s.default, "default"
        values[s.name] = _convert(s, raw, source)
        sources[s.name] = source
    insecure = bool(args.insecure) or env.get("GOVERNOR_INSECURE", "").lower() in ("1", "true", "yes")
    settings = _validate(values, sources, file_policy, bool(args.repair))
    return _security(settings, values, insecure)


def _read_pem(name: str, value: str) -> bytes | None:
    if not value:
        return None
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read {name} {value}: {exc.strerror or exc}") from None


def _security(settings: ServeSettings, values: dict[str, Any], insecure: bool) -> ServeSettings:
    tokens = _tokens(values)
    tls = _tls(values, tokens)
    tls_files, material = tls if tls is not None else (None, None)
    client_ca = material.client_ca if material is not None else None
    host, _ = parse_address("listen", values["listen"])
    if tokens is None and client_ca is None and not is_loopback(host) and not insecure:
        raise SettingsError(
            f"listen {values['listen']} is not a loopback address and no tokens_file (or mTLS) is set: anyone who "
            "can reach it could halt your runs. Set --tokens-file, or --tls-client-ca, or pass --insecure"
        )
    open_to_all = not is_loopback(host) and tokens is None and client_ca is None
    return dataclasses.replace(
        settings,
        tokens=tokens,
        tls_cert=material.cert if material is not None else None,
        tls_key=material.key if material is not None else None,
        tls_client_ca=client_ca,
        insecure=insecure,
        tokens_path=Path(values["tokens_file"]) if values["tokens_file"] else None,
        tls_files=tls_files,
        warnings=tuple(_security_warnings(values, insecure and open_to_all)),
    )


def _tokens(values: dict[str, Any]) -> Tokens | None:
    """The tokens_file's callers, or None without one."""
    try:
        return Tokens.load(Path(values["tokens_file"])) if values["tokens_file"] else None
    except TokensFileError as exc:
        raise SettingsError(str(exc)) from None


def _tls(values: dict[str, Any], tokens: Tokens | None) -> tuple[TlsFiles, TlsMaterial] | None:
    """tls_cert, tls_key and tls_client_ca, checked to go together and to load; None without TLS."""
    cert, key = _read_pem("tls_cert", values["tls_cert"]), _read_pem("tls_key", values["tls_key"])
    client_ca = _read_pem("tls_client_ca", values["tls_client_ca"])
    if (cert is None) != (key is None):
        raise SettingsError("tls_cert and tls_key go together: set both (or neither)")
    if client_ca is not None and cert is None:
        raise SettingsError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    if client_ca is not None and tokens is None:
        raise SettingsError(
            "tls_client_ca (mTLS) needs tokens_file: each certificate subject (CN) gets its role from a "
            "'name role token' line, and a certificate whose subject is not listed is refused"
        )
    if cert is None:
        return None
    tls_files = TlsFiles(
        Path(values["tls_cert"]),
        Path(values["tls_key"]),
        Path(values["tls_client_ca"]) if values["tls_client_ca"] else None,
    )
    try:
        return tls_files, read_tls(tls_files)
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"tls_cert {values['tls_cert']} and tls_key {values['tls_key']} do not load as a pair "
            f"(or tls_client_ca is no PEM bundle): {exc}"
        ) from None


def _security_warnings(values: dict[str, Any], insecure_and_open: bool) -> list[str]:
    """What serve warns about at start: secret files others may read, a listen address open to anyone
    (``insecure_and_open``: --insecure on a non-loopback address without tokens or mTLS), run ids as labels
    on an unauthenticated /metrics."""
    warnings = [
        f"{name} {path} is readable by group or others (mode {mode:o}); chmod 600 it"
        for name, path in (("tokens_file", values["tokens_file"]), ("hmac_key_file", values["hmac_key_file"]))
        if path and (mode := stat.S_IMODE(Path(path).stat().st_mode)) & 0o077
    ]
    if insecure_and_open:
        warnings.append(f"--insecure: {values['listen']} is reachable without authentication; anyone can halt runs")
    if values["metrics_per_run"] and values["metrics_listen"] not in ("off", ""):
        # /metrics has no authentication: labelled series name every tenant's run ids to whoever reaches it
        warnings.append(
            f"--metrics-per-run {values['metrics_per_run']}: the run ids of every tenant are labels on "
            f"{values['metrics_listen']}/metrics, which has no authentication; keep that address private"
        )
    return warnings


def _convert(s: Setting, raw: Any, source: str) -> Any:
    try:
        if s.kind is Path:
            return Path(str(raw))
        if s.kind is int and not isinstance(raw, bool):
            return int(raw)
        if s.kind is float and not isinstance(raw, bool):
            return float(raw)
        if s.kind is str:
            return str(raw)
    except (TypeError, ValueError):
        pass
    raise SettingsError(f"{s.name} from {source} must be a {s.kind.__name__}, got {raw!r}")


def parse_address(name: str, value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets); raises SettingsError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SettingsError(f"{name} must be HOST:PORT with a port in 0..65535, got {value!r}")
    return host.strip("[]"), int(port_text)


def _validate(
    values: dict[str, Any], sources: dict[str, str], file_policy: dict[str, Any], repair: bool
) -> ServeSettings:
    _check_metrics(values, sources)
    _check_limits(values, sources)
    _check_journal_and_load(values)
    _check_connections(values)
    _check_process(values)
    defaults = _policy_defaults(values, sources, file_policy)
    locked = _locked_policy_fields(values)
    key = _hmac_key(values)
    return ServeSettings(
        listen=values["listen"],
        data_dir=values["data_dir"],
        metrics_listen=values["metrics_listen"],
        metrics_per_run=values["metrics_per_run"],
        policy_defaults=defaults,
        lock_policy_fields=locked,
        segment_bytes=values["segment_bytes"],
        group_commit_ms=values["group_commit_ms"],
        vitals_share=values["vitals_share"],
        shed_after_ms=values["shed_after_ms"],
        max_active_runs=values["max_active_runs"],
        retain_finished_runs=values["retain_finished_runs"],
        max_active_runs_per_principal=values["max_active_runs_per_principal"],
        idle_run_expiry_s=values["idle_run_expiry_s"],
        max_records_per_batch=values["max_records_per_batch"],
        journal_train_records=values["journal_train_records"],
        max_message_bytes=values["max_message_bytes"],
        hmac_key=key,
        log_format=values["log_format"],
        handshake_timeout_s=values["handshake_timeout_s"],
        idle_connection_s=values["idle_connection_s"],
        max_streams_per_connection=values["max_streams_per_connection"],
        shutdown_grace_s=values["shutdown_grace_s"],
        port_file=Path(values["port_file"]) if values["port_file"] else None,
        tick_interval_s=values["tick_interval_s"],
        repair=repair,
        sources=sources,
        **_notify_settings(values, sources),
        **_metrics_tls_settings(values),
    )


def _check_metrics(values: dict[str, Any], sources: dict[str, str]) -> None:
    """metrics_listen (on a free port when listen is, unless set) and metrics_per_run."""
    if parse_address("listen", values["listen"])[1] == 0 and sources["metrics_listen"] == "default":
        # A daemon on a free port gets its metrics on a free port too (logged at start): a second one on the
        # same machine would not start on the fixed 9464.
        values["metrics_listen"] = "127.0.0.1:0"
    if values["metrics_listen"] not in ("off", ""):
        parse_address("metrics_listen", values["metrics_listen"])
    if not 0 <= values["metrics_per_run"] <= 10000:
        raise SettingsError(
            f"metrics_per_run must be in 0..10000 (runs labelled at once), got {values['metrics_per_run']}"
        )


def _check_limits(values: dict[str, Any], sources: dict[str, str]) -> None:
    """What the daemon keeps and accepts: runs, records, messages, journal segments."""
    if values["idle_run_expiry_s"] < 0:
        raise SettingsError(f"idle_run_expiry_s must be >= 0, got {values['idle_run_expiry_s']}")
    names = ("segment_bytes", "max_active_runs", "max_active_runs_per_principal", "max_records_per_batch")
    for name in (*names, "max_message_bytes"):
        if values[name] < 1:
            raise SettingsError(f"{name} from {sources[name]} must be >= 1, got {values[name]}")
    if values["segment_bytes"] < 4096:
        raise SettingsError(f"segment_bytes must be >= 4096, got {values['segment_bytes']}")
    if values["retain_finished_runs"] < 0:
        raise SettingsError("retain_finished_runs must be >= 0")
    if values["journal_train_records"] < 0:
        raise SettingsError(f"journal_train_records must be >= 0, got {values['journal_train_records']}")


def _check_journal_and_load(values: dict[str, Any]) -> None:
    """The journal's group commit and the load shedding in front of it."""
    if not 0 <= values["group_commit_ms"] <= 1000:
        raise SettingsError(f"group_commit_ms must be in 0..1000, got {values['group_commit_ms']}")
    if not 0.05 <= values["vitals_share"] <= 1:
        raise SettingsError(f"vitals_share must be in [0.05, 1], got {values['vitals_share']}")
    if not 1 <= values["shed_after_ms"] <= 3_600_000:
        raise SettingsError(f"shed_after_ms must be in [1, 3600000], got {values['shed_after_ms']}")


def _check_connections(values: dict[str, Any]) -> None:
    """The handshake and idle timeouts of a connection and its streams."""
    for name in ("handshake_timeout_s", "idle_connection_s"):
        if not 0 < values[name] <= 86400:
            raise SettingsError(f"{name} must be in (0, 86400], got {values[name]}")
    if values["max_streams_per_connection"] < 1:
        raise SettingsError("max_streams_per_connection must be >= 1")


def _check_process(values: dict[str, Any]) -> None:
    """The daemon process: its shutdown grace, its tick and its log format."""
    if not 0 <= values["shutdown_grace_s"] < 10:
        raise SettingsError(f"shutdown_grace_s must be in [0, 10), got {values['shutdown_grace_s']}")
    if not 0 < values["tick_interval_s"] <= 60:
        raise SettingsError(f"tick_interval_s must be in (0, 60], got {values['tick_interval_s']}")
    if values["log_format"] not in ("auto", "json", "console"):
        raise SettingsError(f"log_format must be auto, json or console, got {values['log_format']!r}")


def _policy_defaults(values: dict[str, Any], sources: dict[str, str], file_policy: dict[str, Any]) -> PolicyConfig:
    """The config file's [policy] table, then the policy setting's assignments, over the built-in defaults."""
    try:
        overrides = dict(file_policy)
        pairs = [p for p in values["policy"].split(",") if p.strip()]
        overrides.update(parse_assignments(pairs))
        defaults, _ = PolicyConfig().merged(overrides)
    except PolicyConfigError as exc:
        raise SettingsError(f"policy ({sources['policy']}): {exc}") from None
    return defaults


def _locked_policy_fields(values: dict[str, Any]) -> tuple[str, ...]:
    locked = tuple(f.strip() for f in values["lock_policy_fields"].split(",") if f.strip())
    unknown = sorted(set(locked) - set(FIELD_NAMES))
    if unknown:
        raise SettingsError(
            f"lock_policy_fields names unknown field(s) {', '.join(unknown)}; valid: {', '.join(FIELD_NAMES)}"
        )
    return locked


def _hmac_key(values: dict[str, Any]) -> bytes | None:
    """The hmac_key_file's key (at least 16 bytes), or None without one."""
    if not values["hmac_key_file"]:
        return None
    try:
        key = Path(values["hmac_key_file"]).read_bytes().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read hmac_key_file {values['hmac_key_file']}: {exc.strerror or exc}") from None
    if len(key) < 16:
        raise SettingsError("the HMAC key must be at least 16 bytes")
    return key


def _metrics_tls_settings(values: dict[str, Any]) -> dict[str, Any]:
    """metrics_tls_cert and metrics_tls_key, checked to load as a pair."""
    cert, key = values["metrics_tls_cert"], values["metrics_tls_key"]
    if not cert and not key:
        return {}
    if not cert or not key:
        raise SettingsError("metrics_tls_cert and metrics_tls_key go together: set both (or neither)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is one
        raise SettingsError(
            f"metrics_tls_cert {cert} and metrics_tls_key {key} do not load as a pair: {exc.strerror or exc}"
        ) from None
    return {"metrics_tls_cert": Path(cert), "metrics_tls_key": Path(key)}


def _notify_settings(values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """The notify_* settings, validated (messages never show the URL: it is a secret)."""
    url = values["notify_url"].strip()
    if url:
        try:
            check_url(url)
        except NotifyUrlError as exc:
            raise SettingsError(f"{exc} (from {sources['notify_url']})") from None
    if not 0 < values["notify_timeout_s"] <= 300:
        raise SettingsError(f"notify_timeout_s must be in (0, 300], got {values['notify_timeout_s']}")
    if not 1 <= values["notify_max_queued"] <= 1_000_000:
        raise SettingsError(f"notify_max_queued must be in 1..1000000, got {values['notify_max_queued']}")
    return {
        "notify_url": url,
        "notify_timeout_s": values["notify_timeout_s"],
        "notify_max_queued": values["notify_max_queued"],
    }


def settings_for(data_dir: Path, **overrides: Any) -> ServeSettings:
    """Default settings for ``data_dir`` (no environment, no file) with field overrides; for embedding."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = resolve(parser.parse_args(["--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]), env={})
    return dataclasses.replace(base, **overrides)
