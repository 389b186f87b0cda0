"""deploy/ without a cluster: the kustomizations render and validate against the Kubernetes schemas, the
checks catch the mistakes they are for, and the pods' processes run on loopback as the manifests say (the
governor Deployment's container, its gRPC probes and metrics port, and the indexed trainer Job's pods)."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from governor_daemon.journal.segments import LocatedEntry, list_segments, read_segment
from tests.conftest import REPO, governor_cli

DEPLOY = REPO / "deploy"


def checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_manifests", DEPLOY / "check_manifests.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kustomization", ["base", "overlays/mtls"])
def test_kustomizations_render_and_validate(kustomization: str) -> None:
    """Each kustomization renders, and every object passes the strict Kubernetes 1.37 schemas and the
    cross-object checks."""
    module = checks()
    directory = DEPLOY / kustomization
    assert module.check(directory) == []
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in module.render(directory))
    expected = [
        "Deployment/tolaria-governor",
        "Job/tolaria-trainer",
        "NetworkPolicy/tolaria-governor",
        "PersistentVolumeClaim/tolaria-governor-journal",
        "Secret/tolaria-governor-tokens",
        "Service/tolaria-governor",
        "Service/tolaria-trainer",
    ]
    if kustomization == "overlays/mtls":
        expected = sorted([*expected, "Certificate/tolaria-governor-tls", "Certificate/tolaria-trainer-tls"])
    assert kinds == expected
    assert {str(d.relative_to(DEPLOY)) for d in module.kustomization_dirs()} == {"base", "overlays/mtls"}


def test_mtls_overlay_serves_tls_and_probes_with_a_certificate() -> None:
    """The component adds the TLS flags and mounts, and replaces the plaintext gRPC probes."""
    objects = checks().render(DEPLOY / "overlays" / "mtls")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    for flag, path in (
        ("--tls-cert", "/tls/tls.crt"),
        ("--tls-key", "/tls/tls.key"),
        ("--tls-client-ca", "/tls/ca.crt"),
    ):
        assert args[args.index(flag) + 1] == path
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][:2] == ["governor", "health"]
    job = next(o for o in objects if o["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOLARIA_TLS_CERT"] == "/tls/tls.crt"


def test_checks_catch_mistakes(tmp_path: Path) -> None:
    """Two replicas, a rolling update, an unknown field, an unknown flag and variable, a writable root
    filesystem, a file left out of the kustomization and completions that disagree with --nnodes are each
    reported."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "base"
    deployment = base / "governor-deployment.yaml"
    text = deployment.read_text()
    text = text.replace("replicas: 1", "replicas: 2").replace("type: Recreate", "type: RollingUpdate")
    text = text.replace("terminationGracePeriodSeconds: 15", "terminationGracePeriodSecond: 15")
    text = text.replace("- --metrics-listen", "- --metrics-listn").replace("GOVERNOR_LOG_FORMAT", "GOVERNOR_LOG_FORMT")
    text = text.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    deployment.write_text(text)
    job = base / "trainer-job.yaml"
    job.write_text(job.read_text().replace("completions: 2", "completions: 3"))
    (base / "forgotten.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    problems = "\n".join(checks().check(base))
    assert "replicas must be 1" in problems
    assert "strategy must be Recreate" in problems
    assert "terminationGracePeriodSecond" in problems, "strict schema validation"
    assert "does not know --metrics-listn" in problems
    assert "sets GOVERNOR_LOG_FORMT, which governor does not read" in problems
    assert "readOnlyRootFilesystem: true" in problems
    assert "forgotten.yaml is not in its resources" in problems
    assert "completions must equal torchrun's --nnodes (2)" in problems


def test_the_committed_tokens_are_refused(tmp_path: Path) -> None:
    """The placeholder tokens in deploy/base/tokens cannot be used: the governor exits 2 naming the fix."""
    result = governor_cli(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--data-dir",
            str(tmp_path / "data"),
            "--tokens-file",
            str(DEPLOY / "base" / "tokens" / "tokens"),
        ],
        timeout_s=60,
    )
    assert result.returncode == 2
    assert "shorter than 16 characters" in result.stderr + result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) in a container's command and args, as the kubelet expands them."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def wait_serving(address: str, service: str, budget_s: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The native gRPC probe: grpc.health.v1 Check of ``service`` until SERVING, within the startup budget."""
    deadline = time.monotonic() + budget_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the startup probe's budget ran out"
            time.sleep(0.2)


