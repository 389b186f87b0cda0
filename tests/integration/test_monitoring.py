"""The monitoring kit (deploy/components/monitoring) on real runs: each alert of the PrometheusRule fires on
the metrics scraped from a real daemon going through what it names (a rollback storm and HALT, a stalled rank,
shedding, a journal write failure and restarts, a certificate close to expiry) and stays quiet before it, as
`promtool test rules` evaluates it; the component renders with `kubectl kustomize`; the lint catches a broken
expression with promtool and without it.

A scrape becomes one sample per series at the next step of virtual time (``interval`` apart); a failed scrape
is ``up 0``. Timestamps (process start, certificate expiry) are shifted with the clock: virtual time 0 is the
first scrape's wall-clock time.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient, InProcessDaemon
from tests.conftest import REPO
from tests.integration.conftest import warm_up
from tests.integration.test_metrics import make_certificate
from tolaria.governor.v1 import common_pb2

sys.path.insert(0, str(REPO / "deploy"))
import check_monitoring

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it where it can)",
)
TIMESTAMPS = ("process_start_time_seconds", "governor_tls_cert_not_after_seconds")
"""Metrics whose values are Unix times: shifted with the clock."""
TARGET = {"job": "tolaria-governor", "namespace": "ml"}
"""The labels the ServiceMonitor's scrape adds (besides pod)."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_once(port: int) -> Samples | None:
    """Every sample of one scrape, or None when nothing answers."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read().decode()
        finally:
            conn.close()
    except (ConnectionError, http.client.HTTPException):
        return None
    assert response.status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


@dataclass
class Scrapes:
    """Scrapes of governors (by pod name), in order; index i is at virtual time i * interval_s."""

    interval_s: int
    steps: list[dict[str, Samples | None]] = field(default_factory=list)
    start: float | None = None

    def take(self, **pods: int | None) -> dict[str, Samples | None]:
        """One step: scrape each pod's metrics port (None: the pod is down)."""
        if self.start is None:
            self.start = time.time()
        step = {pod: (scrape_once(port) if port is not None else None) for pod, port in pods.items()}
        self.steps.append(step)
        return step

    @property
    def now_s(self) -> int:
        """Virtual time of the last step."""
        return (len(self.steps) - 1) * self.interval_s

    def input_series(self) -> list[dict[str, str]]:
        """promtool's input_series: every series seen, '_' where a step lacks it, and up per pod."""
        assert self.start is not None
        pods = sorted({pod for step in self.steps for pod in step})
        out = []
        for pod in pods:
            labels = {**TARGET, "pod": pod, "instance": f"{pod}:9464"}
            keys = sorted({key for step in self.steps if (s := step.get(pod)) for key in s})
            up = " ".join("_" if pod not in step else "1" if step[pod] is not None else "0" for step in self.steps)
            out.append({"series": selector("up", labels), "values": up})
            for name, sample_labels in keys:
                values = []
                for step in self.steps:
                    samples = step.get(pod)
                    value = samples.get((name, sample_labels)) if samples is not None else None
                    if value is None:
                        values.append("_")
                        continue
                    if name in TIMESTAMPS:
                        value -= self.start
                    values.append("NaN" if math.isnan(value) else repr(float(value)))
                out.append({"series": selector(name, {**dict(sample_labels), **labels}), "values": " ".join(values)})
        return out


def selector(name: str, labels: dict[str, str]) -> str:
    inside = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return f"{name}{{{inside}}}"


def assert_alerts(tmp_path: Path, scrapes: Scrapes, checks: list[tuple[int, str, int]]) -> None:
    """`promtool test rules`: at each (virtual time, alert, count), ``count`` instances of the alert fire
    (0: none). The rules are the PrometheusRule's, unchanged."""
    assert PROMTOOL is not None
    (tmp_path / "rules.json").write_text(json.dumps(check_monitoring.rule_groups(check_monitoring.RULES)))
    tests = [
        {
            "expr": f'count(ALERTS{{alertname="{alert}", alertstate="firing"}})',
            "eval_time": f"{at}s",
            "exp_samples": [{"labels": "{}", "value": count}] if count else [],
        }
        for at, alert, count in checks
    ]
    suite = {
        "rule_files": ["rules.json"],
        "evaluation_interval": "15s",
        "tests": [
            {"interval": f"{scrapes.interval_s}s", "input_series": scrapes.input_series(), "promql_expr_test": tests}
        ],
    }
    (tmp_path / "alerts_test.json").write_text(json.dumps(suite))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.json"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def promtool_check_metrics(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def metrics_port(daemon: InProcessDaemon) -> int:
    assert daemon.daemon is not None
    assert daemon.daemon.metrics_port is not None
    return daemon.daemon.metrics_port


