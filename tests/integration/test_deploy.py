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


@pytest.mark.parametrize("kustomization", ["base", "overlays/mtls", "overlays/example-team"])
def test_kustomizations_render_and_validate(kustomization: str) -> None:
    """Each kustomization renders with kustomize itself, and every object passes the strict schemas of
    Kubernetes 1.30, 1.33 and 1.37 and the cross-object checks. The example overlay (the README's
    customisation: a namespace and images from one's own registry) is kustomize's, not refused."""
    module = checks()
    directory = DEPLOY / kustomization
    assert module.check(directory) == []
    objects = module.render(directory)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
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
    images = sorted(c["image"] for o in objects if o["kind"] in ("Deployment", "Job") for c in containers(o))
    if kustomization == "overlays/example-team":
        assert {o["metadata"].get("namespace") for o in objects} == {"team-a"}
        assert images == [
            "registry.example.com/ml/tolaria-governor:0.1.0",
            "registry.example.com/ml/tolaria-trainer:0.1.0-cpu",
        ]
    else:
        assert images == ["tolaria/governor:0.1.0", "tolaria/trainer:0.1.0-cpu"]
    dirs = {str(d.relative_to(DEPLOY)) for d in module.kustomization_dirs()}
    assert {"base", "overlays/mtls", "overlays/example-team"} <= dirs


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def test_render_prints_what_kubectl_sends() -> None:
    """`check_manifests.py --render` is kustomize's own output: the Secret volumes' modes 0400 and 0440 are
    256 and 288 (the hand-written renderer wrote 400, which the API server reads as mode 0620)."""
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "check_manifests.py"), "--render", str(DEPLOY / "base")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [o for o in checks()._yaml().load_all(result.stdout) if o]
    modes = {
        o["kind"]: [v["secret"]["defaultMode"] for v in o["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    }
    assert modes == {"Deployment": [0o400], "Job": [0o440]}
    kustomize = subprocess.run(
        [*checks().kustomize_command(), str(DEPLOY / "base")], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout == kustomize.stdout


def test_without_kustomize_the_checks_say_how_to_get_it(tmp_path: Path) -> None:
    """No kubectl and no kustomize: rc 1 and one line naming the fix, not a traceback."""
    if (Path(sys.executable).parent / "kubectl").exists():
        pytest.skip("a kubectl lies beside this Python (make kubectl); PATH cannot hide it")
    env = {k: v for k, v in os.environ.items() if k != "KUSTOMIZE"}
    env["PATH"] = str(tmp_path / "empty")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "check_manifests.py"), str(DEPLOY / "base")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "neither kubectl nor kustomize is on PATH" in result.stderr
    assert "Traceback" not in result.stderr


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
    assert env["GOVERNOR_CLIENT_CERT"] == "/tls/tls.crt"


def test_checks_catch_mistakes(tmp_path: Path) -> None:
    """Two replicas, a rolling update, an unknown field, an unknown flag and variable, a writable root
    filesystem, a file left out of the kustomization, completions that disagree with WORLD_SIZE, a Job that
    never restarts a rank or fails on a crash, a /dev/shm on disk and a NetworkPolicy that drops other
    namespaces' controllers are each reported."""
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
    text = job.read_text().replace("completions: 2", "completions: 3").replace("backoffLimit: 6", "backoffLimit: 0")
    text = text.replace("values: [2, 3, 5, 6]", "values: [1, 2, 3, 5, 6]").replace("medium: Memory", 'medium: ""')
    job.write_text(text)
    (base / "forgotten.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    policy = base / "governor-networkpolicy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "        - namespaceSelector:\n            matchLabels:",
            "        - namespaceSelector:\n            matchLabels:\n              x: y",
            1,
        )
    )
    problems = "\n".join(checks().check(base))
    assert "replicas must be 1" in problems
    assert "strategy must be Recreate" in problems
    assert "terminationGracePeriodSecond" in problems, "strict schema validation"
    assert "does not know --metrics-listn" in problems
    assert "sets GOVERNOR_LOG_FORMT, which governor does not read" in problems
    assert "readOnlyRootFilesystem: true" in problems
    assert "forgotten.yaml is not in its resources" in problems
    assert "completions must equal WORLD_SIZE (2)" in problems
    assert "backoffLimit must be above 0" in problems
    assert "the FailJob exit codes are [1, 2, 3, 5, 6], not the terminal ones [2, 3, 5, 6]" in problems
    assert "emptyDir {medium: Memory, sizeLimit: ...} at /dev/shm" in problems
    assert "controllers in other namespaces are not let in" in problems


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
    metrics port; then each index of the trainer Job runs its command, the image's entrypoint tolaria-train
    (RANK from the index, the run id from the Job's name, rank 0's rendezvous on loopback) against it: both ranks attach with the
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
        "tolaria-trainer-0.tolaria-trainer": "127.0.0.1",
        "29500": str(rendezvous_port),
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
        assert "command" not in trainer, "the image's entrypoint: tolaria-train, whose exit code the policy reads"
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
                    [sys.executable, "-m", "tolaria_trainer", *args],
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


# --------------------------------------------------------------------------------- the Job's failure policy


def kubelet_exit_code(returncode: int) -> int:
    """A process's exit status as the kubelet reports a container's: killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def rendered_job() -> dict[str, Any]:
    return next(o for o in checks().render(DEPLOY / "base") if o["kind"] == "Job")


def test_pod_failure_policy_maps_every_exit_code() -> None:
    """Each documented exit code through the rendered Job's rules: the governor's verdicts and usage errors
    fail the Job, crashes and an unreachable governor (and deaths by signal) are retried and counted, and an
    evicted or preempted pod is retried without counting."""
    from tolaria.exit_codes import ExitCode

    job = rendered_job()
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] > 0
    expected = {
        ExitCode.INTERNAL_ERROR: "Count",
        ExitCode.USAGE: "FailJob",
        ExitCode.HALTED: "FailJob",
        ExitCode.GOVERNOR_UNREACHABLE: "Count",
        ExitCode.ROLLBACK_FAILED: "FailJob",
        ExitCode.EPOCH_CAP: "FailJob",
        ExitCode.CHECK_FAILED: "Count",
        ExitCode.JOURNAL_FAILED: "Count",
        ExitCode.PEER_LOST: "Count",
        ExitCode.STALLED: "Count",
        ExitCode.INTERRUPTED: "Count",
    }
    assert set(expected) == set(ExitCode) - {ExitCode.OK}, "a new exit code needs a decision here"
    for code, action in expected.items():
        assert checks().pod_failure_action(job, {"trainer": int(code)}, {}) == action, code.name
    for signal_code in (137, 139, 143):  # SIGKILL or the OOM killer, SIGSEGV, SIGTERM
        assert checks().pod_failure_action(job, {"trainer": signal_code}, {}) == "Count"
    # A node drain or preemption: DisruptionTarget comes first, whatever the exit code.
    for code in (137, 143, int(ExitCode.HALTED)):
        assert checks().pod_failure_action(job, {"trainer": code}, {"DisruptionTarget": "True"}) == "Ignore"
    assert sorted(checks().terminal_exit_codes()) == sorted(
        int(c) for c, action in expected.items() if action == "FailJob"
    )


def test_a_rule_that_shadows_the_verdicts_is_reported() -> None:
    """Rules are tried in order: a customisation that puts a rule catching 3 (HALTED) before the FailJob rule
    retries a HALT like a crash, and an Ignore on a crash code retries it without end; the FailJob rule's
    own values are still right, so only the rules' order tells, and the check reports both."""
    job = rendered_job()
    rules = job["spec"]["podFailurePolicy"]["rules"]
    rules.insert(1, {"action": "Count", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]}})
    rules.append({"action": "Ignore", "onExitCodes": {"operator": "In", "values": [1]}})
    problems = "\n".join(checks()._check_trainer_job(job, job["spec"]["template"]))
    assert "the FailJob exit codes are [2, 5, 6], not the terminal ones [2, 3, 5, 6]" in problems
    assert "exit codes [1] are ignored" in problems


