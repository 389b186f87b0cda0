"""The metrics endpoint of a real daemon, scraped over HTTP: exact values, every series from start, process
and build-info series, only /metrics served, per-run series bounded."""

from __future__ import annotations

import argparse
import gzip
import http.client
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from governor_daemon.testing import AttachClient, InProcessDaemon
from tolaria.governor.v1 import control_service_pb2

EVERY_PANIC_RULE = (
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
"""Every rule that can PANIC: its series exists from start (the step rules' appeared after their first panic)."""

README_METRICS = (
    "governor_records_received_total",
    "governor_record_gaps_total",
    "governor_stale_records_total",
    "governor_late_records_total",
    "governor_verdicts_total",
    "governor_panics_total",
    "governor_commands_total",
    "governor_runs",
    "governor_active_streams",
    "governor_decision_latency_seconds",
    "governor_journal_fsync_seconds",
    "governor_auth_failures_total",
)


def get(
    port: int, path: str, method: str = "GET", accept: str = "", context: ssl.SSLContext | None = None
) -> tuple[int, str, str]:
    """(status, content type, body) of one request on a new connection (HTTPS with ``context``)."""
    conn = (
        http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        if context is None
        else http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    )
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, by (name, sorted labels); the parser rejects malformed text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    status, content_type, body = get(port, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4")
    return body, samples(body)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    with InProcessDaemon(tmp_path / "data", metrics_listen="127.0.0.1:0", metrics_per_run=2) as d:
        yield d


def metrics_port(daemon: InProcessDaemon) -> int:
    assert daemon.daemon is not None
    assert daemon.daemon.metrics_port is not None
    return daemon.daemon.metrics_port


def test_every_series_is_present_before_any_event(daemon: InProcessDaemon) -> None:
    """A fresh daemon exposes every README metric, each labelled counter at 0 for every known label value,
    process, Python and build-info series; nothing has happened yet."""
    body, values = scrape(metrics_port(daemon))
    families = {f.name for f in text_string_to_metric_families(body)}
    for name in README_METRICS:
        assert name.removesuffix("_total") in families, name
    zero = {
        ("governor_records_received_total", (("kind", "train"),)),
        ("governor_records_received_total", (("kind", "validation"),)),
        ("governor_record_gaps_total", ()),
        ("governor_stale_records_total", ()),
        ("governor_late_records_total", ()),
        *(("governor_verdicts_total", (("kind", k),)) for k in ("healthy", "anomaly", "panic")),
        *(("governor_panics_total", (("rule", r),)) for r in EVERY_PANIC_RULE),
        *(("governor_commands_total", (("outcome", "sent"), ("type", t))) for t in ("rollback", "halt", "resume")),
        *(("governor_commands_total", (("outcome", o), ("type", "any"))) for o in ("succeeded", "failed", "timeout")),
        *(("governor_auth_failures_total", (("code", c),)) for c in ("UNAUTHENTICATED", "PERMISSION_DENIED")),
        *(("governor_runs", (("state", s),)) for s in ("healthy", "anomaly", "rolling_back", "halted", "finished")),
        ("governor_active_streams", ()),
        ("governor_stalled_ranks", ()),
        ("governor_decision_latency_seconds_count", ()),
    }
    for key in zero:
        assert values.get(key) == 0, (key, values.get(key))
    assert ("governor_journal_fsync_seconds_count", ()) in values
    build = [labels for (name, labels), v in values.items() if name == "governor_build_info" and v == 1]
    assert len(build) == 1
    assert dict(build[0])["version"]
    assert dict(build[0])["python"].count(".") == 2
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert values[(name, ())] > 0, name
    assert any(name == "python_info" for name, _ in values)
    assert any(name == "python_gc_objects_collected_total" for name, _ in values)
    assert not any(name.startswith("governor_run_") for name, _ in values), "no run yet, no per-run series"
    assert not any(name == "governor_tls_cert_not_after_seconds" for name, _ in values), "no TLS, no expiry"


def test_only_metrics_is_served(daemon: InProcessDaemon) -> None:
    """Other paths are 404, other methods 405, HEAD has no body; OpenMetrics when asked for."""
    port = metrics_port(daemon)
    for path in ("/", "/metrics/", "/favicon.ico", "/metricsx", "/debug"):
        status, _, body = get(port, path)
        assert status == 404, path
        assert "governor_" not in body
    assert get(port, "/metrics", method="POST")[0] == 405
    status, _, body = get(port, "/metrics", method="HEAD")
    assert (status, body) == (200, "")
    assert get(port, "/metrics?x=1")[0] == 200
    status, content_type, body = get(port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_a_slow_client_is_cut_off_and_connections_are_bounded(daemon: InProcessDaemon) -> None:
    """Slowloris: a client that trickles its request one byte at a time (each byte inside the 5 s read timeout)
    is cut off at the connection deadline, and connections past the bound are closed unanswered instead of each
    taking a thread of the daemon; a scrape works again once they are gone."""
    import select

    port = metrics_port(daemon)
    assert daemon.daemon is not None
    assert daemon.daemon.metrics_server is not None
    server = daemon.daemon.metrics_server.server
    assert server is not None
    server.connection_deadline_s = 1.0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        cut_off = False
        for _ in range(100):  # 100 header bytes 0.2 s apart: 20 s, far past the 1 s deadline
            try:
                slow.sendall(b"X")
                ready, _, _ = select.select([slow], [], [], 0.2)
                if ready and slow.recv(4096) == b"":
                    cut_off = True
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
            if cut_off:
                break
        assert cut_off, "a trickling client kept its connection (and thread) past the deadline"
    # Its client saw the cut, but the server counts the connection until its handler's thread ends: bounding
    # connections before that would count it against the bound below.
    assert all_released(server), "the cut-off connection's thread never ended"

    server.connection_deadline_s = 60.0
    server.max_connections = 2
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            get(port, "/metrics")
    finally:
        for sock in idle:
            sock.close()
    assert all_released(server), "the idle connections' threads never ended"
    assert scrape(port)[1], "scrapes are served again once the idle connections are gone"


def all_released(server: Any) -> bool:
    """Wait until the metrics server holds no connection (each one's handler thread ended); False if one is
    still held after 60 s."""
    deadline = time.monotonic() + 60
    while server.num_connections:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def promtool_check(body: str) -> None:
    """`promtool check metrics` finds nothing to lint (where promtool is installed)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_exposition(daemon: InProcessDaemon) -> None:
    """`promtool check metrics` accepts a fresh daemon's exposition (the busy one's is checked below)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); the parser checks the text")
    promtool_check(scrape(metrics_port(daemon))[0])


def test_counts_past_a_million_are_exact_and_per_run_series_are_bounded(daemon: InProcessDaemon) -> None:
    """1,228,807 train records (300 full batches and one of 7) read back exactly (the hand-written text said
    1.22881e+06); with --metrics-per-run 2 a third run counts under run="other", and a forgotten run gives
    its slot to the next one."""
    port = metrics_port(daemon)
    big = AttachClient(daemon.address, "big-run")
    big.connect()
    batch = 4096
    step = 0
    for _ in range(300):
        steps = list(range(step, step + batch))
        step += batch
        big.vitals(steps, [0.5] * batch, [1.0] * batch)
    last = big.vitals(list(range(step, step + 7)), [0.5] * 7, [1.0] * 7)
    big.wait_ack(last, timeout_s=120)
    big.validation(step=step + 7, loss=0.5)
    big.next("verdict")
    body, values = scrape(port)
    total = 300 * batch + 7
    assert values[("governor_records_received_total", (("kind", "train"),))] == total
    assert f'governor_records_received_total{{kind="train"}} {total / 1e6}e+06' in body, "exact in the text too"
    assert values[("governor_run_records_received_total", (("kind", "train"), ("run", "big-run")))] == total
    assert values[("governor_verdicts_total", (("kind", "healthy"),))] == 1
    assert values[("governor_decision_latency_seconds_count", ())] == 1
    assert values[("governor_active_streams", ())] == 1

    others = []
    for run in ("second", "third", "fourth"):
        client = AttachClient(daemon.address, run)
        client.connect()
        client.validation(step=1, loss=0.5)
        client.next("verdict")
        others.append(client)
    body, values = scrape(port)
    promtool_check(body)
    verdicts = {
        dict(k)["run"]: v
        for (name, k), v in values.items()
        if name == "governor_run_verdicts_total" and dict(k)["kind"] == "healthy"
    }
    assert verdicts == {"big-run": 1, "second": 1, "other": 2}, "two runs labelled, the rest summed"
    for run in ("big-run", "second", "other"):  # a run's every per-run series exists from its first count
        assert values[("governor_run_verdicts_total", (("kind", "panic"), ("run", run)))] == 0
        for rule in EVERY_PANIC_RULE:
            assert values[("governor_run_panics_total", (("rule", rule), ("run", run)))] == 0
        assert values[("governor_run_commands_total", (("outcome", "timeout"), ("run", run), ("type", "any")))] == 0
    assert values[("governor_verdicts_total", (("kind", "healthy"),))] == 4
    assert values[("governor_runs", (("state", "healthy"),))] == 4

    big.close()
    deadline = time.monotonic() + 10
    while scrape(port)[1][("governor_active_streams", ())] != 3:
        assert time.monotonic() < deadline, "the stream never closed"
        time.sleep(0.05)
    others[0].control.ForgetRun(control_service_pb2.ForgetRunRequest(run_id="big-run", reason="test"), timeout=10)
    fifth = AttachClient(daemon.address, "fifth")
    fifth.connect()
    fifth.validation(step=1, loss=0.5)
    fifth.next("verdict")
    _, values = scrape(port)
    runs = {dict(k)["run"] for (name, k), v in values.items() if name.startswith("governor_run_")}
    assert runs == {"second", "fifth", "other"}, "big-run's series left with it; fifth took its slot"
    assert values[("governor_records_received_total", (("kind", "train"),))] == total, "aggregates keep counting"
    for client in (*others, fifth):
        client.close()


@pytest.mark.parametrize("value", ["-1", "10001", "many"])
def test_a_bad_per_run_bound_stops_start_up(tmp_path: Path, value: str) -> None:
    """--metrics-per-run outside 0..10000 (or not a number) is exit 2 naming the setting."""
    from tests.conftest import governor_cli

    result = governor_cli(
        ["serve", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--metrics-per-run", value]
    )
    assert result.returncode == 2
    assert "metrics_per_run" in result.stderr + result.stdout


def test_gzip_when_the_scraper_asks_for_it(daemon: InProcessDaemon) -> None:
    """prometheus_client's server compresses for `Accept-Encoding: gzip` (Prometheus asks for it) and
    not otherwise; both bodies hold the same series."""
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port(daemon), timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        raw = response.read()
        assert response.status == 200
        assert response.getheader("Content-Encoding") == "gzip"
        assert int(response.getheader("Content-Length") or -1) == len(raw)
    finally:
        conn.close()
    plain = get(metrics_port(daemon), "/metrics")[2]
    assert "Content-Encoding" not in plain
    assert set(samples(gzip.decompress(raw).decode())) == set(samples(plain))


def test_two_daemons_on_free_ports_start_side_by_side(tmp_path: Path) -> None:
    """Friction: with `--listen 127.0.0.1:0` the metrics still took the fixed 9464, so a second daemon
    failed to start. Without --metrics-listen they now take a free port each, logged on the serving line;
    an explicit --metrics-listen is kept."""
    from governor_daemon.daemon_process import DaemonProcess

    with (
        DaemonProcess(tmp_path / "one", metrics_listen=None) as one,
        DaemonProcess(tmp_path / "two", metrics_listen=None) as two,
    ):
        ports = [one.metrics_port(), two.metrics_port()]
        assert len(set(ports)) == 2, ports
        assert 9464 not in ports
        for port in ports:
            assert isinstance(port, int), "metrics are on"
            assert ("governor_active_streams", ()) in scrape(port)[1]
    from governor_daemon.settings import SettingsError, add_arguments, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def metrics_listen(*args: str, env: dict[str, str] | None = None) -> str:
        return resolve(parser.parse_args(["--data-dir", str(tmp_path / "d"), *args]), env=env or {}).metrics_listen

    assert metrics_listen("--listen", "127.0.0.1:0") == "127.0.0.1:0"
    assert metrics_listen("--listen", "127.0.0.1:50051") == "127.0.0.1:9464", "the documented default"
    assert metrics_listen("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:9999") == "127.0.0.1:9999"
    assert metrics_listen("--listen", "127.0.0.1:0", env={"GOVERNOR_METRICS_LISTEN": "off"}) == "off"
    with pytest.raises(SettingsError, match="metrics_listen"):
        metrics_listen("--listen", "127.0.0.1:0", "--metrics-listen", "9464")


def make_certificate(folder: Path, days: int) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 valid for ``days``, and its key."""
    from tests.conftest import openssl

    openssl(
        folder,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", "key.pem", "-out", "cert.pem", "-days", str(days), "-subj", "/CN=127.0.0.1"),
        *("-addext", "subjectAltName=IP:127.0.0.1"),
    )
    return folder / "cert.pem", folder / "key.pem"


def https_scrape(port: int, trusted: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of one scrape over a NEW HTTPS connection that trusts only the certificate ``trusted``."""
    status, _, body = get(port, "/metrics", context=ssl.create_default_context(cafile=str(trusted)))
    assert status == 200, body
    return samples(body)


def test_metrics_over_https_with_the_certificate_expiry(tmp_path: Path) -> None:
    """--metrics-tls-cert/--metrics-tls-key serve /metrics over HTTPS only (a plain request gets no
    metrics), and governor_tls_cert_not_after_seconds{listener="metrics"} is the certificate's notAfter. A
    client that connects and never starts its handshake holds up no one (prometheus_client's own
    start_http_server handshakes in its accept loop: one such client stops every scrape)."""
    from governor_daemon.certs import not_after

    cert, key = make_certificate(tmp_path, days=3)
    with (
        InProcessDaemon(
            tmp_path / "data", metrics_listen="127.0.0.1:0", metrics_tls_cert=cert, metrics_tls_key=key
        ) as d,
        socket.create_connection(("127.0.0.1", metrics_port(d)), timeout=10),  # connects, never says hello
    ):
        port = metrics_port(d)
        expiry = https_scrape(port, cert)[("governor_tls_cert_not_after_seconds", (("listener", "metrics"),))]
        assert expiry == not_after(cert.read_bytes()).timestamp()
        assert 2 * 86400 < expiry - time.time() <= 3 * 86400
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            get(port, "/metrics")


def test_the_metrics_certificate_rotates_without_a_restart(tmp_path: Path) -> None:
    """--metrics-tls-cert/--metrics-tls-key on a Secret-like volume (cert-manager renews it, the kubelet swaps
    the ..data symlink): the next scrape's connection gets the renewed certificate and the expiry gauge follows
    it; a half-done rotation (the old key beside the renewed certificate) keeps the renewed one in force."""
    from governor_daemon.certs import not_after
    from tests.integration.test_security import publish_secret

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_cert, old_key = make_certificate(tmp_path / "old", days=3)
    new_cert, new_key = make_certificate(tmp_path / "new", days=30)
    volume = tmp_path / "tls"
    volume.mkdir()
    publish_secret(volume, {"tls.crt": old_cert, "tls.key": old_key})
    expiry = ("governor_tls_cert_not_after_seconds", (("listener", "metrics"),))
    with InProcessDaemon(
        tmp_path / "data",
        metrics_listen="127.0.0.1:0",
        metrics_tls_cert=volume / "tls.crt",
        metrics_tls_key=volume / "tls.key",
    ) as d:
        port = metrics_port(d)
        assert https_scrape(port, old_cert)[expiry] == not_after(old_cert.read_bytes()).timestamp()

        publish_secret(volume, {"tls.crt": new_cert, "tls.key": new_key})
        assert https_scrape(port, new_cert)[expiry] == not_after(new_cert.read_bytes()).timestamp()

        publish_secret(volume, {"tls.crt": new_cert, "tls.key": old_key})
        assert https_scrape(port, new_cert)[expiry] == not_after(new_cert.read_bytes()).timestamp()


def test_a_bad_metrics_certificate_stops_start_up(tmp_path: Path) -> None:
    """A key without its certificate, or a pair that does not load, is exit 2 naming the settings."""
    from tests.conftest import governor_cli

    cert, key = make_certificate(tmp_path, days=3)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = make_certificate(other, days=3)
    base = ["serve", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0"]
    for extra, said in (
        (["--metrics-tls-key", str(key)], "metrics_tls_cert and metrics_tls_key go together"),
        (["--metrics-tls-cert", str(cert), "--metrics-tls-key", str(other_key)], "do not load as a pair"),
    ):
        result = governor_cli([*base, *extra])
        assert result.returncode == 2, result.stdout + result.stderr
        assert said in result.stdout + result.stderr


def test_every_rule_that_can_panic_has_its_series() -> None:
    """The metrics' rules are the policy's (a new Rule gets its governor_panics_total series from start), and
    they are the ones this file expects, in the dashboard's order."""
    from governor_daemon.metrics import PANIC_RULES

    assert PANIC_RULES == EVERY_PANIC_RULE