@needs_promtool
def test_rollback_storm_then_halt(tmp_path: Path) -> None:
    """Four NaN validations: three ROLLBACKs (the storm alert fires at the third, not the second), then the
    loop breaker's HALT (the halted alert fires, not before). Nothing fires while the run is healthy."""
    scrapes = Scrapes(interval_s=60)
    with InProcessDaemon(tmp_path / "data", metrics_listen="127.0.0.1:0") as daemon:
        port = metrics_port(daemon)
        client = AttachClient(daemon.address, "storm")
        client.connect()
        try:
            step = warm_up(client)
            scrapes.take(gov=port)
            healthy = scrapes.now_s
            at = {}
            for i in range(4):
                client.validation(step + 10 * (i + 1), math.nan)
                command = client.next("command").command
                client.wait_ack(client.result(command))
                scrapes.take(gov=port)
                at[i] = scrapes.now_s
            assert command.type == common_pb2.COMMAND_TYPE_HALT
            scrapes.take(gov=port)
            promtool_check_metrics(port)
        finally:
            client.close()
    assert_alerts(
        tmp_path,
        scrapes,
        [
            (healthy, "TolariaRollbackStorm", 0),
            (healthy, "TolariaRunHalted", 0),
            (at[1], "TolariaRollbackStorm", 0),  # two rollbacks
            (at[2], "TolariaRollbackStorm", 1),  # three
            (at[2], "TolariaRunHalted", 0),
            (at[3] + 60, "TolariaRunHalted", 1),
        ],
    )


@needs_promtool
def test_stalled_rank(tmp_path: Path) -> None:
    """Rank 1 of 2 stays silent past rank_deadline_s: governor_stalled_ranks goes to 1 and the alert fires
    after its minute, not while both ranks report."""
    scrapes = Scrapes(interval_s=30)
    overrides = {"rank_deadline_s": 0.2}
    with InProcessDaemon(tmp_path / "data", metrics_listen="127.0.0.1:0") as daemon:
        port = metrics_port(daemon)
        r0 = AttachClient(daemon.address, "two-ranks", rank=0, world_size=2, overrides=overrides)
        r1 = AttachClient(daemon.address, "two-ranks", rank=1, world_size=2, overrides=overrides)
        r0.connect()
        r1.connect()
        try:
            for client in (r0, r1):
                client.validation(10, 2.0)
            r0.next("verdict")
            scrapes.take(gov=port)
            assert scrapes.steps[-1]["gov"] is not None
            assert scrapes.steps[-1]["gov"][("governor_stalled_ranks", ())] == 0
            healthy = scrapes.now_s
            for step in (20, 30, 40):
                r0.validation(step, 2.0)
                r0.next("verdict")
            deadline = time.monotonic() + 20
            while (scrapes.take(gov=port)["gov"] or {}).get(("governor_stalled_ranks", ())) != 1:
                assert time.monotonic() < deadline, "rank 1 was never marked STALLED"
            stalled = scrapes.now_s
            for _ in range(3):
                scrapes.take(gov=port)
        finally:
            r0.close()
            r1.close()
    assert_alerts(
        tmp_path,
        scrapes,
        [
            (healthy, "TolariaRankStalled", 0),
            (stalled, "TolariaRankStalled", 0),
            (scrapes.now_s, "TolariaRankStalled", 1),
        ],
    )