@pytest.mark.slow
def test_real_trainer_exits_go_through_the_policy(tmp_path: Path) -> None:
    """Real `tolaria-train` processes against a real governor, their exit codes through the rendered Job's
    rules: a refused token under --fail-closed (2) and a HALT (3) fail the Job; a rank killed with SIGKILL
    mid-run (137, as the OOM killer does) is restarted."""
    from governor_daemon.daemon_process import DaemonProcess
    from tolaria.governor.v1 import control_service_pb2 as cpb
    from tolaria.governor.v1 import control_service_pb2_grpc as cgrpc

    tokens = tmp_path / "tokens"
    tokens.write_text("trainer-1 trainer trainer-token-0123456789\nviewer-1 viewer viewer-token-0123456789\n")
    tokens.chmod(0o600)
    (tmp_path / "good.token").write_text("trainer-token-0123456789\n")
    (tmp_path / "bad.token").write_text("not-the-token-0123456789\n")
    job = rendered_job()
    with DaemonProcess(tmp_path / "data", "--tokens-file", str(tokens)) as daemon:

        def trainer(run_id: str, token: str, *args: str) -> subprocess.Popen[str]:
            cmd = [sys.executable, "-m", "tolaria_trainer", "--task", "synthetic", "--log-format", "json"]
            cmd += ["--address", daemon.address, "--token-file", str(tmp_path / token), "--run-id", run_id]
            return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        refused = trainer("refused", "bad.token", "--epochs", "2", "--fail-closed", "30")
        halted = trainer(
            "halted", "good.token", "--halt-wait-s", "0", "--policy", "max_rollbacks=0",
            "--inject", "nan@epoch=3", "--epochs", "6",
        )  # fmt: skip
        crashed = trainer("crashed", "good.token", "--epochs", "200")
        try:
            # Kill that rank mid-run: once the governor has its first validation.
            channel = grpc.insecure_channel(daemon.address)
            control = cgrpc.ControlServiceStub(channel)
            viewer = (("authorization", "Bearer viewer-token-0123456789"),)
            deadline = time.monotonic() + 120
            while not any(
                r.run_id == "crashed" and r.latest_validation_step > 0
                for r in control.ListRuns(cpb.ListRunsRequest(), metadata=viewer, timeout=10).runs
            ):
                assert crashed.poll() is None, crashed.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the run never validated"
                time.sleep(0.2)
            channel.close()
            crashed.kill()
            outcomes = {}
            for name, proc in (("refused", refused), ("halted", halted), ("crashed", crashed)):
                _, err = proc.communicate(timeout=180)
                outcomes[name] = kubelet_exit_code(proc.returncode)
                assert name == "crashed" or outcomes[name] in (2, 3), err[-3000:]
        finally:
            for proc in (refused, halted, crashed):
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    assert outcomes == {"refused": 2, "halted": 3, "crashed": 137}
    actions = {name: checks().pod_failure_action(job, {"trainer": code}, {}) for name, code in outcomes.items()}
    assert actions == {"refused": "FailJob", "halted": "FailJob", "crashed": "Count"}


