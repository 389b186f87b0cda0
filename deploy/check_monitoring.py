"""Check deploy/components/monitoring: the alert rules and the Grafana dashboard's queries. Exit 1 listing problems.

- The PrometheusRule's groups are a Prometheus rules file: ``promtool check rules`` accepts it where promtool
  is installed (Debian: ``apt-get install prometheus``); without it every expression must parse with the
  ``promql-parser`` package (the lint then says so).
- Every alert has a severity label and summary and description annotations.
- The dashboard is JSON; every panel's query parses (checked as a recording rule by promtool, or by the
  parser), with Grafana's variables ($namespace, $__rate_interval, ...) put in as values.
- Every expression selects job="tolaria-governor", the job the ServiceMonitor names.

That each alert fires on the metrics of a real run is tested by tests/integration/test_monitoring.py.

Run: python deploy/check_monitoring.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

MONITORING = Path(__file__).resolve().parent / "components" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"
JOB = 'job="tolaria-governor"'
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "default",
    "$pod": "tolaria-governor-0",
}


def rule_groups(path: Path) -> dict[str, Any]:
    """The PrometheusRule's ``spec``: a Prometheus rules file ({"groups": [...]})."""
    document = YAML(typ="safe", pure=True).load(path.read_text())
    if document.get("kind") != "PrometheusRule":
        raise ValueError(f"{path}: kind {document.get('kind')!r}, expected PrometheusRule")
    spec: dict[str, Any] = document["spec"]
    return spec


def alerts(path: Path) -> list[dict[str, Any]]:
    """Every alerting rule."""
    return [rule for group in rule_groups(path)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, query with Grafana's variables filled in) for every target of every panel."""
    dashboard = json.loads(path.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def write_rules_file(folder: Path, rules: Path = RULES, dashboard: Path = DASHBOARD) -> Path:
    """The alert rules plus one recording rule per dashboard query, as a rules file for promtool."""
    groups = rule_groups(rules)
    queries = dashboard_queries(dashboard)
    recorded = [{"record": f"tolaria_dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    path = folder / "rules.yaml"
    path.write_text(json.dumps({"groups": [*groups["groups"], {"name": "dashboard-queries", "rules": recorded}]}))
    return path


def check(rules: Path = RULES, dashboard: Path = DASHBOARD) -> list[str]:
    """Every problem found (empty: all is well); says on stdout which checker parsed the expressions."""
    problems = []
    for rule in alerts(rules):
        name = rule["alert"]
        if "severity" not in rule.get("labels", {}):
            problems.append(f"{name}: no severity label")
        for key in ("summary", "description"):
            if not rule.get("annotations", {}).get(key):
                problems.append(f"{name}: no {key} annotation")
        if JOB not in rule["expr"]:
            problems.append(f"{name}: the expression does not select {JOB}")
    for title, expr in dashboard_queries(dashboard):
        if JOB not in expr:
            problems.append(f"dashboard panel {title!r}: {expr!r} does not select {JOB}")
    promtool = shutil.which("promtool")
    if promtool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(
                [promtool, "check", "rules", str(write_rules_file(Path(tmp), rules, dashboard))],
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            problems.append(f"promtool check rules: {result.stdout}{result.stderr}".strip())
        else:
            counts = f"{len(alerts(rules))} alerts, {len(dashboard_queries(dashboard))} dashboard queries"
            print(f"promtool check rules: {counts}")
        return problems
    import promql_parser

    expressions = [(rule["alert"], rule["expr"]) for rule in alerts(rules)]
    expressions += [(f"dashboard panel {title!r}", expr) for title, expr in dashboard_queries(dashboard)]
    for where, expr in expressions:
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            problems.append(f"{where}: {expr!r} does not parse: {exc}")
    durations = [rule["for"] for rule in alerts(rules) if "for" in rule]
    problems += [f"'for: {d}' is not a duration" for d in durations if not re.fullmatch(r"(\d+[smhdwy])+", str(d))]
    print(f"promtool not installed: {len(expressions)} expressions parsed with promql-parser instead")
    return problems


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