@needs_promtool
def test_shedding(tmp_path: Path) -> None:
    """A daemon that may judge with 5 % of its loop and sheds after 1 ms, flooded between scrapes: records are
    shed at every step, and the alert fires once that has gone on for 5 minutes, not before."""
    scrapes = Scrapes(interval_s=60)
    shed = ("governor_records_shed_total", ())
    with InProcessDaemon(tmp_path / "data", metrics_listen="127.0.0.1:0", vitals_share=0.05, shed_after_ms=1.0) as d:
        port = metrics_port(d)
        client = AttachClient(d.address, "flood")
        client.connect()
        try:
            scrapes.take(gov=port)
            quiet = scrapes.now_s
            batch = 0
            last = 0.0
            flood = 50  # batches of 256 records; doubled after every flood the daemon judged in time
            while len(scrapes.steps) < 9:
                for _ in range(flood):
                    client.vitals(range(256 * batch, 256 * batch + 256), [1.0] * 256)
                    batch += 1
                client.wait_ack(client.seq, timeout_s=60)
                values = scrapes.take(gov=port)["gov"]
                assert values is not None
                if values[shed] == last:  # judged in time (a fast machine): not a step of shedding, flood harder
                    scrapes.steps.pop()
                    assert flood < 50 * 2**8, f"{flood} batches at once were all judged within 1 ms of arriving"
                    flood *= 2
                    continue
                last = values[shed]
        finally:
            client.close()
    assert_alerts(
        tmp_path,
        scrapes,
        [(quiet, "TolariaRecordsShed", 0), (4 * 60, "TolariaRecordsShed", 0), (scrapes.now_s, "TolariaRecordsShed", 1)],
    )


@needs_promtool
def test_journal_failure_then_restarts(tmp_path: Path) -> None:
    """A daemon whose disk fills up exits 8 (journal write failure): its metrics stop answering and the down
    alert fires after 2 minutes. Restarted twice on the same journal, the restarting alert fires; neither
    fires while the first daemon serves."""
    scrapes = Scrapes(interval_s=60)
    data = tmp_path / "data"
    with DaemonProcess(data, max_file_bytes=200_000, metrics_listen=None) as first:
        port = first.metrics_port()
        assert port is not None
        scrapes.take(gov=port)
        scrapes.take(gov=port)
        serving = scrapes.now_s
        client = AttachClient(first.address, "full")
        client.connect()
        try:
            for i in range(400):
                client.wait_ack(client.vitals(range(64 * i, 64 * i + 64), [0.5] * 64))
        except (grpc.RpcError, EOFError):  # the stream ends (UNAVAILABLE) when the journal fails
            pass
        finally:
            client.close()
        assert first.proc.wait(30) == 8, first.log_path.read_text()[-3000:]
        assert "journal write failed" in first.log_path.read_text()
    for _ in range(4):
        scrapes.take(gov=port)
    down = scrapes.now_s
    for _ in range(2):
        with DaemonProcess(data, metrics_listen=None) as again:
            scrapes.take(gov=again.metrics_port())
    assert all(step["gov"] is None for step in scrapes.steps[2:6])
    assert_alerts(
        tmp_path,
        scrapes,
        [
            (serving, "TolariaGovernorDown", 0),
            (serving, "TolariaGovernorRestarting", 0),
            (down - 120, "TolariaGovernorDown", 0),  # down for a minute: pending
            (down - 60, "TolariaGovernorDown", 1),
            (scrapes.now_s - 60, "TolariaGovernorRestarting", 0),  # one restart
            (scrapes.now_s, "TolariaGovernorRestarting", 1),  # two
        ],
    )


@needs_promtool
def test_certificate_expiry(tmp_path: Path) -> None:
    """Two governors with TLS: one certificate valid for 30 days (quiet), one for 3 (the alert fires for that
    one only)."""
    scrapes = Scrapes(interval_s=60)
    ports = {}
    daemons = []
    for pod, days in (("long", 30), ("short", 3)):
        folder = tmp_path / pod
        folder.mkdir()
        cert, key = make_certificate(folder, days)
        daemon = InProcessDaemon(
            folder / "data", metrics_listen="127.0.0.1:0", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()
        )
        daemons.append(daemon.__enter__())
        ports[pod] = metrics_port(daemon)
    try:
        for _ in range(2):
            step = scrapes.take(**ports)
        assert step["short"] is not None
        assert ("governor_tls_cert_not_after_seconds", (("listener", "grpc"),)) in step["short"]
    finally:
        for daemon in daemons:
            daemon.stop()
    assert_alerts(tmp_path, scrapes, [(scrapes.now_s, "TolariaCertificateExpiring", 1)])
    with open(tmp_path / "alerts_test.json") as f:
        series = [s["series"] for s in json.load(f)["tests"][0]["input_series"]]
    assert any("not_after" in s and 'pod="long"' in s for s in series), "the long one is there, and quiet"