# ------------------------------------------------------------------------------------ the NetworkPolicy


def admitted(
    policy: dict[str, Any],
    own_namespace: str,
    namespace: str,
    ns_labels: dict[str, str],
    labels: dict[str, str],
    port: str,
) -> bool:
    """Whether networking.k8s.io/v1 ``policy`` (in ``own_namespace``) admits a pod with ``labels`` in
    ``namespace`` (labelled ``ns_labels``) to ``port``: a peer with only a podSelector matches pods of the
    policy's own namespace; with a namespaceSelector, pods of the namespaces it selects."""

    def selects(selector: dict[str, Any] | None, have: dict[str, str]) -> bool:
        wanted = (selector or {}).get("matchLabels") or {}
        return all(have.get(k) == v for k, v in wanted.items())

    for rule in policy["spec"]["ingress"]:
        if port not in {p["port"] for p in rule.get("ports") or []}:
            continue
        for peer in rule.get("from") or []:
            if "namespaceSelector" in peer:
                in_scope = selects(peer["namespaceSelector"], ns_labels)
            else:
                in_scope = namespace == own_namespace
            if in_scope and selects(peer.get("podSelector"), labels):
                return True
    return False


def test_network_policy_admits_fleet_controllers_from_labelled_namespaces() -> None:
    """The rendered NetworkPolicy (in the example overlay's team-a) lets in this job's trainers and labelled
    controllers from team-a or from any namespace labelled tolaria.dev/governor-client: "true" (a fleet
    controller), and nobody else."""
    objects = checks().render(DEPLOY / "overlays" / "example-team")
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    trainer = {"app.kubernetes.io/name": "tolaria-trainer"}
    client = {"tolaria.dev/governor-client": "true"}
    fleet_ns = {"tolaria.dev/governor-client": "true"}
    assert policy["metadata"]["namespace"] == "team-a"
    cases = [
        ("team-a", {}, trainer, True),
        ("team-a", {}, client, True),
        ("fleet-system", fleet_ns, client, True),
        ("fleet-system", fleet_ns, {"app": "other"}, False),
        ("team-b", {}, client, False),
        ("team-b", {}, trainer, False),
        ("team-a", {}, {"app": "other"}, False),
    ]
    for namespace, ns_labels, labels, allowed in cases:
        assert admitted(policy, "team-a", namespace, ns_labels, labels, "grpc") is allowed, (namespace, labels)
    assert not admitted(policy, "team-a", "fleet-system", fleet_ns, client, "metrics")