@pytest.mark.slow
def test_pods_run_on_loopback(tmp_path: Path) -> None:
    """The governor container's args and env (ports on loopback, the journal volume and the tokens Secret in
    a temp dir) start a governor that the probes find SERVING and that serves /metrics on the Service's
    metrics port; then each index of the trainer Job runs its torchrun command (NODE_RANK from the index,
    the run id from the Job's name, rank 0's rendezvous on loopback) against it: both ranks attach with the
    trainer token, train to completion as one run, and the journal verifies. Epochs: 3 instead of 10."""
    module = checks()
    # The README's way to real tokens: `governor tokens init`, and an overlay whose secretGenerator replaces
    # the placeholder Secret.
    overlay = tmp_path / "overlay"
    assert governor_cli(["tokens", "init", str(overlay / "job-secrets")]).returncode == 0
    files = ", ".join(f"{k}=job-secrets/{k}" for k in ("tokens", "trainer.token", "controller.token"))
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(DEPLOY / 'base', overlay)}]\n"
        f"secretGenerator:\n  - {{name: tolaria-governor-tokens, behavior: replace, options: {{disableNameSuffixHash: true}}, "
        f"files: [{files}]}}\n"
    )
    assert module.check(overlay) == []
    objects = module.render(overlay)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    job = next(o for o in objects if o["kind"] == "Job")
    governor_service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "tolaria-governor"
    )
    secret = next(o for o in objects if o["kind"] == "Secret")
    secrets = tmp_path / "secrets"  # the Secret's volume, as the kubelet writes it
    secrets.mkdir()
    for key, value in secret["data"].items():
        (secrets / key).write_bytes(base64.b64decode(value))
        (secrets / key).chmod(0o600)
    assert (secrets / "tokens").read_text() == (overlay / "job-secrets" / "tokens").read_text()
    grpc_port, metrics_port, rendezvous_port = free_port(), free_port(), free_port()
    mapping = {
        "0.0.0.0:50051": f"127.0.0.1:{grpc_port}",
        "0.0.0.0:9464": f"127.0.0.1:{metrics_port}",
        "tolaria-governor:50051": f"127.0.0.1:{grpc_port}",
        "/data/journal": str(tmp_path / "volume" / "journal"),
        "/secrets/tokens": str(secrets / "tokens"),
        "/secrets/trainer.token": str(secrets / "trainer.token"),
        "/tmp": str(tmp_path / "tmp"),
        "--master-addr=tolaria-trainer-0.tolaria-trainer": "--master-addr=127.0.0.1",
        "--master-port=29500": f"--master-port={rendezvous_port}",
    }
    (tmp_path / "volume").mkdir()
    (tmp_path / "tmp").mkdir()

    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: mapping.get(e["value"], e["value"]) for e in container["env"]}
    cmd = [sys.executable, "-m", "governor_daemon", "serve", *(mapping.get(a, a) for a in container["args"])]
    log_path = tmp_path / "governor.log"
    log = log_path.open("w")
    governor = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            assert spec["grpc"]["port"] == 50051
            budget = spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3)
            wait_serving(f"127.0.0.1:{grpc_port}", spec["grpc"].get("service", ""), budget, governor, log_path)
        metrics = next(p for p in governor_service["spec"]["ports"] if p["name"] == "metrics")
        target = next(p for p in container["ports"] if p["name"] == metrics["targetPort"])
        assert target["containerPort"] == 9464
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "governor_build_info{" in body

        trainer = job["spec"]["template"]["spec"]["containers"][0]
        assert trainer["command"] == ["torchrun"]
        ranks = []
        for index in range(job["spec"]["completions"]):
            pod_env: dict[str, str] = {}
            for item in trainer["env"]:
                field = (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
                if "job-completion-index" in field:
                    pod_env[item["name"]] = str(index)
                elif "job-name" in field:
                    pod_env[item["name"]] = job["metadata"]["name"]
                else:
                    pod_env[item["name"]] = mapping.get(item["value"], item["value"])
            args = [mapping.get(expand(a, pod_env), expand(a, pod_env)) for a in trainer["args"]]
            args[args.index("--epochs") + 1] = "3"
            ranks.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", *args],
                    env={**os.environ, **pod_env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [rank.communicate(timeout=400)[0] for rank in ranks]
        for rank, output in zip(ranks, outputs, strict=True):
            assert rank.returncode == 0, output[-4000:]
    finally:
        governor.terminate()
        governor.wait(20)
        log.close()
    assert governor.returncode == 0, "SIGTERM stopped the governor cleanly"
    journal = tmp_path / "volume" / "journal"
    kinds: dict[str, list[dict[str, Any]]] = {}
    for path in list_segments(journal):
        for item in read_segment(path):
            if isinstance(item, LocatedEntry) and item.entry.run == "tolaria-trainer":
                kinds.setdefault(item.entry.kind, []).append(item.entry.payload)
    assert {a["caller"] for a in kinds["attach"]} == {"trainer-1"}, "both ranks used the Secret's trainer token"
    assert {a["rank"] for a in kinds["attach"]} == {0, 1}
    assert [f["status"] for f in kinds["finish"]] == ["FINISH_STATUS_COMPLETED"] * 2
    assert governor_cli(["audit", "verify", "--data-dir", str(journal)]).returncode == 0