def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay: the base with the monitoring component."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    deploy = REPO / "deploy"
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(deploy / 'base', overlay)}\n"
        f"components:\n  - {os.path.relpath(deploy / 'components' / 'monitoring', overlay)}\n"
    )
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    from ruamel.yaml import YAML

    return [doc for doc in YAML(typ="safe", pure=True).load_all(result.stdout) if doc]


def test_the_component_renders_and_points_at_the_governor(tmp_path: Path) -> None:
    """With kubectl kustomize: the ServiceMonitor selects the governor Service and names its metrics port,
    the PrometheusRule holds the checked rules, the dashboard ConfigMap carries Grafana's label and the JSON;
    every governor_* metric the rules and the dashboard use is one a real daemon (with TLS) exports."""
    objects = rendered(tmp_path)
    by_kind: dict[str, dict[str, Any]] = {str(o["kind"]): o for o in objects}
    spec = by_kind["ServiceMonitor"]["spec"]
    selected = [
        o
        for o in objects
        if o["kind"] == "Service" and spec["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
    ]
    assert [o["metadata"]["name"] for o in selected] == ["tolaria-governor"], "the governor's Service, only"
    service = selected[0]
    service_labels = service["metadata"]["labels"]
    assert service_labels[spec["jobLabel"]] == "tolaria-governor", "the job the rules select"
    assert [e["port"] for e in spec["endpoints"]] == ["metrics"]
    assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    assert by_kind["PrometheusRule"]["spec"] == check_monitoring.rule_groups(check_monitoring.RULES)
    dashboard = by_kind["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tolaria-governor.json"]) == json.loads(check_monitoring.DASHBOARD.read_text())

    cert, key = make_certificate(tmp_path, days=30)
    with InProcessDaemon(
        tmp_path / "data", metrics_listen="127.0.0.1:0", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()
    ) as daemon:
        exported = {name for name, _ in (scrape_once(metrics_port(daemon)) or {})}
    used = set()
    for text in [a["expr"] for a in check_monitoring.alerts(check_monitoring.RULES)] + [
        q for _, q in check_monitoring.dashboard_queries(check_monitoring.DASHBOARD)
    ]:
        used |= {word for word in _words(text) if word.startswith(("governor_", "process_"))}
    assert used, "the rules use the daemon's metrics"
    assert used <= exported, used - exported


def _words(text: str) -> list[str]:
    out, word = [], ""
    for char in text + " ":
        if char.isalnum() or char in "_:":
            word += char
        else:
            if word:
                out.append(word)
            word = ""
    return out


@pytest.mark.parametrize("with_promtool", [True, False])
def test_the_lint_catches_a_broken_expression(tmp_path: Path, with_promtool: bool) -> None:
    """deploy/check_monitoring.py passes on the shipped files and fails, naming the alert, on a rule whose
    expression does not parse: with promtool and with the PromQL parser (promtool off the PATH)."""
    if with_promtool and PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)} if not with_promtool else None
    script = REPO / "deploy" / "check_monitoring.py"
    ok = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ("promtool check rules" in ok.stdout) == with_promtool, ok.stdout
    broken = tmp_path / "prometheusrule.yaml"
    broken.write_text(check_monitoring.RULES.read_text().replace("[30m]) >= 3", "[30m]) >= 3)"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import check_monitoring as c; from pathlib import Path; "
        "problems = c.check(Path(sys.argv[2])); print(problems); sys.exit(1 if problems else 0)"
    )
    bad = subprocess.run(
        [sys.executable, "-c", code, str(script.parent), str(broken)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1
    assert "TolariaRollbackStorm" in bad.stdout
    assert "parenthesis" in bad.stdout
